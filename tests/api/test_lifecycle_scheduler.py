"""Issue 4: key-level disable/enable, destruction execution, the scheduler (automatic rotation and
due destructions, exactly once across replicas) and re-key tracking, on SQLite and PostgreSQL.

Time is moved by giving each replica's scheduler a clock ahead of the wall clock; nothing sleeps
for a due date.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

from sqlalchemy import text

from kms_service.audit.writer import utcnow
from kms_service.install import InitResult
from kms_service.settings import Settings
from tests.api.test_keys_and_dataplane import (
    DERIVE,
    KEY,
    KP,
    TENANT,
    audit_events,
    b64,
    expected_dek,
    mint,
    ok,
    parse_time,
    patch,
    poll,
    problem,
    replica,
    version_of,
)
from tests.conftest import Api


def ahead(days: float) -> Any:
    """A scheduler clock ``days`` ahead of the wall clock."""
    return lambda: utcnow() + timedelta(days=days)


async def version_row(api: Api, version: int, key: str = KEY) -> dict[str, Any]:
    async with api.services.db.engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT kv.state, kv.version_salt, kv.wrapped_secret, kv.destroyed_at "
                    "FROM key_versions kv JOIN keys k ON k.id = kv.key_id "
                    "WHERE k.tenant_id = :t AND k.name = :k AND kv.version = :v"
                ),
                {"t": TENANT, "k": key, "v": version},
            )
        ).one()
    return dict(row._mapping)


async def verify_chain(api: Api) -> dict[str, Any]:
    result = ok(await api.get("/v1/audit/verify"))
    assert result["valid"] is True and result["first_invalid_seq"] is None, result
    return result


# -- key-level disable / enable ----------------------------------------------------------------


async def test_disabled_key_derives_and_decrypts_nothing(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    op_id, op = await mint(api, "operator")
    ct = ok(await api.post(f"{KP}/encrypt", {"plaintext": b64(b"hello")}, token=agent))["ciphertext"]
    ok(await api.post(DERIVE, {"id": "vol"}, token=agent))

    key = ok(await api.post(f"{KP}/disable", {"reason": "incident 42"}, token=op))
    assert key["state"] == "disabled"
    assert version_of(key, 1)["state"] == "enabled"  # versions keep their own state
    assert ok(await api.get(KP))["state"] == "disabled"
    problem(await api.post(DERIVE, {"id": "vol"}, token=agent), 409, "key_disabled")
    problem(await api.post(DERIVE, {"id": "vol", "version": 1}, token=agent), 409, "key_disabled")
    problem(await api.post(f"{KP}/decrypt", {"ciphertext": ct}, token=agent), 409, "key_disabled")
    problem(await api.post(f"{KP}/rewrap", {"ciphertext": ct}, token=agent), 409, "key_disabled")
    problem(await api.post(f"{KP}/encrypt", {"plaintext": b64(b"x")}, token=agent), 409, "key_disabled")
    problem(await api.post(f"{KP}/datakey", {}, token=agent), 409, "key_disabled")
    batch = ok(await api.post(DERIVE, {"batch": [{"id": "a"}, {"id": "b"}]}, token=agent))
    assert [r["error"]["code"] for r in batch["results"]] == ["key_disabled", "key_disabled"]
    problem(await api.post(f"{KP}/disable", {}, token=op), 409, "invalid_state_transition")
    problem(await api.post(f"{KP}/disable", {}, token=agent), 403, "forbidden")
    problem(await api.post(f"{KP}/disable", {"reason": 5}, token=op), 400, "invalid_request")
    problem(await api.post(f"{KP}/disable", {"nope": 1}, token=op), 400, "invalid_request")
    problem(await api.post(f"/v1/tenants/{TENANT}/keys/missing/disable", {}, token=op), 404, "not_found")

    key = ok(await api.post(f"{KP}/enable", {"reason": "resolved"}, token=op))
    assert key["state"] == "enabled"
    problem(await api.post(f"{KP}/enable", {}, token=op), 409, "invalid_state_transition")
    got = ok(await api.post(DERIVE, {"id": "vol"}, token=agent))
    assert got["key"] == await expected_dek(api, 1, "vol")
    assert ok(await api.post(f"{KP}/decrypt", {"ciphertext": ct}, token=agent))["plaintext"] == b64(b"hello")

    events = [
        e for e in await audit_events(api, tenant=TENANT) if e["action"] in {"key.disabled", "key.enabled"}
    ]
    assert [(e["action"], e["details"].get("reason"), e["actor"]["id"]) for e in events] == [
        ("key.disabled", "incident 42", op_id),
        ("key.enabled", "resolved", op_id),
    ]
    assert events[0]["details"]["from"] == "enabled" and events[0]["details"]["to"] == "disabled"
    await verify_chain(api)


async def test_key_disable_is_honoured_by_another_replica(settings: Settings, installed: InitResult) -> None:
    assert installed.admin_token is not None
    async with (
        replica(settings, installed.admin_token, "198.51.100.31") as a,
        replica(settings, installed.admin_token, "198.51.100.32") as b,
    ):
        await a.tenant_and_key()
        agent = await a.agent_token()
        ok(await b.post(DERIVE, {"id": "vol"}, token=agent))  # cached on b
        ok(await a.post(f"{KP}/disable", {"reason": "stop"}))
        r, _ = await poll(lambda: b.post(DERIVE, {"id": "vol"}, token=agent), lambda r: r.status_code == 409)
        problem(r, 409, "key_disabled")


# -- destruction execution ---------------------------------------------------------------------


async def test_due_destruction_shreds_the_version_exactly_once(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    _, op = await mint(api, "operator")
    ct1 = ok(await api.post(f"{KP}/encrypt", {"plaintext": b64(b"v1 data")}, token=agent))["ciphertext"]
    ok(await api.post(DERIVE, {"id": "vol", "version": 1}, token=agent))  # v1's secret is now cached
    assert api.services.kek_cache.get((TENANT, KEY, 1))[0]
    ok(await api.post(f"{KP}/rotate", {"reason": "v2"}, token=op))
    key = ok(
        await api.post(
            f"{KP}/versions/1/schedule-destruction", {"reason": "retire", "waiting_period_days": 7}, token=op
        )
    )
    destroy_at = parse_time(version_of(key, 1)["destroy_at"])
    scheduler = api.services.scheduler

    scheduler.clock = lambda: destroy_at - timedelta(seconds=1)
    assert (await scheduler.run_once()).destroyed == []
    before = await version_row(api, 1)
    assert before["state"] == "scheduled_for_destruction" and before["version_salt"] is not None

    scheduler.clock = lambda: destroy_at + timedelta(seconds=1)
    assert (await scheduler.run_once()).destroyed == [(TENANT, KEY, 1)]
    assert (await scheduler.run_once()).destroyed == []  # exactly once

    row = await version_row(api, 1)
    assert row["state"] == "destroyed"
    assert row["version_salt"] is None and row["wrapped_secret"] is None  # crypto-shredded
    assert row["destroyed_at"] is not None
    after = await version_row(api, 2)
    assert after["state"] == "enabled" and after["version_salt"] is not None

    assert version_of(ok(await api.get(KP)), 1)["state"] == "destroyed"
    # A destroyed version never derives or decrypts: 409 key_version_disabled, naming the state.
    body = problem(
        await api.post(DERIVE, {"id": "vol", "version": 1}, token=agent), 409, "key_version_disabled"
    )
    assert "destroyed" in body["detail"]
    problem(await api.post(f"{KP}/decrypt", {"ciphertext": ct1}, token=agent), 409, "key_version_disabled")
    problem(await api.post(f"{KP}/rewrap", {"ciphertext": ct1}, token=agent), 409, "key_version_disabled")
    assert not api.services.kek_cache.get((TENANT, KEY, 1))[0]  # the cached secret was forgotten
    for action in ("enable", "disable", "restore", "schedule-destruction"):
        problem(await api.post(f"{KP}/versions/1/{action}", {}, token=op), 409, "invalid_state_transition")
    assert ok(await api.post(DERIVE, {"id": "vol"}, token=agent))["version"] == 2

    [event] = [e for e in await audit_events(api, tenant=TENANT) if e["action"] == "key.version.destroyed"]
    assert event["actor"] == {"type": "system", "id": "scheduler"}
    assert event["version"] == 1 and event["key"] == KEY and event["outcome"] == "success"
    assert event["details"]["from"] == "scheduled_for_destruction" and event["details"]["to"] == "destroyed"
    await verify_chain(api)


async def test_restored_version_is_not_destroyed(api: Api) -> None:
    await api.tenant_and_key()
    ok(await api.post(f"{KP}/rotate", {}))
    ok(await api.post(f"{KP}/versions/1/schedule-destruction", {"waiting_period_days": 7}))
    ok(await api.post(f"{KP}/versions/1/restore", {}))
    api.services.scheduler.clock = ahead(30)
    assert (await api.services.scheduler.run_once()).destroyed == []
    row = await version_row(api, 1)
    assert row["state"] == "disabled" and row["version_salt"] is not None


# -- automatic rotation ------------------------------------------------------------------------


async def test_automatic_rotation_when_due(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    key = ok(await patch(api, KP, {"rotation_period_days": 30}))
    due = parse_time(key["next_rotation_at"])
    ok(await api.post(f"/v1/tenants/{TENANT}/keys", {"name": "never", "provider": {"type": "local"}}), 201)
    scheduler = api.services.scheduler

    scheduler.clock = lambda: due - timedelta(seconds=1)
    assert (await scheduler.run_once()).rotated == []
    scheduler.clock = lambda: due + timedelta(seconds=1)
    assert (await scheduler.run_once()).rotated == [(TENANT, KEY, 2)]
    assert (await scheduler.run_once()).rotated == []

    key = ok(await api.get(KP))
    assert key["primary_version"] == 2 and key["latest_version"] == 2
    assert parse_time(key["next_rotation_at"]) == due + timedelta(seconds=1) + timedelta(days=30)
    assert ok(await api.get(f"/v1/tenants/{TENANT}/keys/never"))["latest_version"] == 1
    assert ok(await api.post(DERIVE, {"id": "vol"}, token=agent)) == {
        "key": await expected_dek(api, 2, "vol"),
        "version": 2,
        "latest_version": 2,
    }
    [event] = [e for e in await audit_events(api, tenant=TENANT) if e["action"] == "key.rotated"]
    assert event["actor"] == {"type": "system", "id": "scheduler"}
    assert event["details"] == {"previous_version": 1, "automatic": True}

    # A disabled key is not rotated while disabled.
    ok(await api.post(f"{KP}/disable", {}))
    scheduler.clock = ahead(400)
    assert (await scheduler.run_once()).rotated == []
    ok(await api.post(f"{KP}/enable", {}))
    assert (await scheduler.run_once()).rotated == [(TENANT, KEY, 3)]
    await verify_chain(api)


async def test_scheduler_acts_exactly_once_across_replicas(settings: Settings, installed: InitResult) -> None:
    assert installed.admin_token is not None
    async with (
        replica(settings, installed.admin_token, "198.51.100.41") as a,
        replica(settings, installed.admin_token, "198.51.100.42") as b,
        replica(settings, installed.admin_token, "198.51.100.43") as c,
    ):
        ok(await a.post("/v1/tenants", {"id": TENANT, "name": "Acme"}), 201)
        names = [f"k{i}" for i in range(6)]
        for name in names:
            body = {"name": name, "provider": {"type": "local"}, "rotation_period_days": 1}
            ok(await a.post(f"/v1/tenants/{TENANT}/keys", body), 201)
            ok(await a.post(f"/v1/tenants/{TENANT}/keys/{name}/rotate", {}))
            path = f"/v1/tenants/{TENANT}/keys/{name}/versions/1/schedule-destruction"
            ok(await a.post(path, {"waiting_period_days": 7}))
        for r in (a, b, c):
            r.services.scheduler.clock = ahead(8)
        runs = await asyncio.gather(*(r.services.scheduler.run_once() for r in (a, b, c, a, b, c)))
        rotated = Counter((t, k) for run in runs for t, k, _ in run.rotated)
        destroyed = Counter((t, k, v) for run in runs for t, k, v in run.destroyed)
        assert rotated == Counter({(TENANT, n): 1 for n in names})
        assert destroyed == Counter({(TENANT, n, 1): 1 for n in names})
        for name in names:
            key = ok(await b.get(f"/v1/tenants/{TENANT}/keys/{name}"))
            assert key["latest_version"] == 3 and version_of(key, 1)["state"] == "destroyed"
        events = await audit_events(a, tenant=TENANT)
        by_scheduler = Counter(
            (e["action"], e["key"]) for e in events if e["actor"] == {"type": "system", "id": "scheduler"}
        )
        assert by_scheduler == Counter(
            {**{("key.rotated", n): 1 for n in names}, **{("key.version.destroyed", n): 1 for n in names}}
        )
        await verify_chain(c)


# -- re-key tracking ---------------------------------------------------------------------------


async def usage(api: Api, token: str | None = None, **params: Any) -> dict[str, Any]:
    return ok(await api.get(f"{KP}/usage", token=token, params=params))


async def test_usage_is_buffered_then_flushed_in_batches(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    _, auditor = await mint(api, "auditor")
    recorder = api.services.usage
    await recorder.stop()  # no background flushes: this test decides when to flush
    flushes = recorder.flushes
    for i in range(20):
        ok(await api.post(DERIVE, {"id": f"vol-{i}"}, token=agent))
    batch = [{"id": f"vol-{i}", "purpose": "luks"} for i in range(5)]
    ok(await api.post(DERIVE, {"batch": batch}, token=agent))
    problem(
        await api.post(DERIVE, {"id": "bad", "version": 7}, token=agent), 404, "not_found"
    )  # not recorded
    assert recorder.pending == 25 and recorder.flushes == flushes
    assert (await usage(api, auditor))["total"] == 0  # nothing written per request
    assert await recorder.flush() == 25 and recorder.flushes == flushes + 1

    body = await usage(api, auditor)
    assert body["total"] == 25 and body["old_total"] == 0 and body["old_ids"] == []
    assert body["versions"] == [{"version": 1, "ids": 25}] and body["primary_version"] == 1

    ok(await api.post(f"{KP}/rotate", {}))
    for i in range(3):  # three volumes re-keyed to v2; then one of them unlocks its old slot again
        ok(await api.post(DERIVE, {"id": f"vol-{i}"}, token=agent))
    ok(await api.post(DERIVE, {"id": "vol-0", "version": 1}, token=agent))
    assert await recorder.flush() == 3
    body = await usage(api)
    assert body["versions"] == [{"version": 1, "ids": 22}, {"version": 2, "ids": 3}]
    assert body["total"] == 25 and body["old_total"] == 22
    assert len(body["old_ids"]) == 22
    assert {(o["purpose"], o["id"]) for o in body["old_ids"]} == {
        *(("volume", f"vol-{i}") for i in range(3, 20)),
        *(("luks", f"vol-{i}") for i in range(5)),
    }
    assert all(o["version"] == 1 for o in body["old_ids"])
    assert len((await usage(api, limit=5))["old_ids"]) == 5
    problem(await api.get(f"{KP}/usage", params={"limit": 0}), 400, "invalid_request")
    problem(await api.get(f"{KP}/usage", token=agent), 403, "forbidden")
    problem(await api.get(f"/v1/tenants/{TENANT}/keys/nope/usage"), 404, "not_found")


async def test_background_flusher_and_upsert_keeps_the_newest(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    ok(await api.post(DERIVE, {"id": "vol"}, token=agent))
    r, _ = await poll(lambda: api.get(f"{KP}/usage"), lambda r: r.json()["total"] == 1)
    first = ok(r)
    assert first["versions"] == [{"version": 1, "ids": 1}]
    ok(await api.post(f"{KP}/rotate", {}))
    ok(await api.post(DERIVE, {"id": "vol"}, token=agent))
    r, _ = await poll(lambda: api.get(f"{KP}/usage"), lambda r: r.json()["versions"][-1]["ids"] == 1)
    assert ok(r)["versions"] == [{"version": 1, "ids": 0}, {"version": 2, "ids": 1}]
    # An older derive flushed later (another replica's buffer) does not move the id back.
    recorder = api.services.usage
    ok(await api.post(DERIVE, {"id": "vol", "version": 1}, token=agent))
    await recorder.flush()
    assert (await usage(api))["versions"] == [{"version": 1, "ids": 0}, {"version": 2, "ids": 1}]


async def test_min_decryption_version_refuses_to_cut_off_ids(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    op_id, op = await mint(api, "operator")
    for i in range(4):
        ok(await api.post(DERIVE, {"id": f"vol-{i}"}, token=agent))
    ok(await api.post(f"{KP}/rotate", {}, token=op))
    ok(await api.post(DERIVE, {"id": "vol-0"}, token=agent))  # buffered only: PATCH flushes first

    body = problem(await patch(api, KP, {"min_decryption_version": 2}, token=op), 409, "would_cut_off_ids")
    assert body["cut_off"] == 3 and "3" in body["detail"]
    assert ok(await api.get(KP))["min_decryption_version"] == 1
    problem(
        await patch(api, KP, {"min_decryption_version": 2, "force": "yes"}, token=op), 400, "invalid_request"
    )
    problem(await patch(api, KP, {"force": True}, token=op), 400, "invalid_request")  # nothing to update

    key = ok(await patch(api, KP, {"min_decryption_version": 2, "force": True}, token=op))
    assert key["min_decryption_version"] == 2
    [event] = [e for e in await audit_events(api, tenant=TENANT) if e["action"] == "key.updated"]
    assert event["details"]["cut_off"] == 3 and event["details"]["forced"] is True
    assert event["actor"]["id"] == op_id

    # Nothing to cut off: no force needed; lowering it never needs force.
    ok(await api.post(f"/v1/tenants/{TENANT}/keys", {"name": "fresh"}, token=op), 201)
    fresh = f"/v1/tenants/{TENANT}/keys/fresh"
    ok(await api.post(f"{fresh}/rotate", {}, token=op))
    assert ok(await patch(api, fresh, {"min_decryption_version": 2}, token=op))["min_decryption_version"] == 2
    assert ok(await patch(api, KP, {"min_decryption_version": 1}, token=op))["min_decryption_version"] == 1


# -- concurrent rotation across replicas ---------------------------------------------------------


async def test_concurrent_rotations_on_three_replicas(settings: Settings, installed: InitResult) -> None:
    """300 rotate calls spread over three replicas at once: versions 2..301, each exactly once,
    committed in order, and the audit chain still verifies."""
    assert installed.admin_token is not None
    async with (
        replica(settings, installed.admin_token, "198.51.100.51") as a,
        replica(settings, installed.admin_token, "198.51.100.52") as b,
        replica(settings, installed.admin_token, "198.51.100.53") as c,
    ):
        await a.tenant_and_key()
        replicas = (a, b, c)
        responses = await asyncio.gather(
            *(replicas[i % 3].post(f"{KP}/rotate", {"reason": f"r{i}"}) for i in range(300))
        )
        made = sorted(ok(r)["latest_version"] for r in responses)
        assert made == list(range(2, 302))  # no duplicates, no gaps
        key = ok(await c.get(KP))
        assert [v["version"] for v in key["versions"]] == list(range(1, 302))
        assert key["primary_version"] == 301
        rotated = [e for e in await audit_events(b, tenant=TENANT) if e["action"] == "key.rotated"]
        assert [e["version"] for e in rotated] == list(range(2, 302))  # seq order = version order
        assert sorted(e["details"]["reason"] for e in rotated) == sorted(f"r{i}" for i in range(300))
        await verify_chain(a)


async def test_every_replica_runs_the_scheduler_in_its_lifespan(
    settings: Settings, installed: InitResult
) -> None:
    assert installed.admin_token is not None
    fast = settings.model_copy(update={"scheduler_interval_seconds": 0.05})
    async with replica(fast, installed.admin_token, "198.51.100.61") as a:
        await a.tenant_and_key()
        ok(await a.post(f"{KP}/rotate", {}))
        ok(await a.post(f"{KP}/versions/1/schedule-destruction", {"waiting_period_days": 7}))
        assert version_of(ok(await a.get(KP)), 1)["state"] == "scheduled_for_destruction"
        a.services.scheduler.clock = ahead(8)  # the background task, not the test, runs it
        r, _ = await poll(lambda: a.get(KP), lambda r: version_of(r.json(), 1)["state"] == "destroyed")
        assert version_of(ok(r), 1)["state"] == "destroyed"
        assert a.services.scheduler.runs > 0
