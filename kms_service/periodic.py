"""A background step run every `interval` seconds in each process (change feed, scheduler,
audit checkpoints). A failing step is logged once when it starts failing and once when it
recovers, and never stops the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class PeriodicTask:
    def __init__(self, name: str, interval: float, step: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.interval = interval
        self._step = step
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._step()
            except Exception as exc:
                if not failing:
                    log.warning("%s failed: %s", self.name, type(exc).__name__)
                failing = True
                continue
            if failing:
                log.info("%s recovered", self.name)
            failing = False
