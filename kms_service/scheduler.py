"""Scheduled lifecycle work, run by every replica (DESIGN §4, §7).

Each run destroys the versions whose destruction is due (crypto-shredding) and rotates the keys
whose ``next_rotation_at`` has passed. Work is claimed one key at a time with a row lock that
skips keys another transaction holds (PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite
the ``BEGIN IMMEDIATE`` write transaction serialises), and the due condition is re-checked under
that lock in the same transaction as the change and its audit event (actor system:scheduler), so
each due item is acted on exactly once however many replicas run. The clock is injectable and
:meth:`Scheduler.run_once` runs one pass, so tests move time instead of sleeping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kms_service.audit.writer import Clock, utcnow
from kms_service.keys.service import Done, KeyService
from kms_service.periodic import PeriodicTask

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunResult:
    destroyed: Done = field(default_factory=list)
    rotated: Done = field(default_factory=list)


class Scheduler:
    def __init__(self, keys: KeyService, *, interval: float, clock: Clock = utcnow) -> None:
        self._keys = keys
        self.clock = clock
        self._periodic = PeriodicTask("scheduler", interval, self.run_once)
        self.runs = 0

    async def run_once(self) -> RunResult:
        now = self.clock()
        destroyed = await self._keys.destroy_due(now)
        rotated = await self._keys.rotate_due(now)
        self.runs += 1
        for tenant, key, version in destroyed:
            log.info("destroyed version %d of %s/%s", version, tenant, key)
        for tenant, key, version in rotated:
            log.info("rotated %s/%s to version %d", tenant, key, version)
        return RunResult(destroyed=destroyed, rotated=rotated)

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
