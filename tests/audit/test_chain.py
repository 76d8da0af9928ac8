"""The audit chain (DESIGN §6), on SQLite and on the real PostgreSQL.

The chain is produced through the real API; tampering edits the rows directly with SQL, as someone
who can write the database (but does not hold M) would. The hash formula is re-implemented here
from DESIGN §2/§6 with `cryptography`'s HKDF and `hmac`, independently of kms_service.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from kms_service.app import build_services, create_app
from kms_service.audit.verify import verify_chain, verify_with_checkpoint
from kms_service.db.engine import Database
from kms_service.db.models import AuditEvent, AuditHead
from kms_service.settings import Settings
from tests.conftest import VECTORS, Api

EVENTS = AuditEvent.metadata.tables["audit_events"]
HEAD = AuditHead.metadata.tables["audit_head"]
GENESIS = bytes(32)
KEY_PATH = "/v1/tenants/acme/keys/volumes"

# -- an independent implementation of the formula (DESIGN §2 and §6) ---------------------------


def enc(*parts: str | int) -> bytes:
    out = b""
    for part in parts:
        data = str(part).encode("utf-8")
        out += len(data).to_bytes(2, "big") + data
    return out


def hkdf_audit_key(master: bytes, cluster_salt: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=cluster_salt, info=enc("kms/v1", "audit-hmac")
    ).derive(master)


def canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def link(audit_key: bytes, prev_hash: bytes, document: dict[str, Any]) -> bytes:
    return hmac.new(audit_key, prev_hash + canonical(document), hashlib.sha256).digest()


def document(row: dict[str, Any]) -> dict[str, Any]:
    """A raw `audit_events` row as the event document that is hashed (everything but `hash`)."""
    return {
        "seq": row["seq"],
        "time": row["time"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": {"type": row["actor_type"], "id": row["actor_id"]},
        "action": row["action"],
        "tenant": row["tenant"],
        "key": row["key"],
        "version": row["version"],
        "outcome": row["outcome"],
        "request_id": row["request_id"],
        "source": row["source"],
        "details": row["details"],
        "prev_hash": row["prev_hash"].hex(),
    }


def read_master_secret(settings: Settings) -> bytes:
    return base64.b64decode(Path(settings.resolved_master_secret_file).read_bytes().strip(), validate=True)


async def cluster_salt(api: Api) -> bytes:
    async with api.services.db.engine.connect() as conn:
        salt = (await conn.execute(text("SELECT cluster_salt FROM cluster"))).scalar_one()
    return bytes(salt)


async def real_audit_key(api: Api) -> bytes:
    """The audit key as this test derives it from the master secret file and the cluster row."""
    return hkdf_audit_key(read_master_secret(api.settings), await cluster_salt(api))


async def attacker_key(api: Api) -> bytes:
    """What someone without M can do at best: the same derivation from a guessed M."""
    return hkdf_audit_key(secrets.token_bytes(32), await cluster_salt(api))


def test_independent_audit_key_derivation_matches_golden_vector() -> None:
    golden = json.loads((VECTORS / "kms_v1_golden.json").read_text())
    key = hkdf_audit_key(
        bytes.fromhex(golden["master_secret_hex"]), bytes.fromhex(golden["cluster_salt_hex"])
    )
    assert key.hex() == golden["audit_key_hex"]


# -- database access (raw rows, bypassing the service) ---------------------------------------


async def event_rows(api: Api) -> list[dict[str, Any]]:
    async with api.services.db.engine.connect() as conn:
        result = await conn.execute(select(EVENTS).order_by(EVENTS.c.seq))
        return [dict(r._mapping) for r in result]


async def head_row(api: Api) -> tuple[int, bytes]:
    async with api.services.db.engine.connect() as conn:
        row = (await conn.execute(select(HEAD.c.seq, HEAD.c.hash))).one()
    return int(row.seq), bytes(row.hash)


async def count_events(api: Api, action: str | None = None) -> int:
    stmt = select(func.count()).select_from(EVENTS)
    if action is not None:
        stmt = stmt.where(EVENTS.c.action == action)
    async with api.services.db.engine.connect() as conn:
        return int((await conn.execute(stmt)).scalar_one())


async def count_changes(api: Api) -> int:
    async with api.services.db.engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM config_changes"))).scalar_one())


async def all_exported(api: Api, **params: Any) -> list[dict[str, Any]]:
    """Every event of `GET /v1/audit` (with filters), following next_after_seq."""
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        r = await api.get("/v1/audit", params={**params, "after_seq": after, "limit": 1000})
        assert r.status_code == 200, r.text
        page = r.json()
        events += page["events"]
        if page["next_after_seq"] is None:
            return events
        after = page["next_after_seq"]


async def verify_both(api: Api) -> dict[str, Any]:
    """Verify through `GET /v1/audit/verify` and directly (both against the latest signed
    checkpoint, if any); they must agree."""
    r = await api.get("/v1/audit/verify")
    assert r.status_code == 200, r.text
    direct = await verify_with_checkpoint(
        api.services.db,
        audit_key=api.services.installation.audit_key.reveal(),
        sink=api.services.checkpoint_sink,
        public_key=api.services.checkpoint_key.public_key(),
        cluster_id=api.services.installation.cluster_id,
    )
    assert r.json() == dataclasses.asdict(direct)
    return dict(r.json())


# -- a chain produced through the real API ----------------------------------------------------


@dataclasses.dataclass
class Chain:
    head_seq: int
    agent: str


async def build_chain(api: Api) -> Chain:
    """Tenants, keys, tokens, rotations, data-plane calls and denials: well over 20 events."""
    await api.tenant_and_key("acme", "volumes")
    await api.tenant_and_key("globex", "disks")
    agent = await api.agent_token("acme")
    narrow = await api.agent_token("globex", keys=["disks"], operations=["derive"])

    async def ok(path: str, body: Any, token: str | None = None) -> dict[str, Any]:
        r = await api.post(path, body, token=token)
        assert r.status_code == 200, r.text
        return dict(r.json())

    for i in range(3):
        await ok(f"{KEY_PATH}/derive", {"id": f"pg-data-{i}"}, agent)
    await ok(f"{KEY_PATH}/rotate", {"reason": "scheduled"})
    await ok(f"{KEY_PATH}/derive", {"id": "pg-data-0", "version": 1}, agent)
    await ok("/v1/tenants/globex/keys/disks/derive", {"id": "es-0", "purpose": "volume"}, narrow)
    dk = await ok(f"{KEY_PATH}/datakey", {"context": {"app": "billing"}}, agent)
    await ok(f"{KEY_PATH}/decrypt", {"ciphertext": dk["ciphertext"], "context": {"app": "billing"}}, agent)
    ct = await ok(f"{KEY_PATH}/encrypt", {"plaintext": base64.b64encode(b"hello").decode()}, agent)
    await ok(f"{KEY_PATH}/decrypt", {"ciphertext": ct["ciphertext"]}, agent)
    await ok(f"{KEY_PATH}/derive", {"batch": [{"id": "a"}, {"id": "b"}]}, agent)
    await ok(f"{KEY_PATH}/rotate", {"reason": "incident 42"})

    # Denials and failures are audited too.
    r = await api.post(f"{KEY_PATH}/derive", {"id": "x"}, token=narrow)  # other tenant
    assert r.status_code == 404, r.text
    r = await api.post("/v1/tenants/globex/keys/disks/encrypt", {"plaintext": "aGk="}, token=narrow)
    assert r.status_code == 404, r.text  # operation outside the token's scope
    r = await api.post(f"{KEY_PATH}/derive", {"id": "x"}, token="kms_" + "A" * 43)  # unknown token
    assert r.status_code == 401, r.text
    r = await api.http.post(f"{KEY_PATH}/derive", json={"id": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401, r.text
    r = await api.get("/v1/audit", token=agent)  # role lacks read_audit
    assert r.status_code == 403, r.text
    r = await api.post("/v1/tenants/acme/keys/nope/derive", {"id": "x"}, token=agent)
    assert r.status_code == 404, r.text
    r = await api.post(f"{KEY_PATH}/derive", {"id": "x", "version": 99}, token=agent)
    assert r.status_code == 404, r.text

    rows = await event_rows(api)
    actions = [r["action"] for r in rows]
    assert len(rows) >= 25
    assert actions.count("auth.denied") >= 5
    assert actions.count("key.rotated") == 2
    assert {"tenant.created", "key.created", "token.created", "key.dek.derived"} <= set(actions)
    assert {r["outcome"] for r in rows} >= {"success", "failure", "denied"}
    head_seq, _ = await head_row(api)
    assert head_seq == len(rows) == rows[-1]["seq"]
    return Chain(head_seq=head_seq, agent=agent)


# -- tampering ---------------------------------------------------------------------------------


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 0x01]) + data[1:]


Row = dict[str, Any]

# field -> (which rows it can be edited on, the edit)
FIELD_EDITS: dict[str, tuple[Callable[[Row], bool], Callable[[Row], Row]]] = {
    "details": (
        lambda r: bool(r["details"]),
        lambda r: {"details": {**r["details"], "note": "nothing here"}},
    ),
    "action": (lambda r: True, lambda r: {"action": "tenant.listed"}),
    "outcome": (
        lambda r: True,
        lambda r: {"outcome": "failure" if r["outcome"] == "success" else "success"},
    ),
    "tenant": (
        lambda r: r["tenant"] is not None,
        lambda r: {"tenant": "globex" if r["tenant"] == "acme" else "acme"},
    ),
    "time": (lambda r: True, lambda r: {"time": r["time"] + timedelta(microseconds=1)}),
    "key": (lambda r: r["key"] is not None, lambda r: {"key": r["key"] + "-2"}),
    "version": (lambda r: r["version"] is not None, lambda r: {"version": r["version"] + 1}),
    "actor": (lambda r: True, lambda r: {"actor_id": r["actor_id"] + "x"}),
    "request_id": (lambda r: r["request_id"] is not None, lambda r: {"request_id": r["request_id"][::-1]}),
    "source": (lambda r: r["source"] is not None, lambda r: {"source": "203.0.113.9"}),
    "prev_hash": (lambda r: True, lambda r: {"prev_hash": _flip(r["prev_hash"])}),
    "hash": (lambda r: True, lambda r: {"hash": _flip(r["hash"])}),
}


def _middle(rows: list[dict[str, Any]], ok: Callable[[dict[str, Any]], bool] = lambda r: True) -> int:
    """The seq of the first row from the middle of the chain (not the last) that ``ok`` accepts."""
    for row in rows[len(rows) // 2 : -1]:
        if ok(row):
            return int(row["seq"])
    raise AssertionError("no suitable event in the middle of the chain")


@asynccontextmanager
async def raw_write(api: Api) -> AsyncIterator[Any]:
    async with api.services.db.engine.begin() as conn:
        yield conn


async def _set(conn: Any, seq: int, values: dict[str, Any]) -> None:
    result = await conn.execute(update(EVENTS).where(EVENTS.c.seq == seq).values(**values))
    assert result.rowcount == 1


def _forged(template: dict[str, Any], *, seq: int, prev_hash: bytes, key: bytes) -> dict[str, Any]:
    row = {
        **template,
        "seq": seq,
        "action": "key.version.destroyed",
        "outcome": "success",
        "details": {"reason": "routine"},
        "prev_hash": prev_hash,
    }
    row["hash"] = link(key, prev_hash, document(row))
    return row


async def _rehash_from(conn: Any, rows: list[dict[str, Any]], seq: int, key: bytes) -> bytes:
    """Recompute prev_hash/hash of every event from ``seq`` on (``rows`` already edited) with
    ``key``, and move the head hash along. Returns the new head hash."""
    prev = rows[seq - 2]["hash"] if seq > 1 else GENESIS
    for row in rows[seq - 1 :]:
        row["prev_hash"] = prev
        row["hash"] = link(key, prev, document(row))
        await _set(conn, row["seq"], {"prev_hash": row["prev_hash"], "hash": row["hash"]})
        prev = row["hash"]
    await conn.execute(update(HEAD).values(hash=prev))
    return prev


async def tamper(api: Api, kind: str) -> int:
    """Apply one kind of tampering to the stored chain; returns the seq verify must report."""
    rows = await event_rows(api)
    head_seq, head_hash = await head_row(api)
    wrong = await attacker_key(api)
    async with raw_write(api) as conn:
        if kind.startswith("edit_"):
            applies, edit = FIELD_EDITS[kind.removeprefix("edit_")]
            seq = _middle(rows, applies)
            await _set(conn, seq, edit(rows[seq - 1]))
            return seq
        if kind == "delete_middle":
            seq = _middle(rows)
            assert (await conn.execute(delete(EVENTS).where(EVENTS.c.seq == seq))).rowcount == 1
            return seq
        if kind == "reorder":
            seq = _middle(rows)
            a, b = rows[seq - 1], rows[seq]
            await _set(conn, seq, {c: v for c, v in b.items() if c != "seq"})
            await _set(conn, seq + 1, {c: v for c, v in a.items() if c != "seq"})
            return seq
        if kind == "insert_forged":
            k = _middle(rows)
            offset = 1_000_000
            await conn.execute(update(EVENTS).where(EVENTS.c.seq > k).values(seq=EVENTS.c.seq + offset))
            await conn.execute(
                update(EVENTS).where(EVENTS.c.seq > offset).values(seq=EVENTS.c.seq - offset + 1)
            )
            forged = _forged(rows[k - 1], seq=k + 1, prev_hash=rows[k - 1]["hash"], key=wrong)
            await conn.execute(insert(EVENTS).values(**forged))
            await conn.execute(update(HEAD).values(seq=head_seq + 1))
            return k + 1
        if kind == "truncate_tail":
            result = await conn.execute(delete(EVENTS).where(EVENTS.c.seq > head_seq - 3))
            assert result.rowcount == 3
            return head_seq - 2
        if kind in ("append_past_head", "append_and_move_head"):
            forged = _forged(rows[-1], seq=head_seq + 1, prev_hash=head_hash, key=wrong)
            await conn.execute(insert(EVENTS).values(**forged))
            if kind == "append_and_move_head":
                await conn.execute(update(HEAD).values(seq=head_seq + 1, hash=forged["hash"]))
            return head_seq + 1
        if kind == "head_rolled_back":
            # Genuine events past a head that was set back: they are beyond the recorded head.
            k = _middle(rows)
            await conn.execute(update(HEAD).values(seq=k, hash=rows[k - 1]["hash"]))
            return k + 1
        if kind == "rehash_with_wrong_key":
            seq = _middle(rows, lambda r: bool(r["details"]))
            rows[seq - 1]["details"] = {**rows[seq - 1]["details"], "note": "nothing here"}
            await _set(conn, seq, {"details": rows[seq - 1]["details"]})
            await _rehash_from(conn, rows, seq, wrong)
            return seq
    raise AssertionError(f"unknown tampering {kind}")


TAMPER_KINDS = [f"edit_{f}" for f in FIELD_EDITS] + [
    "delete_middle",
    "reorder",
    "insert_forged",
    "truncate_tail",
    "append_past_head",
    "append_and_move_head",
    "head_rolled_back",
    "rehash_with_wrong_key",
]


# -- tests ---------------------------------------------------------------------------------------


async def test_untouched_chain_verifies(api: Api) -> None:
    chain = await build_chain(api)
    result = await verify_both(api)
    rows = await event_rows(api)
    assert result == {
        "valid": True,
        "checked": chain.head_seq,
        "head_seq": chain.head_seq,
        "head_hash": rows[-1]["hash"].hex(),
        "first_invalid_seq": None,
        "reason": None,
        "checkpoint_seq": None,  # no signed checkpoint written yet
    }
    assert [r["seq"] for r in rows] == list(range(1, chain.head_seq + 1))


@pytest.mark.parametrize("kind", TAMPER_KINDS)
async def test_tampering_is_detected_at_the_first_bad_seq(api: Api, kind: str) -> None:
    chain = await build_chain(api)
    assert (await verify_both(api))["valid"] is True
    expected = await tamper(api, kind)
    assert 1 <= expected <= chain.head_seq + 1
    result = await verify_both(api)
    assert result["valid"] is False
    assert result["first_invalid_seq"] == expected, result
    assert result["reason"]


class AppendsWhileVerifying:
    """A `Database` for verify_chain whose first read session (the head row) is followed by a
    real data-plane request that commits an event, as on a live service, before verify reads on."""

    def __init__(self, api: Api, token: str) -> None:
        self.api, self.token, self.reads = api, token, 0

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        async with self.api.services.db.read() as session:
            yield session
        self.reads += 1
        if self.reads == 1:
            r = await self.api.post(f"{KEY_PATH}/derive", {"id": "meanwhile"}, token=self.token)
            assert r.status_code == 200, r.text


async def test_verify_is_not_confused_by_appends_while_it_runs(api: Api) -> None:
    """`GET /v1/audit/verify` and `kms audit verify` run against a live service. An event
    committed between verify's read of the head row and its walk of the events is genuine; it must
    not be reported as tampering ("event beyond the recorded head")."""
    chain = await build_chain(api)
    db = AppendsWhileVerifying(api, chain.agent)
    result = await verify_chain(cast(Database, db), audit_key=api.services.installation.audit_key.reveal())
    assert db.reads >= 2 and await count_events(api) == chain.head_seq + 1
    assert result.valid, result
    assert (await verify_both(api))["valid"] is True


async def test_control_rewrite_with_the_real_key_is_accepted(api: Api) -> None:
    """The tamper tests above fail only for want of M: the same rewrite done with the real audit
    key (derived here independently) verifies. This also proves `document()` above builds exactly
    the bytes the service hashes, so the forgeries in the tamper tests are faithful."""
    await build_chain(api)
    rows = await event_rows(api)
    seq = _middle(rows, lambda r: bool(r["details"]))
    rows[seq - 1]["details"] = {**rows[seq - 1]["details"], "note": "rewritten"}
    async with raw_write(api) as conn:
        await _set(conn, seq, {"details": rows[seq - 1]["details"]})
        new_head = await _rehash_from(conn, rows, seq, await real_audit_key(api))
    result = await verify_both(api)
    assert result["valid"] is True, result
    assert result["head_hash"] == new_head.hex()


async def test_event_hash_matches_the_design_formula(api: Api) -> None:
    """hash = HMAC-SHA256(audit key, prev_hash || canonical JSON of the event without hash),
    audit key = HKDF(M, cluster_salt, enc("kms/v1","audit-hmac"), 32), first prev_hash = 0^32."""
    await build_chain(api)
    key = await real_audit_key(api)
    exported = await all_exported(api)
    rows = await event_rows(api)
    assert len(exported) == len(rows) >= 25
    assert exported[0]["prev_hash"] == GENESIS.hex()
    prev = GENESIS.hex()
    for doc, row in zip(exported, rows, strict=True):
        body = {k: v for k, v in doc.items() if k != "hash"}
        assert set(body) == {
            "seq", "time", "actor", "action", "tenant", "key", "version", "outcome",
            "request_id", "source", "details", "prev_hash",
        }  # fmt: skip
        assert body["prev_hash"] == prev
        assert link(key, bytes.fromhex(body["prev_hash"]), body).hex() == doc["hash"], doc["seq"]
        # The raw row, rebuilt here, is the exported document, and hashes the same.
        assert document(row) == body
        assert row["hash"].hex() == doc["hash"]
        prev = doc["hash"]
    # A key that is not the audit key does not reproduce the hashes.
    wrong = await attacker_key(api)
    doc = exported[3]
    body = {k: v for k, v in doc.items() if k != "hash"}
    assert link(wrong, bytes.fromhex(doc["prev_hash"]), body).hex() != doc["hash"]


async def test_audit_query_filters(api: Api) -> None:
    await build_chain(api)
    rows = await event_rows(api)

    acme = await all_exported(api, tenant="acme")
    assert [e["seq"] for e in acme] == [r["seq"] for r in rows if r["tenant"] == "acme"]
    assert acme and all(e["tenant"] == "acme" for e in acme)

    derived = await all_exported(api, action="key.dek.derived")
    assert [e["seq"] for e in derived] == [r["seq"] for r in rows if r["action"] == "key.dek.derived"]
    assert derived and all(e["action"] == "key.dek.derived" for e in derived)

    both = await all_exported(api, tenant="globex", action="key.dek.derived")
    expected = [r["seq"] for r in rows if r["tenant"] == "globex" and r["action"] == "key.dek.derived"]
    assert [e["seq"] for e in both] == expected and expected

    assert await all_exported(api, tenant="nobody") == []

    r = await api.get("/v1/audit", params={"action": "DROP TABLE"})
    assert r.status_code == 400, r.text


async def _pages(api: Api, limit: int, **filters: Any) -> list[list[int]]:
    """The seqs of every page, following next_after_seq from the start."""
    pages: list[list[int]] = []
    after = 0
    while True:
        r = await api.get("/v1/audit", params={**filters, "after_seq": after, "limit": limit})
        assert r.status_code == 200, r.text
        page = r.json()
        pages.append([e["seq"] for e in page["events"]])
        assert 1 <= len(pages[-1]) <= limit
        if page["next_after_seq"] is None:
            return pages
        assert len(pages[-1]) == limit
        assert page["next_after_seq"] == pages[-1][-1]
        after = page["next_after_seq"]
        assert len(pages) <= 1000


async def test_audit_pagination_returns_every_event_once_in_order(api: Api) -> None:
    chain = await build_chain(api)
    every = list(range(1, chain.head_seq + 1))
    acme = [r["seq"] for r in await event_rows(api) if r["tenant"] == "acme"]
    for limit in (1, 7, chain.head_seq, chain.head_seq - 1):
        pages = await _pages(api, limit)
        assert [seq for page in pages for seq in page] == every, limit
        assert len(pages) == -(-chain.head_seq // limit)
        filtered = await _pages(api, limit, tenant="acme")
        assert [seq for page in filtered for seq in page] == acme, limit

    # Exactly a page's worth left: that last full page says there is no more.
    r = await api.get("/v1/audit", params={"after_seq": chain.head_seq - 7, "limit": 7})
    assert r.json()["next_after_seq"] is None
    assert [e["seq"] for e in r.json()["events"]] == every[-7:]
    r = await api.get("/v1/audit", params={"after_seq": chain.head_seq, "limit": 7})
    assert r.json() == {"events": [], "next_after_seq": None}


def _spellings(secret: bytes) -> set[str]:
    return {
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        base64.b64encode(secret).decode().rstrip("="),
        secret.hex(),
        secret.hex().upper(),
    }


async def test_no_secrets_in_the_audit_log(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    ctx = {"app": "billing"}
    secret_values: list[bytes] = []

    async def ok(op: str, body: Any) -> dict[str, Any]:
        r = await api.post(f"{KEY_PATH}/{op}", body, token=agent)
        assert r.status_code == 200, r.text
        return dict(r.json())

    secret_values.append(base64.b64decode((await ok("derive", {"id": "pg-data-0"}))["key"]))
    batch = await ok("derive", {"batch": [{"id": "b1"}, {"id": "b2", "length": 64}]})
    secret_values += [base64.b64decode(item["key"]) for item in batch["results"]]
    dk = await ok("datakey", {"context": ctx})
    secret_values.append(base64.b64decode(dk["plaintext"]))
    opened = await ok("decrypt", {"ciphertext": dk["ciphertext"], "context": ctx})
    assert base64.b64decode(opened["plaintext"]) == secret_values[-1]
    message = b"the payroll database password is hunter2-0123456789"
    ct = await ok("encrypt", {"plaintext": base64.b64encode(message).decode(), "context": ctx})
    r = await api.post(f"{KEY_PATH}/rotate", {})
    assert r.status_code == 200, r.text
    opened = await ok("decrypt", {"ciphertext": ct["ciphertext"], "context": ctx})
    assert base64.b64decode(opened["plaintext"]) == message
    rewrapped = await ok("rewrap", {"ciphertext": ct["ciphertext"], "context": ctx})
    assert rewrapped["version"] == 2
    secret_values += [message, read_master_secret(api.settings), await real_audit_key(api)]

    needles = {api.admin_token, agent, agent.removeprefix("kms_"), api.admin_token.removeprefix("kms_")}
    needles.add(message.decode())
    for value in secret_values:
        needles |= _spellings(value)

    # Everything stored: every column of every event, raw bytes in hex and base64 too.
    async with api.services.db.engine.connect() as conn:
        raw = (await conn.execute(text("SELECT * FROM audit_events ORDER BY seq"))).all()
    parts: list[str] = []
    for row in raw:
        for value in row:
            if isinstance(value, (bytes, memoryview)):
                parts += [bytes(value).hex(), base64.b64encode(bytes(value)).decode()]
            else:
                parts.append(str(value))
    parts.append(json.dumps(await all_exported(api), ensure_ascii=False))
    haystack = "\n".join(parts)

    # The dump does hold the events (ids and identifiers are audited).
    assert "pg-data-0" in haystack and "key.datakey.generated" in haystack and "key.rewrapped" in haystack
    assert len(raw) >= 10
    leaked = sorted(n[:8] + "..." for n in needles if n in haystack)
    assert not leaked, f"secrets found in the audit log: {leaked}"


@asynccontextmanager
async def audit_table_gone(api: Api) -> AsyncIterator[None]:
    """A real database-level failure of every audit append, for the duration."""
    async with raw_write(api) as conn:
        await conn.execute(text("ALTER TABLE audit_events RENAME TO audit_events_x"))
    try:
        yield
    finally:
        async with raw_write(api) as conn:
            await conn.execute(text("ALTER TABLE audit_events_x RENAME TO audit_events"))


@pytest.mark.expect_5xx
async def test_data_plane_fails_closed_when_the_audit_write_fails(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    # Warm every cache, so that inside the window only the audit append touches the database.
    r = await api.post(f"{KEY_PATH}/derive", {"id": "warm"}, token=agent)
    assert r.status_code == 200, r.text
    r = await api.post(f"{KEY_PATH}/encrypt", {"plaintext": base64.b64encode(b"x").decode()}, token=agent)
    assert r.status_code == 200, r.text
    ciphertext = r.json()["ciphertext"]
    before = await count_events(api)
    commits = api.services.batcher.commits

    calls: list[tuple[str, dict[str, Any]]] = [
        ("derive", {"id": "pg-data-0"}),
        ("derive", {"batch": [{"id": "a"}, {"id": "b"}]}),
        ("datakey", {}),
        ("encrypt", {"plaintext": base64.b64encode(b"secret").decode()}),
        ("decrypt", {"ciphertext": ciphertext}),
        ("rewrap", {"ciphertext": ciphertext}),
    ]
    async with audit_table_gone(api):
        for op, body in calls:
            r = await api.post(f"{KEY_PATH}/{op}", body, token=agent)
            assert r.status_code == 503, (op, r.text)
            problem = r.json()
            assert problem["code"] == "audit_unavailable", (op, problem)
            assert not {"key", "plaintext", "ciphertext", "results", "version"} & set(problem), problem
            assert r.headers.get("retry-after")

    assert api.services.batcher.commits == commits
    assert await count_events(api) == before
    assert (await verify_both(api))["valid"] is True
    # The writer recovers once the table is back.
    r = await api.post(f"{KEY_PATH}/derive", {"id": "pg-data-0"}, token=agent)
    assert r.status_code == 200, r.text
    assert await count_events(api) == before + 1
    assert (await verify_both(api))["valid"] is True


async def _key_versions(api: Api) -> list[int]:
    async with api.services.db.engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT kv.version FROM key_versions kv JOIN keys k ON k.id = kv.key_id "
                "WHERE k.tenant_id = 'acme' AND k.name = 'volumes' ORDER BY kv.version"
            )
        )
        return [int(v) for v in result.scalars()]


async def post_as_client_sees(api: Api, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    """(status, body) as a real client gets them. An exception the app answered with its generic
    500 is re-raised by Starlette's ServerErrorMiddleware, and the in-process transport passes it
    on to the caller: that is reported here as the 500 the client saw."""
    try:
        r = await api.post(path, body)
    except SQLAlchemyError as exc:
        return 500, {"code": "internal_error", "escaped": type(exc).__name__}
    return r.status_code, dict(r.json())


@pytest.mark.expect_5xx
async def test_management_change_fails_closed_when_the_audit_write_fails(api: Api) -> None:
    await api.tenant_and_key()
    before = await count_events(api)
    changes_before = await count_changes(api)

    async with audit_table_gone(api):
        status, body = await post_as_client_sees(api, f"{KEY_PATH}/rotate", {"reason": "no audit, no change"})
        assert status >= 500, body
        assert "primary_version" not in body
        status, body = await post_as_client_sees(api, "/v1/tenants", {"id": "initech", "name": "Initech"})
        assert status >= 500, body

    assert await _key_versions(api) == [1]
    r = await api.get(f"{KEY_PATH}")
    assert r.status_code == 200, r.text
    assert r.json()["latest_version"] == 1 and r.json()["primary_version"] == 1
    assert (await api.get("/v1/tenants/initech")).status_code == 404
    assert await count_events(api) == before
    assert await count_changes(api) == changes_before
    assert (await verify_both(api))["valid"] is True

    # And with the audit log back, the same rotation goes through and is audited.
    r = await api.post(f"{KEY_PATH}/rotate", {"reason": "audit is back"})
    assert r.status_code == 200, r.text
    assert await _key_versions(api) == [1, 2]
    rotated = await all_exported(api, action="key.rotated")
    assert len(rotated) == 1 and rotated[0]["details"]["reason"] == "audit is back"


@pytest.mark.expect_5xx
async def test_management_change_refused_for_want_of_audit_is_503_audit_unavailable(api: Api) -> None:
    """A change refused because its audit record cannot be written answers like the data plane
    does for the same cause: 503 `audit_unavailable` with Retry-After ("nothing was done"), so
    clients retry. Not a 500 `internal_error` (PostgreSQL) nor `database_unavailable` (SQLite)."""
    await api.tenant_and_key()
    async with audit_table_gone(api):
        status, body = await post_as_client_sees(api, f"{KEY_PATH}/rotate", {"reason": "x"})
    assert (status, body.get("code")) == (503, "audit_unavailable"), body


async def test_group_commit_shares_transactions(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    r = await api.post(f"{KEY_PATH}/derive", {"id": "warm"}, token=agent)
    assert r.status_code == 200, r.text
    derived_before = await count_events(api, "key.dek.derived")
    total_before = await count_events(api)
    commits, events = api.services.batcher.commits, api.services.batcher.events

    n = 200
    responses = await asyncio.gather(
        *(api.post(f"{KEY_PATH}/derive", {"id": f"vol-{i}"}, token=agent) for i in range(n))
    )
    assert [r.status_code for r in responses] == [200] * n
    assert len({r.json()["key"] for r in responses}) == n

    assert await count_events(api, "key.dek.derived") == derived_before + n
    assert await count_events(api) == total_before + n
    derived = await all_exported(api, action="key.dek.derived")
    new = [e for e in derived if e["details"]["id"].startswith("vol-")]
    assert sorted(e["details"]["id"] for e in new) == sorted(f"vol-{i}" for i in range(n))
    assert {e["request_id"] for e in new} == {r.headers["x-request-id"] for r in responses}

    assert api.services.batcher.events - events == n
    transactions = api.services.batcher.commits - commits
    assert 1 <= transactions < n, transactions
    result = await verify_both(api)
    assert result["valid"] is True and result["checked"] == total_before + n


async def test_two_replicas_append_to_one_gapless_chain(api: Api) -> None:
    """A second replica (its own engine, caches and batcher) on the same database: the head row
    lock serialises their appends into one chain, gapless and valid, with no request failing."""
    await api.tenant_and_key()
    agent = await api.agent_token()
    before = await count_events(api)
    other = await build_services(api.settings)
    try:
        async with LifespanManager(app := create_app(services=other)):
            transport = httpx.ASGITransport(app=app, client=("198.51.100.8", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://kms-2.test") as http2:
                n = 100
                responses = await asyncio.gather(
                    *(api.post(f"{KEY_PATH}/derive", {"id": f"r1-{i}"}, token=agent) for i in range(n)),
                    *(
                        http2.post(f"{KEY_PATH}/derive", json={"id": f"r2-{i}"}, headers=api.auth(agent))
                        for i in range(n)
                    ),
                )
    finally:
        await other.pool.close()
        await other.db.dispose()
    assert [r.status_code for r in responses] == [200] * 2 * n, [r.text for r in responses if r.is_error]
    assert other.batcher.events == n
    rows = await event_rows(api)
    assert [r["seq"] for r in rows] == list(range(1, before + 2 * n + 1))
    sources = {r["source"] for r in rows[before:]}
    assert sources == {"198.51.100.7", "198.51.100.8"}
    result = await verify_both(api)
    assert result["valid"] is True and result["checked"] == before + 2 * n
