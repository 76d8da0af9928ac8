from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, Field

from kms_service.deps import KeyManager, MetaDep, Reader, ServicesDep, actx
from kms_service.errors import InvalidRequest
from kms_service.keys.model import KeyMeta
from kms_service.keys.service import MAX_DESTRUCTION_DAYS, MIN_DESTRUCTION_DAYS, KeyService
from kms_service.request import Actx
from kms_service.routing import StrictJsonRoute
from kms_service.validation import KeyName, Reason, StrictModel, TenantId, Version

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/tenants/{tenant}/keys", tags=["keys"])

RotationDays = Annotated[int, Field(ge=1, le=3650)]


class KeyCreate(StrictModel):
    name: KeyName
    provider: dict[str, Any] = Field(
        default_factory=lambda: {"type": "local"}, description='Provider config, e.g. {"type": "local"}'
    )
    rotation_period_days: RotationDays | None = None


class KeyPatch(StrictModel):
    min_decryption_version: Version | None = None
    rotation_period_days: RotationDays | None = None
    force: bool = Field(
        default=False,
        description="Raise min_decryption_version even if DEK ids were last derived under a version "
        "below it (otherwise 409 would_cut_off_ids)",
    )


class ReasonIn(StrictModel):
    reason: Reason | None = None


class TransitionIn(StrictModel):
    reason: Reason | None = None
    waiting_period_days: Annotated[int, Field(ge=MIN_DESTRUCTION_DAYS, le=MAX_DESTRUCTION_DAYS)] | None = None


class VersionOut(BaseModel):
    version: int
    state: str
    created_at: datetime
    destroy_at: datetime | None = None


class KeyOut(BaseModel):
    tenant: str
    name: str
    provider: dict[str, Any]
    state: str
    primary_version: int | None
    latest_version: int
    min_decryption_version: int
    rotation_period_days: int | None
    next_rotation_at: datetime | None
    created_at: datetime
    versions: list[VersionOut]

    @classmethod
    def of(cls, meta: KeyMeta) -> KeyOut:
        return cls(
            tenant=meta.tenant,
            name=meta.name,
            provider=meta.provider_config,
            state=meta.state.value,
            primary_version=meta.primary_version,
            latest_version=meta.latest_version,
            min_decryption_version=meta.min_decryption_version,
            rotation_period_days=meta.rotation_period_days,
            next_rotation_at=meta.next_rotation_at,
            created_at=meta.created_at,
            versions=[
                VersionOut(
                    version=v.version, state=v.state.value, created_at=v.created_at, destroy_at=v.destroy_at
                )
                for v in sorted(meta.versions.values(), key=lambda v: v.version)
            ],
        )


class KeyList(BaseModel):
    keys: list[KeyOut]


class VersionUsage(BaseModel):
    version: int
    ids: int


class OldId(BaseModel):
    purpose: str
    id: str
    version: int
    last_derived_at: datetime


class UsageOut(BaseModel):
    """Re-key progress. Counts come from batched flushes: they trail derives by about
    KMS_USAGE_FLUSH_INTERVAL_SECONDS."""

    primary_version: int | None
    versions: list[VersionUsage]
    old_ids: list[OldId] = Field(description="ids not on the primary version yet, oldest first (capped)")
    old_total: int
    total: int


@router.post("", status_code=201, response_model=KeyOut, response_model_exclude_none=False)
async def create_key(
    tenant: TenantId, body: KeyCreate, principal: KeyManager, services: ServicesDep, meta: MetaDep
) -> KeyOut:
    return KeyOut.of(
        await services.keys.create(
            actx(principal, meta),
            tenant=tenant,
            name=body.name,
            provider=body.provider,
            rotation_period_days=body.rotation_period_days,
        )
    )


@router.get("", response_model=KeyList)
async def list_keys(tenant: TenantId, principal: Reader, services: ServicesDep) -> KeyList:
    return KeyList(keys=[KeyOut.of(m) for m in await services.keys.list(tenant)])


@router.get("/{key}", response_model=KeyOut)
async def get_key(tenant: TenantId, key: KeyName, principal: Reader, services: ServicesDep) -> KeyOut:
    return KeyOut.of(await services.keys.get(tenant, key))


@router.patch("/{key}", response_model=KeyOut)
async def update_key(
    tenant: TenantId,
    key: KeyName,
    body: KeyPatch,
    principal: KeyManager,
    services: ServicesDep,
    meta: MetaDep,
) -> KeyOut:
    changes = {name: getattr(body, name) for name in body.model_fields_set - {"force"}}
    if "min_decryption_version" in changes and changes["min_decryption_version"] is None:
        raise InvalidRequest("min_decryption_version cannot be null")
    if "min_decryption_version" in changes:
        await services.usage.flush()  # count this replica's buffered derives too
    return KeyOut.of(
        await services.keys.update(
            actx(principal, meta), tenant=tenant, key=key, changes=changes, force=body.force
        )
    )


@router.get("/{key}/usage", response_model=UsageOut)
async def key_usage(
    tenant: TenantId,
    key: KeyName,
    principal: Reader,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> UsageOut:
    return UsageOut.model_validate(await services.keys.usage(tenant, key, limit=limit))


async def _set_key_state(keys: KeyService, ctx: Actx, tenant: str, key: str, *, enabled: bool) -> KeyOut:
    return KeyOut.of(await keys.set_key_state(ctx, tenant=tenant, key=key, enabled=enabled))


@router.post("/{key}/disable", response_model=KeyOut)
async def disable_key(
    tenant: TenantId,
    key: KeyName,
    principal: KeyManager,
    services: ServicesDep,
    meta: MetaDep,
    body: Annotated[ReasonIn | None, Body()] = None,
) -> KeyOut:
    """Disable the whole key: it derives, encrypts and decrypts nothing until enabled again."""
    return await _set_key_state(
        services.keys, actx(principal, meta, body.reason if body else None), tenant, key, enabled=False
    )


@router.post("/{key}/enable", response_model=KeyOut)
async def enable_key(
    tenant: TenantId,
    key: KeyName,
    principal: KeyManager,
    services: ServicesDep,
    meta: MetaDep,
    body: Annotated[ReasonIn | None, Body()] = None,
) -> KeyOut:
    return await _set_key_state(
        services.keys, actx(principal, meta, body.reason if body else None), tenant, key, enabled=True
    )


@router.post("/{key}/rotate", response_model=KeyOut)
async def rotate_key(
    tenant: TenantId,
    key: KeyName,
    principal: KeyManager,
    services: ServicesDep,
    meta: MetaDep,
    body: Annotated[ReasonIn | None, Body()] = None,
) -> KeyOut:
    reason = body.reason if body else None
    return KeyOut.of(await services.keys.rotate(actx(principal, meta, reason), tenant=tenant, key=key))


@router.post("/{key}/versions/{version}/{action}", response_model=KeyOut)
async def transition_version(
    tenant: TenantId,
    key: KeyName,
    version: Version,
    action: Literal["disable", "enable", "schedule-destruction", "restore"],
    principal: KeyManager,
    services: ServicesDep,
    meta: MetaDep,
    body: Annotated[TransitionIn | None, Body()] = None,
) -> KeyOut:
    return KeyOut.of(
        await services.keys.transition(
            actx(principal, meta, body.reason if body else None),
            tenant=tenant,
            key=key,
            version=version,
            action=action,
            waiting_period_days=body.waiting_period_days if body else None,
        )
    )
