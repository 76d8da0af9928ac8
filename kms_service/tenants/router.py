from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel

from kms_service.db.models import Tenant
from kms_service.deps import KeyManager, MetaDep, Reader, ServicesDep, actx
from kms_service.routing import StrictJsonRoute
from kms_service.validation import DisplayText, StrictModel, TenantId

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/tenants", tags=["tenants"])


class TenantCreate(StrictModel):
    id: TenantId
    name: DisplayText


class TenantOut(BaseModel):
    id: str
    name: str
    created_at: datetime

    @classmethod
    def of(cls, row: Tenant) -> TenantOut:
        return cls(id=row.id, name=row.name, created_at=row.created_at)


class TenantList(BaseModel):
    tenants: list[TenantOut]


@router.post("", status_code=201, response_model=TenantOut)
async def create_tenant(
    body: TenantCreate, principal: KeyManager, services: ServicesDep, meta: MetaDep
) -> TenantOut:
    row = await services.tenants.create(actx(principal, meta), tenant_id=body.id, name=body.name)
    return TenantOut.of(row)


@router.get("", response_model=TenantList)
async def list_tenants(principal: Reader, services: ServicesDep) -> TenantList:
    return TenantList(tenants=[TenantOut.of(t) for t in await services.tenants.list()])


@router.get("/{tenant}", response_model=TenantOut)
async def get_tenant(tenant: TenantId, principal: Reader, services: ServicesDep) -> TenantOut:
    return TenantOut.of(await services.tenants.get(tenant))
