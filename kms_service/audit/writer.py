"""Appending to the chain.

:func:`append_events` adds events inside the caller's transaction, so a change and its audit
record commit together or not at all. It locks the head row (``SELECT ... FOR UPDATE``), which
serialises appends across replicas and makes ``seq`` commit-ordered.

:class:`AuditBatcher` group-commits data-plane events: each request awaits its event's
durability (fail closed), but concurrent requests share one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from kms_service.audit.chain import GENESIS_HASH, EventDraft, event_document, link_hash
from kms_service.db.engine import Database
from kms_service.db.models import AuditEvent, AuditHead, ConfigChange
from kms_service.errors import AuditUnavailable

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Change:
    """A configuration change other replicas must see (cache invalidation)."""

    kind: str  # tenant | key | token
    tenant: str | None = None
    key: str | None = None
    token_id: str | None = None


async def append_events(
    session: AsyncSession,
    drafts: Sequence[EventDraft],
    *,
    audit_key: bytes,
    clock: Clock = utcnow,
    change: Change | None = None,
) -> list[int]:
    """Append ``drafts`` (and record ``change`` in the change feed) in the current transaction.

    Returns the assigned seqs. The caller commits; until then the head row stays locked. A
    failure to write raises AuditUnavailable (503): the caller's change must roll back with it.
    """
    try:
        return await _append_events(session, drafts, audit_key=audit_key, clock=clock, change=change)
    except SQLAlchemyError as exc:
        log.error("audit append failed: %s", type(exc).__name__)
        raise AuditUnavailable("the audit log cannot be written; nothing was changed") from exc


async def _append_events(
    session: AsyncSession,
    drafts: Sequence[EventDraft],
    *,
    audit_key: bytes,
    clock: Clock,
    change: Change | None,
) -> list[int]:
    head = (
        await session.execute(
            select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1).with_for_update()
        )
    ).one_or_none()
    seq, prev = (head.seq, head.hash) if head is not None else (0, GENESIS_HASH)
    now = clock()
    rows = []
    for draft in drafts:
        seq += 1
        doc = event_document(
            seq=seq,
            time=now,
            actor_type=draft.actor.type,
            actor_id=draft.actor.id,
            action=draft.action,
            tenant=draft.tenant,
            key=draft.key,
            version=draft.version,
            outcome=draft.outcome,
            request_id=draft.request_id,
            source=draft.source,
            details=draft.details,
            prev_hash=prev,
        )
        digest = link_hash(audit_key=audit_key, prev_hash=prev, document=doc)
        rows.append(
            {
                "seq": seq,
                "time": now,
                "actor_type": draft.actor.type,
                "actor_id": draft.actor.id,
                "action": draft.action,
                "tenant": draft.tenant,
                "key": draft.key,
                "version": draft.version,
                "outcome": draft.outcome,
                "request_id": draft.request_id,
                "source": draft.source,
                "details": doc["details"],
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    if not rows:
        return []
    await session.execute(insert(AuditEvent), rows)
    if head is None:
        await session.execute(insert(AuditHead).values(id=1, seq=seq, hash=prev))
    else:
        await session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=seq, hash=prev))
    if change is not None:
        await session.execute(
            insert(ConfigChange).values(
                seq=seq,
                kind=change.kind,
                tenant=change.tenant,
                key=change.key,
                token_id=change.token_id,
                created_at=now,
            )
        )
    return [int(r["seq"]) for r in rows]


class AuditBatcher:
    """Group commit for data-plane events. Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(
        self, db: Database, *, audit_key: bytes, max_events: int = 500, clock: Clock = utcnow
    ) -> None:
        self._db = db
        self._audit_key = audit_key
        self._max = max_events
        self._clock = clock
        self._queue: asyncio.Queue[tuple[EventDraft, asyncio.Future[int]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.commits = 0
        self.events = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-batcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(AuditUnavailable("the service is shutting down"))

    async def record(self, draft: EventDraft) -> int:
        """Append ``draft``; returns its seq once durable. Raises AuditUnavailable otherwise."""
        if self._task is None:
            raise AuditUnavailable("the audit writer is not running")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self._queue.put((draft, fut))
        return await fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [(d, f) for d, f in batch if not f.done()]
            if not live:
                continue
            try:
                async with self._db.write() as session:
                    seqs = await append_events(
                        session, [d for d, _ in live], audit_key=self._audit_key, clock=self._clock
                    )
            except asyncio.CancelledError:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(AuditUnavailable("the service is shutting down"))
                raise
            except Exception as exc:
                log.error("audit group commit of %d events failed: %s", len(live), type(exc).__name__)
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(AuditUnavailable())
                continue
            self.commits += 1
            self.events += len(live)
            for (_, fut), seq in zip(live, seqs, strict=True):
                if not fut.done():
                    fut.set_result(seq)
