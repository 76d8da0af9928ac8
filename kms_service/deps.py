"""Request dependencies: the service container, the request meta, and the caller."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kms_service.auth.principal import Permission, Principal
from kms_service.errors import Forbidden
from kms_service.request import Actx, RequestMeta
from kms_service.tls import peer_certificate_pem

if TYPE_CHECKING:
    from kms_service.app import Services

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_of(request_id: str | None) -> str:
    return request_id if request_id and _REQUEST_ID_RE.fullmatch(request_id) else uuid.uuid4().hex


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_meta(request: Request) -> RequestMeta:
    return RequestMeta(
        request_id=getattr(request.state, "request_id", None),
        source=request.client.host if request.client else None,
    )


ServicesDep = Annotated["Services", Depends(get_services)]
MetaDep = Annotated[RequestMeta, Depends(get_meta)]


# Declares the scheme in OpenAPI (the "Authorize" button of /docs); the raw header is still what
# authenticate() checks, so malformed headers are told apart from missing ones in the audit log.
bearer_scheme = HTTPBearer(auto_error=False, description="A kms-service token (`kms_...`) or a workload JWT")


async def current_principal(
    request: Request,
    services: ServicesDep,
    meta: MetaDep,
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    principal = await services.tokens.authenticate(
        authorization, meta, client_cert_pem=peer_certificate_pem(request.scope)
    )
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(permission: Permission) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller, if their role grants ``permission``; else an audited 403."""

    async def dependency(principal: CurrentPrincipal, services: ServicesDep, meta: MetaDep) -> Principal:
        if not principal.has(permission):
            await services.tokens.record_denial(
                principal.actor, meta, reason=f"role lacks {permission.value}"
            )
            raise Forbidden(f"role {principal.role.value!r} may not {permission.value.replace('_', ' ')}")
        return principal

    return dependency


Reader = Annotated[Principal, Depends(require(Permission.READ))]
KeyManager = Annotated[Principal, Depends(require(Permission.MANAGE_KEYS))]
TokenManager = Annotated[Principal, Depends(require(Permission.MANAGE_TOKENS))]
AuditReader = Annotated[Principal, Depends(require(Permission.READ_AUDIT))]


def actx(principal: Principal, meta: RequestMeta, reason: str | None = None) -> Actx:
    return Actx(actor=principal.actor, meta=meta, reason=reason)
