"""Provider failures: bounded, jittered retries inside a deadline; a circuit breaker; 503 with
Retry-After through the API — never a fallback to another key."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

import providers.registry
from kms_service.keys.resilience import CircuitOpen, ResilientProvider
from providers import ProviderAccessDenied, ProviderUnavailable
from tests.conftest import Api
from tests.credential_provider import FlakyProvider, Switch

CTX = {"tenant": "t", "key": "k", "version": "1"}


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def switch() -> Iterator[type[Switch]]:
    Switch.down, Switch.calls = False, 0
    yield Switch
    Switch.down, Switch.calls = False, 0


def resilient(t: FakeTime, **kw: float) -> ResilientProvider:
    opts: dict[str, float] = {
        "attempts": 3,
        "deadline": 10.0,
        "failure_threshold": 5,
        "reset_after": 30.0,
    } | kw
    return ResilientProvider(
        FlakyProvider(bytes(32)),
        clock=t.clock,
        sleep=t.sleep,
        jitter=lambda: 0.5,
        attempts=int(opts["attempts"]),
        deadline=opts["deadline"],
        failure_threshold=int(opts["failure_threshold"]),
        reset_after=opts["reset_after"],
    )


async def test_retries_are_bounded_with_backoff() -> None:
    t = FakeTime()
    p = resilient(t)
    Switch.down = True
    with pytest.raises(ProviderUnavailable):
        await p.wrap(b"x" * 32, context=CTX)
    assert Switch.calls == 3
    assert t.sleeps == [0.05, 0.1]  # base * 2^n * (0.5 + jitter)


async def test_retries_stop_at_the_deadline() -> None:
    t = FakeTime()
    p = resilient(t, attempts=10, deadline=0.2)
    Switch.down = True
    with pytest.raises(ProviderUnavailable):
        await p.wrap(b"x" * 32, context=CTX)
    assert sum(t.sleeps) < 0.2
    assert Switch.calls < 10


async def test_a_transient_failure_is_absorbed() -> None:
    t = FakeTime()
    p = resilient(t)
    blob = await p.wrap(b"x" * 32, context=CTX)
    calls = 0

    async def once_down(blob: bytes, *, context: dict[str, str]) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ProviderUnavailable("blip")
        return await FlakyProvider(bytes(32)).unwrap(blob, context=context)

    p.inner.unwrap = once_down  # type: ignore[method-assign]
    assert await p.unwrap(blob, context=CTX) == b"x" * 32
    assert calls == 2


async def test_refusals_are_not_retried() -> None:
    t = FakeTime()
    p = resilient(t)
    calls = 0

    async def refuse(secret: bytes, *, context: dict[str, str]) -> bytes:
        nonlocal calls
        calls += 1
        raise ProviderAccessDenied("no")

    p.inner.wrap = refuse  # type: ignore[method-assign]
    with pytest.raises(ProviderAccessDenied):
        await p.wrap(b"x" * 32, context=CTX)
    assert calls == 1
    assert p.state == "closed"


async def test_circuit_opens_then_half_opens_then_closes() -> None:
    t = FakeTime()
    p = resilient(t, attempts=1, failure_threshold=3, reset_after=30)
    Switch.down = True
    for _ in range(3):
        with pytest.raises(ProviderUnavailable):
            await p.wrap(b"x" * 32, context=CTX)
    assert p.state == "open"
    calls = Switch.calls
    with pytest.raises(CircuitOpen) as err:
        await p.wrap(b"x" * 32, context=CTX)
    assert Switch.calls == calls  # refused without calling the provider
    assert 1 <= err.value.retry_after <= 30
    t.now += 30
    assert p.state == "half-open"
    with pytest.raises(ProviderUnavailable):  # the trial fails: open again
        await p.wrap(b"x" * 32, context=CTX)
    assert p.state == "open"
    t.now += 30
    Switch.down = False
    await p.wrap(b"x" * 32, context=CTX)  # the trial succeeds: closed
    assert p.state == "closed"


@pytest.fixture
def flaky_type() -> Iterator[None]:
    providers.registry._CONFIGS["test-flaky"] = "tests.credential_provider:FlakyProviderConfig"
    yield
    del providers.registry._CONFIGS["test-flaky"]


@pytest.mark.expect_5xx
async def test_unreachable_provider_is_503_with_retry_after(api: Api, flaky_type: None) -> None:
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    r = await api.post("/v1/tenants/acme/keys", {"name": "cloud", "provider": {"type": "test-flaky"}})
    assert r.status_code == 201, r.text
    pt = base64.b64encode(b"secret").decode()
    ct = (await api.post("/v1/tenants/acme/keys/cloud/encrypt", {"plaintext": pt})).json()["ciphertext"]
    Switch.down = True
    api.services.kek_cache.clear()  # the cached KEK secret expired
    r = await api.post("/v1/tenants/acme/keys/cloud/decrypt", {"ciphertext": ct})
    assert r.status_code == 503
    assert r.json()["code"] == "provider_unavailable"
    assert int(r.headers["Retry-After"]) >= 1
    r = await api.post("/v1/tenants/acme/keys/cloud/derive", {"id": "vol-1"})
    assert r.status_code == 503  # never a fallback to another key
    # Repeated failures open the circuit: later calls are refused without reaching the provider.
    for _ in range(5):
        await api.post("/v1/tenants/acme/keys/cloud/derive", {"id": "vol-1"})
    calls = Switch.calls
    r = await api.post("/v1/tenants/acme/keys/cloud/derive", {"id": "vol-1"})
    assert r.status_code == 503
    assert Switch.calls == calls
    assert "retrying after" in r.json()["detail"]
    health = (await api.http.get("/v1/sys/health")).json()
    flaky = [p for p in health["providers"] if p["type"] == "test-flaky"]
    assert flaky
    assert flaky[0]["ok"] is False
    assert health["status"] == "degraded"
