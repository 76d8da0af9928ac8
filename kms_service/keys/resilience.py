"""Calling providers under failure: bounded retries with jittered backoff inside a deadline, and
a circuit breaker per provider connection.

Only `ProviderUnavailable` is retried (a refusal will not change by asking again). When a provider
has failed `failure_threshold` times in a row, its circuit opens: calls fail at once with
ProviderUnavailable (503 with Retry-After) for `reset_after` seconds, then one trial call is let
through (half-open); success closes the circuit. Clock and randomness are injectable for tests.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar, TypeVar

from providers import KeyProvider, ProviderHealth, ProviderInfo, ProviderUnavailable, WrapContext

T = TypeVar("T")


class CircuitOpen(ProviderUnavailable):
    """The provider failed repeatedly; calls are refused until `retry_after` seconds pass."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the key provider is failing; retrying after {retry_after:.0f} s")
        self.retry_after = retry_after


class ResilientProvider(KeyProvider):
    """Wraps a connected provider; the service only ever talks to providers through this."""

    type: ClassVar[str] = "resilient"

    def __init__(
        self,
        inner: KeyProvider,
        *,
        attempts: int = 3,
        deadline: float = 10.0,
        base_delay: float = 0.05,
        failure_threshold: int = 5,
        reset_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.inner = inner
        self.type = inner.type  # type: ignore[misc]
        self._attempts = attempts
        self._deadline = deadline
        self._base = base_delay
        self._threshold = failure_threshold
        self._reset_after = reset_after
        self._clock = clock
        self._jitter = jitter
        self._sleep = sleep
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    def __repr__(self) -> str:
        return f"ResilientProvider({self.inner!r}, state={self.state})"

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._clock() - self._opened_at >= self._reset_after else "open"

    def _admit(self) -> bool:
        """May a call go to the provider now? Returns whether it is the half-open trial."""
        if self._opened_at is None:
            return False
        waited = self._clock() - self._opened_at
        if waited < self._reset_after or self._trial_running:
            raise CircuitOpen(max(self._reset_after - waited, 1.0))
        self._trial_running = True
        return True

    def _record(self, ok: bool) -> None:
        if ok:
            self._failures = 0
            self._opened_at = None
            return
        self._failures += 1
        if self._failures >= self._threshold or self._opened_at is not None:
            self._opened_at = self._clock()

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            trial = self._admit()
            try:
                result = await fn()
            except ProviderUnavailable:
                self._record(ok=False)
                delay = self._base * (2 ** (attempt - 1)) * (0.5 + self._jitter())
                if trial or attempt >= self._attempts or self._clock() - start + delay >= self._deadline:
                    raise
                await self._sleep(delay)
                continue
            except Exception:
                # A refusal is an answer: the provider is reachable.
                self._record(ok=True)
                raise
            finally:
                if trial:
                    self._trial_running = False
            self._record(ok=True)
            return result

    async def wrap(self, secret: bytes, *, context: WrapContext) -> bytes:
        return await self._call(lambda: self.inner.wrap(secret, context=context))

    async def unwrap(self, blob: bytes, *, context: WrapContext) -> bytes:
        return await self._call(lambda: self.inner.unwrap(blob, context=context))

    async def describe(self) -> ProviderInfo:
        return await self._call(self.inner.describe)

    async def health(self) -> ProviderHealth:
        if self.state == "open":
            return ProviderHealth(ok=False, latency_ms=0.0, detail="circuit open after repeated failures")
        health = await self.inner.health()
        if health.ok and self.state != "closed":
            return ProviderHealth(ok=True, latency_ms=health.latency_ms, detail=f"circuit {self.state}")
        return health

    async def close(self) -> None:
        await self.inner.close()
