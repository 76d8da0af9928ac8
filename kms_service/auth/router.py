from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field, StringConstraints

from kms_service.auth.principal import Operation, Role
from kms_service.auth.tokens import TokenView
from kms_service.deps import MetaDep, ServicesDep, TokenManager
from kms_service.routing import StrictJsonRoute
from kms_service.validation import DisplayText, KeyName, StrictModel, TenantId

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/tokens", tags=["tokens"])

TokenId = Annotated[str, StringConstraints(pattern=r"^tok_[0-9a-f]{16}$")]


class TokenCreate(StrictModel):
    role: Literal["admin", "operator", "auditor", "agent"]
    description: DisplayText
    tenant: TenantId | None = None
    keys: Annotated[list[KeyName], Field(min_length=1, max_length=1000)] | None = None
    operations: (
        Annotated[list[Literal["derive", "datakey", "encrypt", "decrypt", "rewrap"]], Field(min_length=1)]
        | None
    ) = None
    ttl_seconds: Annotated[int, Field(ge=60, le=10 * 365 * 86400)] | None = None


class TokenOut(BaseModel):
    id: str
    role: str
    tenant: str | None
    keys: list[str] | None
    operations: list[str] | None
    description: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, view: TokenView) -> TokenOut:
        return cls(
            id=view.id,
            role=view.role,
            tenant=view.tenant,
            keys=view.keys,
            operations=view.operations,
            description=view.description,
            created_by=view.created_by,
            created_at=view.created_at,
            expires_at=view.expires_at,
            revoked_at=view.revoked_at,
        )


class TokenCreated(TokenOut):
    token: str = Field(description="The bearer token. Shown once; only its hash is stored.")


class TokenList(BaseModel):
    tokens: list[TokenOut]


@router.post("", status_code=201, response_model=TokenCreated)
async def create_token(
    body: TokenCreate, principal: TokenManager, services: ServicesDep, meta: MetaDep
) -> TokenCreated:
    view, token = await services.tokens.create(
        principal.actor,
        meta,
        role=Role(body.role),
        description=body.description,
        tenant=body.tenant,
        keys=body.keys,
        operations=[Operation(o) for o in body.operations] if body.operations else None,
        ttl_seconds=body.ttl_seconds,
    )
    return TokenCreated(**TokenOut.of(view).model_dump(), token=token)


@router.get("", response_model=TokenList)
async def list_tokens(principal: TokenManager, services: ServicesDep) -> TokenList:
    return TokenList(tokens=[TokenOut.of(v) for v in await services.tokens.list()])


@router.delete("/{token_id}", response_model=TokenOut)
async def revoke_token(
    token_id: TokenId, principal: TokenManager, services: ServicesDep, meta: MetaDep
) -> TokenOut:
    return TokenOut.of(await services.tokens.revoke(principal.actor, meta, token_id))
