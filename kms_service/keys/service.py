"""Key management: create, read, update, rotate and move versions through their lifecycle.

Each change is one transaction that also appends its audit event (no audit, no change) and a
change-feed entry so every replica drops its cached copy.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from kms_service.audit.chain import Actor, EventDraft
from kms_service.audit.writer import Change, Clock, append_events, utcnow
from kms_service.db.engine import Database
from kms_service.db.models import DekUsage, Key, KeyVersion, Tenant
from kms_service.errors import (
    AlreadyExists,
    AuditUnavailable,
    DatabaseUnavailable,
    InvalidRequest,
    InvalidStateTransition,
    NotFound,
    ProviderValidationFailed,
    ServiceError,
    UnsupportedProvider,
    WouldCutOffIds,
)
from kms_service.keys.cache import KeyMetaCache
from kms_service.keys.credentials import seal_credentials, split_config
from kms_service.keys.material import KeyMaterial
from kms_service.keys.model import KeyMeta, KeyState, VersionMeta, VersionState
from kms_service.master import Installation
from kms_service.onboarding.checks import validate_config
from kms_service.request import Actx, RequestMeta
from providers import ProviderConfig, ProviderConfigError, parse_provider_config

log = logging.getLogger(__name__)

SCHEDULER = Actor(type="system", id="scheduler")
SCHEDULER_CTX = Actx(actor=SCHEDULER, meta=RequestMeta(request_id=None, source="scheduler"))

Done = list[tuple[str, str, int]]
"""(tenant, key, version) of each item a scheduled job acted on."""

DEFAULT_DESTRUCTION_DAYS = 30
MIN_DESTRUCTION_DAYS = 7
MAX_DESTRUCTION_DAYS = 365

# action -> (allowed from-states, to-state, audit action)
TRANSITIONS: dict[str, tuple[frozenset[VersionState], VersionState, str]] = {
    "disable": (frozenset({VersionState.ENABLED}), VersionState.DISABLED, "key.version.disabled"),
    "enable": (frozenset({VersionState.DISABLED}), VersionState.ENABLED, "key.version.enabled"),
    "schedule-destruction": (
        frozenset({VersionState.ENABLED, VersionState.DISABLED}),
        VersionState.SCHEDULED_FOR_DESTRUCTION,
        "key.version.destruction_scheduled",
    ),
    "restore": (
        frozenset({VersionState.SCHEDULED_FOR_DESTRUCTION}),
        VersionState.DISABLED,
        "key.version.restored",
    ),
}


def is_customer_key(provider: dict[str, Any]) -> bool:
    """A key in the customer's own AWS account, reached through an assumed role."""
    return provider.get("type") == "aws-kms" and bool(provider.get("role_arn"))


def to_meta(key: Key, versions: list[KeyVersion]) -> KeyMeta:
    return KeyMeta(
        tenant=key.tenant_id,
        name=key.name,
        provider_type=key.provider_type,
        provider_config=dict(key.provider_config),
        provider_secrets=key.provider_secrets,
        state=KeyState(key.state),
        min_decryption_version=key.min_decryption_version,
        rotation_period_days=key.rotation_period_days,
        next_rotation_at=key.next_rotation_at,
        created_at=key.created_at,
        versions={
            v.version: VersionMeta(
                version=v.version,
                state=VersionState(v.state),
                version_salt=v.version_salt,
                wrapped_secret=v.wrapped_secret,
                created_at=v.created_at,
                destroy_at=v.destroy_at,
            )
            for v in versions
        },
    )


class KeyService:
    def __init__(
        self,
        db: Database,
        installation: Installation,
        material: KeyMaterial,
        cache: KeyMetaCache,
        *,
        clock: Clock = utcnow,
        pkcs11_allowed_modules: list[str] | None = None,
    ) -> None:
        self._pkcs11_modules = frozenset(pkcs11_allowed_modules or ())
        self._db = db
        self._inst = installation
        self._material = material
        self._cache = cache
        self._clock = clock

    # -- reads -----------------------------------------------------------------------------

    async def get_meta(self, tenant: str, key: str) -> KeyMeta | None:
        """Cached metadata for the data plane; None if the key does not exist."""
        found, meta = self._cache.get((tenant, key))
        if found:
            return meta
        epoch = self._cache.epoch
        async with self._db.read() as session:
            meta = await self._load(session, tenant, key)
        if meta is not None:
            self._material.forget_destroyed(meta)
        self._cache.put_if_current((tenant, key), meta, epoch)
        return meta

    async def get(self, tenant: str, key: str) -> KeyMeta:
        async with self._db.read() as session:
            meta = await self._load(session, tenant, key)
        if meta is None:
            raise NotFound(f"key {key!r} of tenant {tenant!r} not found")
        return meta

    async def list(self, tenant: str) -> list[KeyMeta]:
        async with self._db.read() as session:
            if await session.get(Tenant, tenant) is None:
                raise NotFound(f"tenant {tenant!r} not found")
            keys = (
                await session.scalars(select(Key).where(Key.tenant_id == tenant).order_by(Key.name))
            ).all()
            versions = (
                await session.scalars(
                    select(KeyVersion)
                    .where(KeyVersion.key_id.in_([k.id for k in keys]))
                    .order_by(KeyVersion.version)
                )
            ).all()
        by_key: dict[int, list[KeyVersion]] = {}
        for v in versions:
            by_key.setdefault(v.key_id, []).append(v)
        return [to_meta(k, by_key.get(k.id, [])) for k in keys]

    @staticmethod
    async def _load(session: AsyncSession, tenant: str, key: str, *, lock: bool = False) -> KeyMeta | None:
        row = await KeyService._key_row(session, tenant, key, lock=lock)
        if row is None:
            return None
        versions = (
            await session.scalars(
                select(KeyVersion).where(KeyVersion.key_id == row.id).order_by(KeyVersion.version)
            )
        ).all()
        return to_meta(row, list(versions))

    @staticmethod
    async def _key_row(session: AsyncSession, tenant: str, key: str, *, lock: bool = False) -> Key | None:
        stmt = select(Key).where(Key.tenant_id == tenant, Key.name == key)
        if lock:
            stmt = stmt.with_for_update()
        return (await session.scalars(stmt)).one_or_none()

    async def _locked_key_row(self, session: AsyncSession, tenant: str, key: str) -> Key:
        """The key row, locked for this transaction (serialises changes of one key)."""
        row = await self._key_row(session, tenant, key, lock=True)
        if row is None:
            raise NotFound(f"key {key!r} of tenant {tenant!r} not found")
        return row

    # -- writes ----------------------------------------------------------------------------

    async def _audit(
        self,
        session: AsyncSession,
        ctx: Actx,
        action: str,
        *,
        tenant: str,
        key: str,
        version: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        body = dict(details or {})
        if ctx.reason:
            body["reason"] = ctx.reason
        await append_events(
            session,
            [
                EventDraft(
                    action=action,
                    actor=ctx.actor,
                    tenant=tenant,
                    key=key,
                    version=version,
                    request_id=ctx.meta.request_id,
                    source=ctx.meta.source,
                    details=body,
                )
            ],
            audit_key=self._inst.audit_key.reveal(),
            clock=self._clock,
            change=Change(kind="key", tenant=tenant, key=key),
        )

    def _next_rotation(self, period_days: int | None, now: datetime) -> datetime | None:
        return now + timedelta(days=period_days) if period_days else None

    async def create(
        self, ctx: Actx, *, tenant: str, name: str, provider: dict[str, Any], rotation_period_days: int | None
    ) -> KeyMeta:
        provider = await self.with_external_id(tenant, provider)
        try:
            config = parse_provider_config(provider)
        except ProviderConfigError as exc:
            raise UnsupportedProvider(str(exc)) from None
        self._check_allowed(config)
        if is_customer_key(provider):
            checks = await validate_config(
                config, local_wrapping_key=self._inst.local_wrapping_key.reveal(), tenant=tenant
            )
            failed = [c for c in checks if not c.ok]
            if failed:
                raise ProviderValidationFailed(
                    f"check {failed[0].name!r} failed: {failed[0].detail}",
                    extra={"checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]},
                )
        stored_config, secret = split_config(config)
        sealed = seal_credentials(
            secret, sealing_key=self._inst.config_secrets_key.reveal(), tenant=tenant, key=name
        )
        salt, wrapped = await self._material.new_version(config, tenant=tenant, key=name, version=1)
        now = self._clock()
        try:
            async with self._db.write() as session:
                if await session.get(Tenant, tenant) is None:
                    raise NotFound(f"tenant {tenant!r} not found")
                if await self._key_row(session, tenant, name) is not None:
                    raise AlreadyExists(f"key {name!r} already exists in tenant {tenant!r}")
                row = Key(
                    tenant_id=tenant,
                    name=name,
                    provider_type=config.type,
                    provider_config=stored_config,
                    provider_secrets=sealed,
                    state=KeyState.ENABLED.value,
                    min_decryption_version=1,
                    rotation_period_days=rotation_period_days,
                    next_rotation_at=self._next_rotation(rotation_period_days, now),
                    created_at=now,
                    updated_at=now,
                )
                session.add(row)
                await session.flush()
                session.add(
                    KeyVersion(
                        key_id=row.id,
                        version=1,
                        state=VersionState.ENABLED.value,
                        version_salt=salt,
                        wrapped_secret=wrapped,
                        created_at=now,
                        state_changed_at=now,
                        destroy_at=None,
                        destroyed_at=None,
                    )
                )
                await session.flush()
                await self._audit(
                    session,
                    ctx,
                    "key.created",
                    tenant=tenant,
                    key=name,
                    version=1,
                    details={"provider": stored_config, "rotation_period_days": rotation_period_days},
                )
                meta = await self._load(session, tenant, name)
        except IntegrityError:
            raise AlreadyExists(f"key {name!r} already exists in tenant {tenant!r}") from None
        self._cache.invalidate(tenant, name)
        assert meta is not None
        return meta

    def _check_allowed(self, config: ProviderConfig) -> None:
        """Provider settings that reach into this host are limited to what the operator allowed."""
        module = getattr(config, "module_path", None) if config.type == "pkcs11" else None
        if module is not None and module not in self._pkcs11_modules:
            raise UnsupportedProvider(
                f"PKCS#11 module {module!r} is not allowed on this service "
                "(operator setting KMS_PKCS11_ALLOWED_MODULES)"
            )

    async def with_external_id(self, tenant: str, provider: dict[str, Any]) -> dict[str, Any]:
        """A customer's AWS key is reached with the ExternalId the service generated for the tenant:
        it is filled in here, never taken from the request."""
        if not is_customer_key(provider):
            return provider
        if "external_id" in provider:
            raise InvalidRequest(
                "external_id is generated by the service: omit it (see POST .../onboarding/aws)"
            )
        async with self._db.read() as session:
            row = await session.get(Tenant, tenant)
        if row is None:
            raise NotFound(f"tenant {tenant!r} not found")
        if row.aws_external_id is None:
            raise InvalidRequest(
                "tenant has not started AWS onboarding: POST /v1/tenants/{t}/onboarding/aws first".replace(
                    "{t}", tenant
                )
            )
        return {**provider, "external_id": row.aws_external_id}

    async def rotate(self, ctx: Actx, *, tenant: str, key: str) -> KeyMeta:
        async with self._db.write() as session:
            row = await self._locked_key_row(session, tenant, key)
            await self.rotate_locked(session, ctx, row, now=self._clock())
            meta = await self._load(session, tenant, key)
        self._cache.invalidate(tenant, key)
        assert meta is not None
        return meta

    async def rotate_locked(
        self, session: AsyncSession, ctx: Actx, row: Key, *, now: datetime, automatic: bool = False
    ) -> int:
        """Add version latest+1 to the key ``row``, which the caller holds locked in ``session``
        (the one rotation path of the API and the scheduler). Returns the new version."""
        tenant, key = row.tenant_id, row.name
        latest = await session.scalar(select(func.max(KeyVersion.version)).where(KeyVersion.key_id == row.id))
        version = int(latest or 0) + 1
        config = self._material.config_of(row.provider_config, row.provider_secrets, tenant=tenant, key=key)
        salt, wrapped = await self._material.new_version(config, tenant=tenant, key=key, version=version)
        session.add(
            KeyVersion(
                key_id=row.id,
                version=version,
                state=VersionState.ENABLED.value,
                version_salt=salt,
                wrapped_secret=wrapped,
                created_at=now,
                state_changed_at=now,
                destroy_at=None,
                destroyed_at=None,
            )
        )
        row.updated_at = now
        row.next_rotation_at = self._next_rotation(row.rotation_period_days, now)
        await session.flush()
        await self._audit(
            session,
            ctx,
            "key.rotated",
            tenant=tenant,
            key=key,
            version=version,
            details={"previous_version": version - 1, **({"automatic": True} if automatic else {})},
        )
        return version

    async def update(
        self, ctx: Actx, *, tenant: str, key: str, changes: dict[str, Any], force: bool = False
    ) -> KeyMeta:
        async with self._db.write() as session:
            row = await self._locked_key_row(session, tenant, key)
            latest = int(
                await session.scalar(select(func.max(KeyVersion.version)).where(KeyVersion.key_id == row.id))
                or 0
            )
            audit: dict[str, Any] = {}
            now = self._clock()
            if "min_decryption_version" in changes:
                value = changes["min_decryption_version"]
                if value > latest:
                    raise InvalidRequest(
                        f"min_decryption_version must be at most the latest version ({latest})"
                    )
                if value > row.min_decryption_version:
                    cut_off = await self.count_below(session, row.id, value)
                    if cut_off and not force:
                        raise WouldCutOffIds(
                            f"{cut_off} DEK id(s) were last derived under a version below {value}: "
                            "re-key them first, or repeat with force: true",
                            extra={"cut_off": cut_off},
                        )
                    if cut_off:
                        audit["cut_off"] = cut_off
                        audit["forced"] = True
                audit["min_decryption_version"] = {"from": row.min_decryption_version, "to": value}
                row.min_decryption_version = value
            if "rotation_period_days" in changes:
                value = changes["rotation_period_days"]
                audit["rotation_period_days"] = {"from": row.rotation_period_days, "to": value}
                row.rotation_period_days = value
                row.next_rotation_at = self._next_rotation(value, now)
            if not audit:
                raise InvalidRequest("nothing to update: give min_decryption_version or rotation_period_days")
            row.updated_at = now
            await session.flush()
            await self._audit(session, ctx, "key.updated", tenant=tenant, key=key, details=audit)
            meta = await self._load(session, tenant, key)
        self._cache.invalidate(tenant, key)
        assert meta is not None
        return meta

    async def transition(
        self,
        ctx: Actx,
        *,
        tenant: str,
        key: str,
        version: int,
        action: str,
        waiting_period_days: int | None = None,
    ) -> KeyMeta:
        allowed, target, audit_action = TRANSITIONS[action]
        if action != "schedule-destruction" and waiting_period_days is not None:
            raise InvalidRequest("waiting_period_days applies to schedule-destruction only")
        async with self._db.write() as session:
            row = await self._locked_key_row(session, tenant, key)
            ver = await session.get(KeyVersion, (row.id, version))
            if ver is None:
                raise NotFound(f"version {version} of key {key!r} not found")
            current = VersionState(ver.state)
            if current not in allowed:
                raise InvalidStateTransition(
                    f"version {version} is {current.value}; {action} needs "
                    + " or ".join(sorted(s.value for s in allowed))
                )
            now = self._clock()
            details: dict[str, Any] = {"from": current.value, "to": target.value}
            ver.state = target.value
            ver.state_changed_at = now
            if target is VersionState.SCHEDULED_FOR_DESTRUCTION:
                days = DEFAULT_DESTRUCTION_DAYS if waiting_period_days is None else waiting_period_days
                ver.destroy_at = now + timedelta(days=days)
                details["destroy_at"] = ver.destroy_at.isoformat()
            elif current is VersionState.SCHEDULED_FOR_DESTRUCTION:
                ver.destroy_at = None
            row.updated_at = now
            await session.flush()
            await self._audit(
                session, ctx, audit_action, tenant=tenant, key=key, version=version, details=details
            )
            meta = await self._load(session, tenant, key)
        self._cache.invalidate(tenant, key)
        assert meta is not None
        return meta

    # -- key-level state -------------------------------------------------------------------

    async def set_key_state(self, ctx: Actx, *, tenant: str, key: str, enabled: bool) -> KeyMeta:
        """Disable or enable the whole key: a disabled key derives and decrypts nothing, whatever
        its versions' states (they are kept and come back with ``enable``)."""
        target = KeyState.ENABLED if enabled else KeyState.DISABLED
        async with self._db.write() as session:
            row = await self._locked_key_row(session, tenant, key)
            current = KeyState(row.state)
            if current is target:
                raise InvalidStateTransition(f"key {key!r} is already {target.value}")
            row.state = target.value
            row.updated_at = self._clock()
            await session.flush()
            await self._audit(
                session,
                ctx,
                "key.enabled" if enabled else "key.disabled",
                tenant=tenant,
                key=key,
                details={"from": current.value, "to": target.value},
            )
            meta = await self._load(session, tenant, key)
        self._cache.invalidate(tenant, key)
        assert meta is not None
        return meta

    # -- re-key tracking ---------------------------------------------------------------------

    @staticmethod
    async def count_below(session: AsyncSession, key_id: int, version: int) -> int:
        """DEK ids of the key whose newest derived version is below ``version``."""
        count = await session.scalar(
            select(func.count()).where(DekUsage.key_id == key_id, DekUsage.version < version)
        )
        return int(count or 0)

    async def usage(self, tenant: str, key: str, *, limit: int) -> dict[str, Any]:
        """Re-key progress: ids per version, and the ids not yet on the primary version (oldest
        first, at most ``limit``)."""
        async with self._db.read() as session:
            row = await self._key_row(session, tenant, key)
            if row is None:
                raise NotFound(f"key {key!r} of tenant {tenant!r} not found")
            meta = await self._load(session, tenant, key)
            assert meta is not None
            counts = {
                int(v): int(n)
                for v, n in (
                    await session.execute(
                        select(DekUsage.version, func.count())
                        .where(DekUsage.key_id == row.id)
                        .group_by(DekUsage.version)
                    )
                ).all()
            }
            current = meta.primary_version or meta.latest_version
            old = (
                await session.execute(
                    select(DekUsage.purpose, DekUsage.dek_id, DekUsage.version, DekUsage.last_derived_at)
                    .where(DekUsage.key_id == row.id, DekUsage.version < current)
                    .order_by(DekUsage.version, DekUsage.last_derived_at, DekUsage.purpose, DekUsage.dek_id)
                    .limit(limit)
                )
            ).all()
        return {
            "primary_version": meta.primary_version,
            "versions": [
                {"version": v, "ids": counts.get(v, 0)} for v in sorted(set(meta.versions) | set(counts))
            ],
            "old_ids": [
                {
                    "purpose": r.purpose,
                    "id": r.dek_id,
                    "version": r.version,
                    "last_derived_at": r.last_derived_at,
                }
                for r in old
            ],
            "old_total": sum(n for v, n in counts.items() if v < current),
            "total": sum(counts.values()),
        }

    # -- scheduled work (kms_service.scheduler) ----------------------------------------------

    @staticmethod
    async def _claim_key(session: AsyncSession, where: ColumnElement[bool], skip: set[int]) -> Key | None:
        """One key row matching ``where``, locked; rows another transaction holds are skipped
        (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite's BEGIN IMMEDIATE already serialises)."""
        stmt = select(Key).where(where)
        if skip:
            stmt = stmt.where(Key.id.not_in(skip))
        stmt = stmt.order_by(Key.id).limit(1).with_for_update(skip_locked=True)
        return (await session.scalars(stmt)).one_or_none()

    async def rotate_due(self, now: datetime) -> Done:
        """Rotate every enabled key whose next_rotation_at has passed, once each (the claim and
        the rotation are one transaction under the key's row lock). Returns (tenant, key, new
        version) of each rotation made here."""
        due = and_(
            Key.state == KeyState.ENABLED.value,
            Key.next_rotation_at.is_not(None),
            Key.next_rotation_at <= now,
        )
        done: Done = []
        skip: set[int] = set()
        while True:
            claimed: tuple[str, str] | None = None
            try:
                async with self._db.write() as session:
                    row = await self._claim_key(session, due, skip)
                    if row is None:
                        return done
                    skip.add(row.id)
                    claimed = (row.tenant_id, row.name)
                    version = await self.rotate_locked(session, SCHEDULER_CTX, row, now=now, automatic=True)
            except (DatabaseUnavailable, AuditUnavailable):
                raise
            except ServiceError as exc:  # e.g. its provider is down: the next run retries it
                if claimed is None:
                    raise
                log.warning("automatic rotation of %s/%s failed: %s", *claimed, exc.code)
                continue
            self._cache.invalidate(*claimed)
            done.append((*claimed, version))

    async def destroy_due(self, now: datetime) -> Done:
        """Destroy every version scheduled for destruction whose destroy_at has passed: state
        ``destroyed``, version_salt and wrapped_secret erased (crypto-shredding), audited as
        system:scheduler. Each version exactly once: the state is re-read under the key's lock."""
        version_due = and_(
            KeyVersion.state == VersionState.SCHEDULED_FOR_DESTRUCTION.value,
            KeyVersion.destroy_at.is_not(None),
            KeyVersion.destroy_at <= now,
        )
        key_due = Key.id.in_(select(KeyVersion.key_id).where(version_due))
        done: Done = []
        skip: set[int] = set()
        while True:
            async with self._db.write() as session:
                row = await self._claim_key(session, key_due, skip)
                if row is None:
                    return done
                skip.add(row.id)
                tenant, key = row.tenant_id, row.name
                versions = (
                    await session.scalars(
                        select(KeyVersion)
                        .where(KeyVersion.key_id == row.id, version_due)
                        .order_by(KeyVersion.version)
                    )
                ).all()
                for ver in versions:
                    ver.state = VersionState.DESTROYED.value
                    ver.version_salt = None
                    ver.wrapped_secret = None
                    ver.destroyed_at = now
                    ver.state_changed_at = now
                row.updated_at = now
                await session.flush()
                for ver in versions:
                    assert ver.destroy_at is not None
                    await self._audit(
                        session,
                        SCHEDULER_CTX,
                        "key.version.destroyed",
                        tenant=tenant,
                        key=key,
                        version=ver.version,
                        details={
                            "from": VersionState.SCHEDULED_FOR_DESTRUCTION.value,
                            "to": VersionState.DESTROYED.value,
                            "destroy_at": ver.destroy_at.isoformat(),
                        },
                    )
            self._cache.invalidate(tenant, key)
            done += [(tenant, key, v.version) for v in versions]
