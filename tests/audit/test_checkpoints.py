"""Signed checkpoints of the chain head, kept outside the database, detect a cut tail even when
the head row is rolled back with it (the gap a database-only chain cannot close)."""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import text

from kms_service import crypto
from tests.conftest import Api


async def make_events(api: Api, n: int) -> None:
    await api.tenant_and_key()
    for i in range(n):
        assert (await api.post("/v1/tenants/acme/keys/volumes/derive", {"id": f"v{i}"})).status_code == 200


async def verify(api: Api) -> dict[str, object]:
    r = await api.get("/v1/audit/verify")
    assert r.status_code == 200, r.text
    result: dict[str, object] = r.json()
    return result


async def test_truncation_with_head_rollback_is_detected(api: Api) -> None:
    await make_events(api, 10)
    doc = await api.services.checkpointer.checkpoint_now()
    assert doc is not None
    cp_seq = int(doc["seq"])
    assert (await verify(api))["valid"] is True
    assert (await verify(api))["checkpoint_seq"] == cp_seq
    # The attacker with database access cuts the last 3 events and rolls the head back to match.
    async with api.services.db.engine.begin() as conn:
        await conn.execute(text("DELETE FROM audit_events WHERE seq > :s"), {"s": cp_seq - 3})
        row = (
            await conn.execute(text("SELECT hash FROM audit_events WHERE seq = :s"), {"s": cp_seq - 3})
        ).one()
        await conn.execute(text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": cp_seq - 3, "h": row[0]})
    result = await verify(api)
    assert result["valid"] is False
    assert result["first_invalid_seq"] == cp_seq - 2
    assert "checkpoint" in str(result["reason"])


async def test_a_rewritten_event_at_the_checkpoint_is_detected(api: Api) -> None:
    await make_events(api, 3)
    doc = await api.services.checkpointer.checkpoint_now()
    assert doc is not None
    async with api.services.db.engine.begin() as conn:
        await conn.execute(
            text("UPDATE audit_events SET hash = :h WHERE seq = :s"),
            {"h": b"\x00" * 32, "s": int(doc["seq"])},
        )
    result = await verify(api)
    assert result["valid"] is False
    assert result["first_invalid_seq"] == int(doc["seq"])


async def test_checkpoint_signature_and_public_key(api: Api) -> None:
    await make_events(api, 2)
    doc = await api.services.checkpointer.checkpoint_now()
    assert doc is not None
    identity = (await api.get("/v1/sys/identity")).json()
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(identity["audit_checkpoint_public_key"]))
    body = {k: v for k, v in doc.items() if k != "signature"}
    public.verify(
        base64.b64decode(doc["signature"]),
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(),
    )
    # The key is derived from M: HKDF(M, cluster_salt, enc("kms/v1","audit-checkpoint"), 32) as seed.
    seed = crypto.purpose_key(
        master_secret=api.services.installation.master.reveal(),
        cluster_salt=api.services.installation.cluster_salt,
        purpose="audit-checkpoint",
    )
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    derived = (
        Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    assert base64.b64encode(derived).decode() == identity["audit_checkpoint_public_key"]

    # A forged checkpoint (no M, so no valid signature) makes verification fail, not pass.
    path = sorted(api.services.checkpoint_sink.directory.glob("checkpoint-*.json"))[-1]
    forged = json.loads(path.read_text()) | {"seq": 999999}
    (path.parent / "checkpoint-00000000000000999999.json").write_text(json.dumps(forged))
    result = await verify(api)
    assert result["valid"] is False
    assert "signature" in str(result["reason"])


async def test_checkpoints_are_written_by_count_and_by_time(api: Api) -> None:
    cp = api.services.checkpointer
    cp._every = 5
    cp._interval = 3600
    await make_events(api, 2)
    assert (
        await cp.maybe_checkpoint() is not None
    )  # first events since start: count reached? no -> by seq delta
    before = len(list(api.services.checkpoint_sink.directory.glob("checkpoint-*.json")))
    await api.post("/v1/tenants/acme/keys/volumes/derive", {"id": "x"})
    assert await cp.maybe_checkpoint() is None  # 1 event, not due
    for i in range(5):
        await api.post("/v1/tenants/acme/keys/volumes/derive", {"id": f"y{i}"})
    assert await cp.maybe_checkpoint() is not None  # 6 events since the last: due by count
    now = [1000.0]
    cp._monotonic = lambda: now[0]
    cp._last_at = now[0]
    await api.post("/v1/tenants/acme/keys/volumes/derive", {"id": "z"})
    assert await cp.maybe_checkpoint() is None
    now[0] += 3600
    assert await cp.maybe_checkpoint() is not None  # due by time
    after = len(list(api.services.checkpoint_sink.directory.glob("checkpoint-*.json")))
    assert after == before + 2
