"""Cross-replica cache invalidation.

Every configuration change writes a `config_changes` row whose seq is its audit seq, assigned
under the audit head lock, so seqs become visible in order. Each process polls for rows past the
last seq it saw and drops the affected cache entries: a change made on one replica is honoured by
every other within the poll interval (default 0.5 s), at one small query per interval however
many keys and tokens are cached. KEK secrets are not dropped here: whether a version may be used is
decided by its (fresh) metadata, and a reload forgets the secrets of destroyed versions.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select

from kms_service.auth.tokens import TokenCache
from kms_service.db.engine import Database
from kms_service.db.models import ConfigChange
from kms_service.keys.cache import KeyMetaCache
from kms_service.periodic import PeriodicTask

log = logging.getLogger(__name__)


class ChangeFeed:
    def __init__(self, db: Database, *, interval: float, meta: KeyMetaCache, tokens: TokenCache) -> None:
        self._db = db
        self._meta = meta
        self._tokens = tokens
        self._last = 0
        self._periodic = PeriodicTask("change-feed", interval, self.poll_once)

    async def start(self) -> None:
        async with self._db.read() as session:
            self._last = int(await session.scalar(select(func.max(ConfigChange.seq))) or 0)
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def poll_once(self) -> int:
        async with self._db.read() as session:
            rows = (
                await session.execute(
                    select(
                        ConfigChange.seq,
                        ConfigChange.kind,
                        ConfigChange.tenant,
                        ConfigChange.key,
                        ConfigChange.token_id,
                    )
                    .where(ConfigChange.seq > self._last)
                    .order_by(ConfigChange.seq)
                    .limit(1000)
                )
            ).all()
        for row in rows:
            if row.kind == "token":
                self._tokens.invalidate_token(row.token_id)
            else:
                self._meta.invalidate(row.tenant, row.key)
            self._last = row.seq
        return len(rows)
