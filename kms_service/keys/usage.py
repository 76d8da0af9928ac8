"""Re-key tracking without a database write per request (DESIGN §4).

The data plane calls :meth:`UsageRecorder.record` after each successful derive; entries are
merged in memory, (tenant, key, purpose, id) -> (newest version, last time), and a background
task upserts them in batches — every ``interval`` seconds, or at once when ``max_items`` are
pending — with ``INSERT ... ON CONFLICT DO UPDATE`` (SQLite and PostgreSQL). The upsert keeps
the newer of the stored and the buffered values, so replicas flushing in any order converge.

Semantics of a row: ``version`` is the newest version the id has been derived under (an agent
that re-keyed to v3 and still unlocks its old v2 keyslot counts as on v3); ``last_derived_at``
is its most recent derive. What the buffer of a replica holds is lost if the process dies
before its next flush: the table is an operator's progress view, not a security control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from kms_service.audit.writer import Clock, utcnow
from kms_service.db.engine import Database
from kms_service.db.models import DekUsage, Key

log = logging.getLogger(__name__)

UsageKey = tuple[str, str, str, str]  # tenant, key, purpose, id
CHUNK = 500  # rows per statement (5 parameters a row; well under SQLite's variable limit)


class UsageRecorder:
    def __init__(self, db: Database, *, interval: float, max_items: int, clock: Clock = utcnow) -> None:
        self._db = db
        self._interval = interval
        self._max = max_items
        self._clock = clock
        self._pending: dict[UsageKey, tuple[int, datetime]] = {}
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0
        self.rows = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, tenant: str, key: str, purpose: str, dek_id: str, version: int) -> None:
        self._merge((tenant, key, purpose, dek_id), version, self._clock())
        if len(self._pending) >= self._max:
            self._wake.set()

    def _merge(self, item: UsageKey, version: int, at: datetime) -> None:
        old = self._pending.get(item)
        if old is not None:
            version, at = max(version, old[0]), max(at, old[1])
        self._pending[item] = (version, at)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-flusher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.flush()
        except Exception as exc:  # shutting down: what is left is lost (see module doc)
            log.warning("last usage flush failed: %s", type(exc).__name__)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # kept in the buffer; the next flush retries
                log.warning("usage flush failed: %s", type(exc).__name__)

    async def flush(self) -> int:
        """Write what is pending now; returns the number of rows upserted."""
        async with self._flush_lock:
            batch, self._pending = self._pending, {}
            if not batch:
                return 0
            try:
                written = await self._write(batch)
            except BaseException:
                for item, (version, at) in batch.items():
                    self._merge(item, version, at)
                raise
            self.flushes += 1
            self.rows += written
            return written

    async def _write(self, batch: dict[UsageKey, tuple[int, datetime]]) -> int:
        names = sorted({(t, k) for t, k, _, _ in batch})
        insert = pg_insert if self._db.dialect == "postgresql" else sqlite_insert
        written = 0
        async with self._db.write() as session:
            ids: dict[tuple[str, str], int] = {}
            for i in range(0, len(names), CHUNK):
                part = names[i : i + CHUNK]
                rows = await session.execute(
                    select(Key.id, Key.tenant_id, Key.name).where(
                        or_(*(and_(Key.tenant_id == t, Key.name == k) for t, k in part))
                    )
                )
                ids.update({(r.tenant_id, r.name): r.id for r in rows})
            values: list[dict[str, Any]] = [
                {
                    "key_id": ids[(t, k)],
                    "purpose": purpose,
                    "dek_id": dek_id,
                    "version": version,
                    "last_derived_at": at,
                }
                for (t, k, purpose, dek_id), (version, at) in sorted(batch.items())
                if (t, k) in ids
            ]
            for i in range(0, len(values), CHUNK):
                stmt = insert(DekUsage).values(values[i : i + CHUNK])
                new = stmt.excluded
                stmt = stmt.on_conflict_do_update(
                    index_elements=[DekUsage.key_id, DekUsage.purpose, DekUsage.dek_id],
                    set_={
                        "version": case(
                            (new.version > DekUsage.version, new.version), else_=DekUsage.version
                        ),
                        "last_derived_at": case(
                            (new.last_derived_at > DekUsage.last_derived_at, new.last_derived_at),
                            else_=DekUsage.last_derived_at,
                        ),
                    },
                )
                await session.execute(stmt)
                written += len(values[i : i + CHUNK])
        return written
