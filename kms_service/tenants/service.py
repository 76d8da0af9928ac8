"""Tenants: the unit of isolation. Every key and agent token belongs to one."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from kms_service.audit.chain import EventDraft
from kms_service.audit.writer import Change, Clock, append_events, utcnow
from kms_service.db.engine import Database
from kms_service.db.models import Tenant
from kms_service.errors import AlreadyExists, NotFound
from kms_service.master import Installation
from kms_service.request import Actx


class TenantService:
    def __init__(self, db: Database, installation: Installation, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._inst = installation
        self._clock = clock

    async def create(self, ctx: Actx, *, tenant_id: str, name: str) -> Tenant:
        try:
            async with self._db.write() as session:
                if await session.get(Tenant, tenant_id) is not None:
                    raise AlreadyExists(f"tenant {tenant_id!r} already exists")
                row = Tenant(id=tenant_id, name=name, created_at=self._clock())
                session.add(row)
                await session.flush()
                await append_events(
                    session,
                    [
                        EventDraft(
                            action="tenant.created",
                            actor=ctx.actor,
                            tenant=tenant_id,
                            request_id=ctx.meta.request_id,
                            source=ctx.meta.source,
                            details={"name": name},
                        )
                    ],
                    audit_key=self._inst.audit_key.reveal(),
                    clock=self._clock,
                    change=Change(kind="tenant", tenant=tenant_id),
                )
        except IntegrityError:
            raise AlreadyExists(f"tenant {tenant_id!r} already exists") from None
        return row

    async def get(self, tenant_id: str) -> Tenant:
        async with self._db.read() as session:
            row = await session.get(Tenant, tenant_id)
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        return row

    async def list(self) -> list[Tenant]:
        async with self._db.read() as session:
            return list((await session.scalars(select(Tenant).order_by(Tenant.id))).all())
