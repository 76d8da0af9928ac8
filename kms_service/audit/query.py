"""Reading the chain: filtered pages and export documents."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from kms_service.audit.chain import event_document
from kms_service.db.engine import Database
from kms_service.db.models import AuditEvent


def row_document(row: AuditEvent) -> dict[str, Any]:
    """The stored event as hashed: every field but its own hash."""
    return event_document(
        seq=row.seq,
        time=row.time,
        actor_type=row.actor_type,
        actor_id=row.actor_id,
        action=row.action,
        tenant=row.tenant,
        key=row.key,
        version=row.version,
        outcome=row.outcome,
        request_id=row.request_id,
        source=row.source,
        details=row.details,
        prev_hash=row.prev_hash,
    )


def export_document(row: AuditEvent) -> dict[str, Any]:
    """The stored event as exported: with its hash."""
    return row_document(row) | {"hash": row.hash.hex()}


async def list_events(
    db: Database, *, tenant: str | None, action: str | None, after_seq: int, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """A page of events in seq order, and the ``after_seq`` of the next page (None at the end)."""
    stmt = select(AuditEvent).where(AuditEvent.seq > after_seq)
    if tenant is not None:
        stmt = stmt.where(AuditEvent.tenant == tenant)
    if action is not None:
        stmt = stmt.where(AuditEvent.action == action)
    async with db.read() as session:
        rows = (await session.scalars(stmt.order_by(AuditEvent.seq).limit(limit + 1))).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [export_document(r) for r in rows], (rows[-1].seq if more else None)
