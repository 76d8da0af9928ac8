"""Per-request facts every audit event carries."""

from __future__ import annotations

from dataclasses import dataclass

from kms_service.audit.chain import Actor


@dataclass(frozen=True, slots=True)
class RequestMeta:
    request_id: str | None = None
    source: str | None = None


CLI_REQUEST = RequestMeta(request_id=None, source="cli")


@dataclass(frozen=True, slots=True)
class Actx:
    """Who is acting, in which request, and why (the reason goes into the audit event)."""

    actor: Actor
    meta: RequestMeta
    reason: str | None = None
