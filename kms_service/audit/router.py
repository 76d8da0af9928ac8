from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from kms_service.audit.query import list_events
from kms_service.audit.verify import verify_with_checkpoint
from kms_service.deps import AuditReader, ServicesDep
from kms_service.routing import StrictJsonRoute
from kms_service.validation import NAME_PATTERN

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/audit", tags=["audit"])


class AuditPage(BaseModel):
    events: list[dict[str, Any]]
    next_after_seq: int | None


class VerifyOut(BaseModel):
    valid: bool
    checked: int
    head_seq: int
    head_hash: str
    first_invalid_seq: int | None
    reason: str | None = None
    checkpoint_seq: int | None = None


@router.get("", response_model=AuditPage)
async def read_audit(
    principal: AuditReader,
    services: ServicesDep,
    tenant: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    action: Annotated[str | None, Query(pattern=r"^[a-z_.]{1,64}$")] = None,
    after_seq: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    events, next_after = await list_events(
        services.db, tenant=tenant, action=action, after_seq=after_seq, limit=limit
    )
    return AuditPage(events=events, next_after_seq=next_after)


@router.get("/verify", response_model=VerifyOut)
async def verify_audit(principal: AuditReader, services: ServicesDep) -> VerifyOut:
    result = await verify_with_checkpoint(
        services.db,
        audit_key=services.installation.audit_key.reveal(),
        sink=services.checkpoint_sink,
        public_key=services.checkpoint_key.public_key(),
        cluster_id=services.installation.cluster_id,
    )
    return VerifyOut(**asdict(result))
