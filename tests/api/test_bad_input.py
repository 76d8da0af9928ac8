"""Client mistakes, table-driven (DESIGN §2 input grammar, §5 API and errors).

Every row is one bad request. Each must be answered with a 4xx RFC 9457 problem
(``application/problem+json`` with ``type``, ``title``, ``status``, ``detail`` and the expected stable
``code``), and must leave the database as it was, except for audit events that record a denial
(``auth.denied``) or a failure. No response in this file may be a 5xx.

One app per database runs the whole table (building an app per row is too slow); failures are
collected and reported together, one paragraph per failing row.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from kms_service.db.models import AuditEvent, ConfigChange, Key, KeyVersion, Tenant, Token
from tests.conftest import Api

PROBLEM_JSON = "application/problem+json"
_TOKEN_RE = re.compile(r"kms_[A-Za-z0-9_-]{43}")
MIB = 1024 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Nothing:
    def __repr__(self) -> str:
        return "<no body>"


NOTHING: Any = _Nothing()


class ChunkedBody:
    """An async request body (no Content-Length unless the row sets one) that counts the chunks
    the server actually pulled, so a row can check the body was refused while being read."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024) -> None:
        self.chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        self.served = 0

    def __aiter__(self) -> ChunkedBody:
        return self

    async def __anext__(self) -> bytes:
        if self.served >= len(self.chunks):
            raise StopAsyncIteration
        self.served += 1
        return self.chunks[self.served - 1]

    def __repr__(self) -> str:
        return f"<chunked body, {len(self.chunks)} chunks>"


@dataclass
class Row:
    name: str
    method: str
    path: str
    status: int
    code: str
    body: Any = NOTHING  # serialised as JSON with Content-Type application/json
    raw: bytes | ChunkedBody | None = None  # sent as is (Content-Type only if given in headers)
    headers: dict[str, str] = field(default_factory=dict)
    token: str | None = "admin"  # a name in World.tokens; None: no Authorization header
    authorization: str | None = None  # a literal Authorization header (overrides token)
    same_as: str | None = None  # a World.baselines entry the response must equal (status, type, body)
    clock_offset: timedelta | None = None  # shift the TokenService clock for this request
    check: Callable[[httpx.Response], list[str]] | None = None  # extra row-specific checks

    def describe(self) -> str:
        sent = self.raw if self.raw is not None else self.body
        text = repr(sent)
        if len(text) > 160:
            text = text[:160] + f"... ({len(text)} chars)"
        auth = self.authorization if self.authorization is not None else f"token={self.token}"
        auth = _TOKEN_RE.sub("kms_<token>", auth)
        return f"{self.method} {self.path} body={text} {auth} headers={self.headers}"


@dataclass
class World:
    """What the table needs: tokens by role/scope, ciphertexts, and 404 baselines."""

    tokens: dict[str, str]
    ciphertexts: dict[str, str]
    baselines: dict[str, httpx.Response]
    max_body: int


# -- database snapshot --------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


@dataclass(frozen=True)
class Snapshot:
    tables: dict[str, frozenset[tuple[Any, ...]]]
    audit: dict[int, tuple[str, str, bytes]]  # seq -> (action, outcome, hash)


async def snapshot(api: Api) -> Snapshot:
    tables: dict[str, frozenset[tuple[Any, ...]]] = {}
    async with api.services.db.engine.connect() as conn:
        for model in (Tenant, Key, KeyVersion, Token, ConfigChange):
            rows = (await conn.execute(select(model.__table__))).all()
            tables[model.__tablename__] = frozenset(tuple(_freeze(v) for v in r) for r in rows)
        events = (
            await conn.execute(select(AuditEvent.seq, AuditEvent.action, AuditEvent.outcome, AuditEvent.hash))
        ).all()
    return Snapshot(tables=tables, audit={int(s): (a, o, bytes(h)) for s, a, o, h in events})


def db_problems(before: Snapshot, after: Snapshot) -> list[str]:
    problems = []
    for table, rows in before.tables.items():
        added = after.tables[table] - rows
        removed = rows - after.tables[table]
        if added or removed:
            problems.append(
                f"table {table} changed: +{len(added)} -{len(removed)} rows "
                f"(added {sorted(map(str, added))[:2]}, removed {sorted(map(str, removed))[:2]})"
            )
    for seq, event in before.audit.items():
        if after.audit.get(seq) != event:
            problems.append(f"audit event {seq} was changed or removed")
    for seq in sorted(set(after.audit) - set(before.audit)):
        action, outcome, _ = after.audit[seq]
        if not (action == "auth.denied" or outcome in ("failure", "denied")):
            problems.append(f"new audit event {seq} records a success: action={action} outcome={outcome}")
    return problems


# -- sending and checking -------------------------------------------------------------------------


@contextmanager
def token_clock(api: Api, offset: timedelta | None) -> Iterator[None]:
    if offset is None:
        yield
        return
    tokens = api.services.tokens
    original = tokens._clock
    tokens._clock = lambda: datetime.now(UTC) + offset
    try:
        yield
    finally:
        tokens._clock = original


async def send(api: Api, world: World, row: Row) -> httpx.Response:
    headers: dict[str, str] = {}
    if row.authorization is not None:
        headers["Authorization"] = row.authorization
    elif row.token is not None:
        headers["Authorization"] = f"Bearer {world.tokens[row.token]}"
    content: bytes | ChunkedBody | None = None
    if row.raw is not None:
        content = row.raw
    elif row.body is not NOTHING:
        content = json.dumps(row.body).encode()
        headers["Content-Type"] = "application/json"
    headers.update(row.headers)
    with token_clock(api, row.clock_offset):
        return await api.http.request(row.method, row.path, content=content, headers=headers)


def response_problems(row: Row, resp: httpx.Response, world: World) -> list[str]:
    problems: list[str] = []
    if resp.status_code != row.status:
        problems.append(f"status {resp.status_code}, expected {row.status}")
    elif not 400 <= resp.status_code < 500:
        problems.append(f"status {resp.status_code} is not a 4xx")
    media = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != PROBLEM_JSON:
        problems.append(f"Content-Type {resp.headers.get('content-type')!r}, expected {PROBLEM_JSON}")
    try:
        body = resp.json()
    except ValueError:
        return [*problems, "body is not JSON"]
    if not isinstance(body, dict):
        return [*problems, "body is not a JSON object"]
    missing = [
        m for m in ("type", "title", "detail", "code") if not isinstance(body.get(m), str) or not body[m]
    ]
    if "code" not in body and "status" not in body:
        return [*problems, "the body is not a problem document"]
    if missing:
        problems.append(f"problem members {missing} missing or not non-empty strings")
    if body.get("status") != resp.status_code:
        problems.append(f"problem status {body.get('status')!r} != HTTP status {resp.status_code}")
    if body.get("code") != row.code:
        problems.append(f"code {body.get('code')!r}, expected {row.code!r}")
    if resp.status_code == 401 and not resp.headers.get("www-authenticate", "").startswith("Bearer"):
        problems.append("401 without a WWW-Authenticate: Bearer header")
    if resp.status_code == 405 and not resp.headers.get("allow"):
        problems.append("405 without an Allow header (RFC 9110 §15.5.6)")
    if row.same_as is not None:
        base = world.baselines[row.same_as]
        if (resp.status_code, resp.headers.get("content-type"), body) != (
            base.status_code,
            base.headers.get("content-type"),
            base.json(),
        ):
            problems.append(
                f"differs from the answer for a missing key ({row.same_as}): "
                f"{base.status_code} {base.json()} vs {resp.status_code} {body}"
            )
    if row.check is not None:
        problems.extend(row.check(resp))
    return problems


async def run_row(api: Api, world: World, row: Row) -> str | None:
    """Send one row; the failure report for it, or None."""
    before = await snapshot(api)
    try:
        resp: httpx.Response | None = await send(api, world, row)
    except Exception as exc:  # the app raised: ASGITransport re-raises unhandled errors (a 500)
        resp = None
        first_line = (str(exc).splitlines() or [""])[0]
        problems = [f"the app raised {type(exc).__name__} (a 500): {first_line[:300]}"]
    else:
        assert resp is not None
        problems = response_problems(row, resp, world)
    problems += db_problems(before, await snapshot(api))
    if not problems:
        return None
    got = f"{resp.status_code} {resp.text[:400]}" if resp is not None else "no response"
    return (
        f"[{row.name}]\n  request:  {row.describe()}\n  expected: {row.status} {row.code}\n"
        f"  got:      {got}\n" + "".join(f"  - {p}\n" for p in problems)
    )


# -- setup ---------------------------------------------------------------------------------------

DP = "/v1/tenants/acme/keys/volumes"  # the data-plane base path most rows use


def _ok(resp: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert resp.status_code == status, f"setup: {resp.request.method} {resp.request.url}: {resp.text}"
    body: dict[str, Any] = resp.json()
    return body


async def build_world(api: Api) -> World:
    tokens: dict[str, str] = {"admin": api.admin_token}
    for tenant in ("acme", "globex"):
        _ok(await api.post("/v1/tenants", {"id": tenant, "name": tenant.title()}), 201)
    tokens["acme"] = await api.agent_token("acme")

    # Baselines: genuinely missing keys, asked for by a caller entitled to them, before they exist.
    baselines = {
        "acme/volumes derive": await api.post(f"{DP}/derive", {"id": "vol-1"}, token=tokens["acme"]),
        "acme/volumes encrypt": await api.post(
            f"{DP}/encrypt", {"plaintext": b64(b"hi")}, token=tokens["acme"]
        ),
        "acme/other derive": await api.post(
            "/v1/tenants/acme/keys/other/derive", {"id": "vol-1"}, token=tokens["acme"]
        ),
        "nosuch/volumes derive": await api.post("/v1/tenants/nosuch/keys/volumes/derive", {"id": "vol-1"}),
    }
    for name, resp in baselines.items():
        assert resp.status_code == 404 and resp.json()["code"] == "not_found", (name, resp.text)

    for tenant, key in [
        ("acme", "volumes"),
        ("acme", "other"),
        ("acme", "rotated"),
        ("acme", "minver"),
        ("acme", "dead"),
        ("globex", "volumes"),
    ]:
        body = {"name": key, "provider": {"type": "local"}}
        _ok(await api.post(f"/v1/tenants/{tenant}/keys", body), 201)

    tokens["globex"] = await api.agent_token("globex")
    tokens["acme-volumes-only"] = await api.agent_token("acme", keys=["volumes"])
    tokens["acme-derive-only"] = await api.agent_token("acme", operations=["derive"])
    for role in ("operator", "auditor"):
        created = _ok(await api.post("/v1/tokens", {"role": role, "description": role}), 201)
        tokens[role] = created["token"]
    # Each scoped token works inside its scope, so a 404 outside it is the scope check at work.
    _ok(await api.post("/v1/tenants/globex/keys/volumes/derive", {"id": "v"}, token=tokens["globex"]))
    _ok(await api.post(f"{DP}/encrypt", {"plaintext": ""}, token=tokens["acme-volumes-only"]))
    _ok(await api.post(f"{DP}/derive", {"id": "v"}, token=tokens["acme-derive-only"]))
    _ok(await api.post("/v1/tenants/acme/keys/other/derive", {"id": "v"}, token=tokens["acme"]))
    for role in ("operator", "auditor"):
        _ok(await api.get("/v1/tenants", token=tokens[role]))

    # A token that worked (and sits in the token cache) and was then revoked.
    created = _ok(
        await api.post("/v1/tokens", {"role": "agent", "tenant": "acme", "description": "to revoke"}), 201
    )
    _ok(await api.post(f"{DP}/derive", {"id": "vol-1"}, token=created["token"]))
    revoked = await api.http.delete(f"/v1/tokens/{created['id']}", headers=api.auth())
    _ok(revoked)
    tokens["revoked"] = created["token"]

    # A token with a 60 s lifetime: works now; rows using it shift the token clock by 61 s.
    created = _ok(
        await api.post(
            "/v1/tokens", {"role": "agent", "tenant": "acme", "description": "short", "ttl_seconds": 60}
        ),
        201,
    )
    _ok(await api.post(f"{DP}/derive", {"id": "vol-1"}, token=created["token"]))
    tokens["expiring"] = created["token"]

    ctx = {"app": "a"}
    hello = b64(b"hello")
    cts = {
        "acme": (_ok(await api.post(f"{DP}/encrypt", {"plaintext": hello, "context": ctx})))["ciphertext"],
        "globex": (
            _ok(
                await api.post(
                    "/v1/tenants/globex/keys/volumes/encrypt", {"plaintext": hello, "context": ctx}
                )
            )
        )["ciphertext"],
        "rotated-v1": (_ok(await api.post("/v1/tenants/acme/keys/rotated/encrypt", {"plaintext": hello})))[
            "ciphertext"
        ],
        "minver-v1": (_ok(await api.post("/v1/tenants/acme/keys/minver/encrypt", {"plaintext": hello})))[
            "ciphertext"
        ],
    }
    # The good ciphertext decrypts, so the decryption_failed rows fail for the reason they name.
    opened = _ok(await api.post(f"{DP}/decrypt", {"ciphertext": cts["acme"], "context": ctx}))
    assert opened["plaintext"] == hello

    # rotated: v2 primary, v1 disabled. minver: v2, min_decryption_version 2. dead: v1 disabled.
    _ok(await api.post("/v1/tenants/acme/keys/rotated/rotate", {"reason": "test"}))
    _ok(await api.post("/v1/tenants/acme/keys/rotated/versions/1/disable", {"reason": "test"}))
    _ok(await api.post("/v1/tenants/acme/keys/minver/rotate", {}))
    _ok(
        await api.http.patch(
            "/v1/tenants/acme/keys/minver", json={"min_decryption_version": 2}, headers=api.auth()
        )
    )
    _ok(await api.post("/v1/tenants/acme/keys/dead/versions/1/disable", {}))
    return World(tokens=tokens, ciphertexts=cts, baselines=baselines, max_body=api.settings.max_body_bytes)


# -- the table -----------------------------------------------------------------------------------


def _chunked_check(body: ChunkedBody, *, declared: bool) -> Callable[[httpx.Response], list[str]]:
    def check(_: httpx.Response) -> list[str]:
        if declared and body.served:
            return [f"the server read {body.served} chunks of a body whose Content-Length is over the limit"]
        if not declared and body.served >= len(body.chunks):
            return [f"the server read the whole over-limit body ({body.served} chunks) instead of stopping"]
        return []

    return check


def build_rows(world: World) -> list[Row]:
    ct = world.ciphertexts["acme"]
    ct_body = ct.split(":", 2)[2]
    ctx = {"app": "a"}
    rows: list[Row] = []

    def add(name: str, method: str, path: str, status: int, code: str, **kw: Any) -> None:
        rows.append(Row(name, method, path, status, code, **kw))

    def bad(name: str, method: str, path: str, body: Any = NOTHING, **kw: Any) -> None:
        add(name, method, path, 400, "invalid_request", body=body, **kw)

    # Names in paths (DESIGN §2: ^[a-z0-9][a-z0-9-]{0,62}$, never normalised).
    bad_path_names = {
        "uppercase": "ACME",
        "64 chars": "a" * 64,
        "unicode": "ten%C3%A4nt",
        "leading hyphen": "-acme",
        "trailing newline": "acme%0A",
        "dot-dot": "%2E%2E",
        "space": "ac%20me",
        "NUL": "ac%00me",
    }
    for label, seg in bad_path_names.items():
        bad(f"path tenant {label} (derive)", "POST", f"/v1/tenants/{seg}/keys/volumes/derive", {"id": "v"})
        bad(f"path key {label} (derive)", "POST", f"/v1/tenants/acme/keys/{seg}/derive", {"id": "v"})
    bad("path tenant uppercase (GET tenant)", "GET", "/v1/tenants/ACME")
    bad("path tenant 64 chars (GET keys)", "GET", "/v1/tenants/" + "a" * 64 + "/keys")
    bad("path key unicode (GET key)", "GET", "/v1/tenants/acme/keys/vol%C3%BCmes")
    bad("path key leading hyphen (rotate)", "POST", "/v1/tenants/acme/keys/-volumes/rotate", {})
    bad("path tenant uppercase (create key)", "POST", "/v1/tenants/ACME/keys", {"name": "new-key"})
    # Traversal and empty segments match no route at all.
    for label, path in {
        "path tenant ../x": "/v1/tenants/..%2Fx/keys/volumes/derive",
        "path key ../x": "/v1/tenants/acme/keys/..%2Fx/derive",
        "path key ../../tokens": "/v1/tenants/acme/keys/..%2F..%2F..%2Ftokens",
        "path tenant empty": "/v1/tenants//keys/volumes/derive",
        "path key empty": "/v1/tenants/acme/keys//derive",
    }.items():
        add(label, "POST", path, 404, "not_found", body={"id": "v"})
    add("path tenant ../x (GET)", "GET", "/v1/tenants/..%2Facme", 404, "not_found")

    # Names in bodies.
    bad_names: dict[str, Any] = {
        "uppercase": "ACME",
        "64 chars": "a" * 64,
        "../x": "../x",
        "empty": "",
        "unicode": "tenänt",
        "leading hyphen": "-acme",
        "trailing newline": "acme\n",
        "NUL": "ac\x00me",
        "number": 42,
        "null": None,
    }
    for label, value in bad_names.items():
        bad(f"body tenant id {label}", "POST", "/v1/tenants", {"id": value, "name": "X"})
        bad(f"body key name {label}", "POST", "/v1/tenants/acme/keys", {"name": value})
    bad("body tenant id missing", "POST", "/v1/tenants", {"name": "X"})
    bad("body tenant name empty", "POST", "/v1/tenants", {"id": "new-tenant", "name": ""})
    bad("body tenant name with NUL", "POST", "/v1/tenants", {"id": "new-tenant", "name": "N\x00"})
    bad("body tenant name 201 chars", "POST", "/v1/tenants", {"id": "new-tenant", "name": "n" * 201})
    bad("body key name missing", "POST", "/v1/tenants/acme/keys", {"provider": {"type": "local"}})
    bad(
        "token tenant uppercase",
        "POST",
        "/v1/tokens",
        {"role": "agent", "tenant": "ACME", "description": "d"},
    )
    bad(
        "token keys ../x",
        "POST",
        "/v1/tokens",
        {"role": "agent", "tenant": "acme", "keys": ["../x"], "description": "d"},
    )

    # DEK ids: 1-256 of [A-Za-z0-9._:/@+=-].
    for label, value in {
        "with space": "vol 1",
        "with NUL": "vol\x001",
        "257 chars": "v" * 257,
        "empty": "",
        "trailing newline": "vol-1\n",
        "unicode": "völ-1",
        "number": 1,
        "null": None,
        "list": ["vol-1"],
    }.items():
        bad(f"DEK id {label}", "POST", f"{DP}/derive", {"id": value})
    bad("DEK id missing", "POST", f"{DP}/derive", {"purpose": "volume"})
    for label, value in {
        "uppercase": "Volume",
        "leading digit": "1vol",
        "33 chars": "p" * 33,
        "empty": "",
    }.items():
        bad(f"purpose {label}", "POST", f"{DP}/derive", {"id": "vol-1", "purpose": value})

    # Lengths: integers 16-64, no coercion.
    for label, value in {
        "0": 0,
        "15": 15,
        "65": 65,
        "-1": -1,
        '"32" (string)': "32",
        "32.0 (float)": 32.0,
        "true": True,
        "null": None,
    }.items():
        bad(f"derive length {label}", "POST", f"{DP}/derive", {"id": "vol-1", "length": value})
    for label, value in {"0": 0, "15": 15, "65": 65, '"32"': "32", "32.0": 32.0, "true": True}.items():
        bad(f"datakey length {label}", "POST", f"{DP}/datakey", {"length": value})
    bad("datakey plaintext as string", "POST", f"{DP}/datakey", {"plaintext": "yes"})

    # Versions.
    bad("derive version 0", "POST", f"{DP}/derive", {"id": "vol-1", "version": 0})
    bad("derive version -1", "POST", f"{DP}/derive", {"id": "vol-1", "version": -1})
    bad("derive version 2^31", "POST", f"{DP}/derive", {"id": "vol-1", "version": 2**31})
    bad('derive version "1"', "POST", f"{DP}/derive", {"id": "vol-1", "version": "1"})
    bad("derive version true", "POST", f"{DP}/derive", {"id": "vol-1", "version": True})
    add("derive version 999", "POST", f"{DP}/derive", 404, "not_found", body={"id": "vol-1", "version": 999})
    rotated, minver, dead = (f"/v1/tenants/acme/keys/{k}" for k in ("rotated", "minver", "dead"))
    add(
        "derive disabled version",
        "POST",
        f"{rotated}/derive",
        409,
        "key_version_disabled",
        body={"id": "vol-1", "version": 1},
    )
    add(
        "decrypt under disabled version",
        "POST",
        f"{rotated}/decrypt",
        409,
        "key_version_disabled",
        body={"ciphertext": world.ciphertexts["rotated-v1"]},
    )
    add(
        "derive below min_decryption_version",
        "POST",
        f"{minver}/derive",
        409,
        "key_version_below_minimum",
        body={"id": "vol-1", "version": 1},
    )
    add(
        "decrypt below min_decryption_version",
        "POST",
        f"{minver}/decrypt",
        409,
        "key_version_below_minimum",
        body={"ciphertext": world.ciphertexts["minver-v1"]},
    )
    add("derive, no enabled version", "POST", f"{dead}/derive", 409, "no_enabled_version", body={"id": "v"})
    add(
        "encrypt, no enabled version",
        "POST",
        f"{dead}/encrypt",
        409,
        "no_enabled_version",
        body={"plaintext": ""},
    )

    # Encrypt: standard base64, at most 64 KiB decoded.
    for label, value in {
        "not base64": "not base64!!",
        "missing padding": "aGk",
        "urlsafe alphabet": "-_-_",
        "embedded newline": "aGVs\nbG8=",
        "number": 5,
        "null": None,
    }.items():
        bad(f"encrypt plaintext {label}", "POST", f"{DP}/encrypt", {"plaintext": value})
    bad("encrypt plaintext missing", "POST", f"{DP}/encrypt", {"context": ctx})
    bad(
        "encrypt plaintext 64 KiB + 1", "POST", f"{DP}/encrypt", {"plaintext": b64(b"\x00" * (64 * 1024 + 1))}
    )
    bad(
        "encrypt plaintext 64 KiB + 2", "POST", f"{DP}/encrypt", {"plaintext": b64(b"\x00" * (64 * 1024 + 2))}
    )
    bad("encrypt plaintext 100 KB", "POST", f"{DP}/encrypt", {"plaintext": b64(b"\x00" * 100_000)})

    # Contexts: a flat object of strings.
    hi = b64(b"hi")
    for label, value in {
        "list": ["app", "a"],
        "string": "app=a",
        "number value": {"app": 1},
        "null value": {"app": None},
        "nested": {"app": {"a": "b"}},
        "65 entries": {f"k{i}": "v" for i in range(65)},
        "over 8 KiB": {"k": "v" * 9000},
    }.items():
        bad(f"encrypt context {label}", "POST", f"{DP}/encrypt", {"plaintext": hi, "context": value})
    bad("decrypt context list", "POST", f"{DP}/decrypt", {"ciphertext": ct, "context": ["app", "a"]})
    bad("datakey context with number", "POST", f"{DP}/datakey", {"context": {"n": 1}})

    # Ciphertexts: opaque failures.
    def dfail(name: str, ciphertext: str, path: str = f"{DP}/decrypt", context: Any = ctx) -> None:
        add(name, "POST", path, 400, "decryption_failed", body={"ciphertext": ciphertext, "context": context})

    dfail("ciphertext of another tenant", world.ciphertexts["globex"])
    dfail("ciphertext of another key", ct, path="/v1/tenants/acme/keys/other/decrypt")
    dfail("ciphertext with another context", ct, context={"app": "b"})
    dfail("ciphertext without its context", ct, context=None)
    dfail("ciphertext with an extra context entry", ct, context={"app": "a", "x": "y"})
    dfail("garbage ciphertext", "garbage")
    dfail("kms:v999 ciphertext", f"kms:v999:{ct_body}")
    dfail("kms:v0 ciphertext", f"kms:v0:{ct_body}")
    dfail("kms:v2 ciphertext (version not yet there)", f"kms:v2:{ct_body}")
    dfail("truncated ciphertext (tag cut)", ct[:-4])
    dfail("truncated ciphertext (too short)", ct[: len("kms:v1:") + 20])
    dfail("ciphertext body 4n+1 chars", ct + "A")
    raw_ct = base64.urlsafe_b64decode(ct_body + "=" * (-len(ct_body) % 4))
    for label, index in (("r", 0), ("nonce", 16), ("sealed data", 28), ("tag", len(raw_ct) - 1)):
        flipped = bytearray(raw_ct)
        flipped[index] ^= 0x01
        text = base64.urlsafe_b64encode(bytes(flipped)).rstrip(b"=").decode()
        dfail(f"ciphertext with a flipped bit in its {label}", f"kms:v1:{text}")
    dfail("ciphertext in standard base64", "kms:v1:" + ct_body.replace("-", "+").replace("_", "/") + "+/")
    dfail("ciphertext with trailing newline", ct + "\n")
    dfail("rewrap ciphertext of another tenant", world.ciphertexts["globex"], path=f"{DP}/rewrap")
    bad("ciphertext empty", "POST", f"{DP}/decrypt", {"ciphertext": ""})
    bad("ciphertext number", "POST", f"{DP}/decrypt", {"ciphertext": 1})
    bad("ciphertext missing", "POST", f"{DP}/decrypt", {"context": ctx})
    bad("ciphertext too long", "POST", f"{DP}/decrypt", {"ciphertext": "kms:v1:" + "A" * 100_000})

    # Unknown fields and wrong top-level shapes.
    bad("unknown field: derive", "POST", f"{DP}/derive", {"id": "vol-1", "foo": 1})
    bad("unknown field: datakey", "POST", f"{DP}/datakey", {"length": 32, "foo": 1})
    bad("unknown field: encrypt", "POST", f"{DP}/encrypt", {"plaintext": hi, "foo": 1})
    bad("unknown field: decrypt", "POST", f"{DP}/decrypt", {"ciphertext": ct, "contexts": ctx})
    bad("unknown field: rewrap", "POST", f"{DP}/rewrap", {"ciphertext": ct, "context": ctx, "foo": 1})
    bad("unknown field: create tenant", "POST", "/v1/tenants", {"id": "new-tenant", "name": "N", "foo": 1})
    bad("unknown field: create key", "POST", "/v1/tenants/acme/keys", {"name": "new-key", "foo": 1})
    bad("unknown field: create token", "POST", "/v1/tokens", {"role": "admin", "description": "d", "foo": 1})
    bad("unknown field: rotate", "POST", f"{DP}/rotate", {"reason": "r", "foo": 1})
    bad("unknown field: transition", "POST", f"{DP}/versions/1/disable", {"reason": "r", "foo": 1})
    bad("unknown field: patch key", "PATCH", DP, {"rotation_period_days": 30, "foo": 1})

    # Bodies that are not a JSON object, or not JSON at all.
    for path, label in (
        (f"{DP}/derive", "derive"),
        ("/v1/tenants", "create tenant"),
        ("/v1/tokens", "token"),
    ):
        bad(f"empty body ({label})", "POST", path)
        bad(f"empty body with JSON type ({label})", "POST", path, raw=b"", headers=_JSON)
        bad(f"body null ({label})", "POST", path, None)
        bad(f"body [] ({label})", "POST", path, [])
        bad(f"body a string ({label})", "POST", path, "vol-1")
        add(f"malformed JSON ({label})", "POST", path, 400, "malformed_json", raw=b'{"id": ', headers=_JSON)
    add(
        "malformed JSON: single quotes",
        "POST",
        f"{DP}/derive",
        400,
        "malformed_json",
        raw=b"{'id': 'v'}",
        headers=_JSON,
    )
    add(
        "malformed JSON: trailing data",
        "POST",
        f"{DP}/derive",
        400,
        "malformed_json",
        raw=b'{"id": "v"} x',
        headers=_JSON,
    )
    add(
        "malformed JSON: whitespace only",
        "POST",
        f"{DP}/derive",
        400,
        "malformed_json",
        raw=b"   ",
        headers=_JSON,
    )
    add(
        "malformed JSON: not UTF-8",
        "POST",
        f"{DP}/derive",
        400,
        "malformed_json",
        raw=b'{"id": "\xff\xfe"}',
        headers=_JSON,
    )
    add(
        "malformed JSON: NaN",
        "POST",
        f"{DP}/derive",
        400,
        "malformed_json",
        raw=b'{"id": "v", "length": NaN}',
        headers=_JSON,
    )
    add(
        "malformed JSON: create tenant not UTF-8",
        "POST",
        "/v1/tenants",
        400,
        "malformed_json",
        raw=b'{"id": "new-tenant", "name": "\xff"}',
        headers=_JSON,
    )

    # Batches.
    bad("batch not a list", "POST", f"{DP}/derive", {"batch": {"id": "vol-1"}})
    bad("batch a string", "POST", f"{DP}/derive", {"batch": "vol-1"})
    bad("batch null", "POST", f"{DP}/derive", {"batch": None})
    bad("batch empty", "POST", f"{DP}/derive", {"batch": []})
    bad("batch with extra top-level field", "POST", f"{DP}/derive", {"batch": [{"id": "vol-1"}], "id": "x"})
    add(
        "batch of 1001",
        "POST",
        f"{DP}/derive",
        400,
        "batch_too_large",
        body={"batch": [{"id": f"vol-{i}"} for i in range(1001)]},
    )
    add(
        "batch of 1001 (encrypt)",
        "POST",
        f"{DP}/encrypt",
        400,
        "batch_too_large",
        body={"batch": [{"plaintext": hi}] * 1001},
    )

    # Size and media type, refused before parsing.
    huge = json.dumps({"plaintext": "A" * (2 * MIB)}).encode()
    add("2 MiB body", "POST", f"{DP}/encrypt", 413, "payload_too_large", raw=huge, headers=_JSON)
    add(
        "2 MiB body (create tenant)", "POST", "/v1/tenants", 413, "payload_too_large", raw=huge, headers=_JSON
    )
    add(
        "body of max+1 bytes",
        "POST",
        f"{DP}/encrypt",
        413,
        "payload_too_large",
        raw=b" " * (world.max_body + 1),
        headers=_JSON,
    )
    streamed = ChunkedBody(huge)
    add(
        "2 MiB body, chunked (no Content-Length)",
        "POST",
        f"{DP}/encrypt",
        413,
        "payload_too_large",
        raw=streamed,
        headers=_JSON,
        check=_chunked_check(streamed, declared=False),
    )
    declared = ChunkedBody(huge)
    add(
        "2 MiB body, streamed with Content-Length",
        "POST",
        f"{DP}/encrypt",
        413,
        "payload_too_large",
        raw=declared,
        headers={**_JSON, "Content-Length": str(len(huge))},
        check=_chunked_check(declared, declared=True),
    )
    good = json.dumps({"id": "vol-1"}).encode()
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        add(
            f"Content-Type {media}",
            "POST",
            f"{DP}/derive",
            415,
            "unsupported_media_type",
            raw=good,
            headers={"Content-Type": media},
        )
    # A body with no Content-Type at all is not declared as JSON either (BodyLimit's contract).
    add("JSON body without Content-Type", "POST", f"{DP}/derive", 415, "unsupported_media_type", raw=good)
    add(
        "JSON body without Content-Type (create tenant)",
        "POST",
        "/v1/tenants",
        415,
        "unsupported_media_type",
        raw=json.dumps({"id": "new-tenant", "name": "N"}).encode(),
    )
    add(
        "Content-Type text/plain (create tenant)",
        "POST",
        "/v1/tenants",
        415,
        "unsupported_media_type",
        raw=json.dumps({"id": "new-tenant", "name": "N"}).encode(),
        headers={"Content-Type": "text/plain"},
    )

    # Authentication: 401 with WWW-Authenticate.
    def unauth(name: str, method: str, path: str, body: Any = NOTHING, **kw: Any) -> None:
        add(name, method, path, 401, "unauthenticated", body=body, **kw)

    unauth("no token (derive)", "POST", f"{DP}/derive", {"id": "vol-1"}, token=None)
    unauth("no token (list tenants)", "GET", "/v1/tenants", token=None)
    unauth("no token (create tenant)", "POST", "/v1/tenants", {"id": "new-tenant", "name": "N"}, token=None)
    fake = "kms_" + "A" * 43
    for label, header in {
        "Bearer abc": "Bearer abc",
        "Basic xyz": "Basic xyz",
        "Bearer only": "Bearer",
        "empty header": "",
        "wrong prefix": "Bearer xyz_" + "A" * 43,
        "unknown token": f"Bearer {fake}",
        "token too long": f"Bearer {fake}A",
        "admin token without scheme": world.tokens["admin"],
        "admin token, Token scheme": f"Token {world.tokens['admin']}",
        "admin token with trailing junk": f"Bearer {world.tokens['admin']} x",
    }.items():
        unauth(f"malformed auth: {label}", "POST", f"{DP}/derive", {"id": "vol-1"}, authorization=header)
    unauth("revoked token", "POST", f"{DP}/derive", {"id": "vol-1"}, token="revoked")
    unauth("revoked token (GET)", "GET", "/v1/tenants", token="revoked")
    unauth(
        "expired token",
        "POST",
        f"{DP}/derive",
        {"id": "vol-1"},
        token="expiring",
        clock_offset=timedelta(seconds=61),
    )

    # Scope: an agent outside its scope sees exactly a missing key (404).
    def hidden(name: str, path: str, body: Any, token: str, baseline: str) -> None:
        add(name, "POST", path, 404, "not_found", body=body, token=token, same_as=baseline)

    hidden("agent of another tenant", f"{DP}/derive", {"id": "vol-1"}, "globex", "acme/volumes derive")
    hidden(
        "agent on a key outside its keys",
        "/v1/tenants/acme/keys/other/derive",
        {"id": "vol-1"},
        "acme-volumes-only",
        "acme/other derive",
    )
    hidden(
        "agent without the operation",
        f"{DP}/encrypt",
        {"plaintext": hi},
        "acme-derive-only",
        "acme/volumes encrypt",
    )
    hidden(
        "agent on a tenant that does not exist",
        "/v1/tenants/nosuch/keys/volumes/derive",
        {"id": "vol-1"},
        "acme",
        "nosuch/volumes derive",
    )
    hidden(
        "agent batch outside its keys",
        "/v1/tenants/acme/keys/other/derive",
        {"batch": [{"id": "vol-1"}]},
        "acme-volumes-only",
        "acme/other derive",
    )
    hidden("operator on the data plane", f"{DP}/derive", {"id": "vol-1"}, "operator", "acme/volumes derive")
    hidden("auditor on the data plane", f"{DP}/derive", {"id": "vol-1"}, "auditor", "acme/volumes derive")
    add(
        "missing key (admin)",
        "POST",
        "/v1/tenants/acme/keys/ghost/derive",
        404,
        "not_found",
        body={"id": "v"},
    )
    add(
        "missing tenant (admin)",
        "POST",
        "/v1/tenants/nosuch/keys/volumes/encrypt",
        404,
        "not_found",
        body={"plaintext": hi},
    )

    # Roles: 403 on management.
    def forbidden(name: str, method: str, path: str, token: str, body: Any = NOTHING) -> None:
        add(name, method, path, 403, "forbidden", body=body, token=token)

    forbidden("agent lists tenants", "GET", "/v1/tenants", "acme")
    forbidden("agent reads its key", "GET", DP, "acme")
    forbidden("agent creates a tenant", "POST", "/v1/tenants", "acme", {"id": "new-tenant", "name": "N"})
    forbidden("agent creates a key", "POST", "/v1/tenants/acme/keys", "acme", {"name": "new-key"})
    forbidden("agent rotates", "POST", f"{DP}/rotate", "acme", {})
    forbidden("agent creates a token", "POST", "/v1/tokens", "acme", {"role": "admin", "description": "d"})
    forbidden("agent reads the audit log", "GET", "/v1/audit", "acme")
    forbidden("auditor creates a tenant", "POST", "/v1/tenants", "auditor", {"id": "new-tenant", "name": "N"})
    forbidden("auditor rotates", "POST", f"{DP}/rotate", "auditor", {})
    forbidden("auditor disables a version", "POST", f"{DP}/versions/1/disable", "auditor", {})
    forbidden(
        "operator creates a token", "POST", "/v1/tokens", "operator", {"role": "admin", "description": "d"}
    )
    forbidden("operator lists tokens", "GET", "/v1/tokens", "operator")

    # Management conflicts and rules.
    add(
        "duplicate tenant", "POST", "/v1/tenants", 409, "already_exists", body={"id": "acme", "name": "Again"}
    )
    add("duplicate key", "POST", "/v1/tenants/acme/keys", 409, "already_exists", body={"name": "volumes"})
    add(
        "key in a missing tenant",
        "POST",
        "/v1/tenants/nosuch/keys",
        404,
        "not_found",
        body={"name": "new-key"},
    )
    add(
        "unknown provider type",
        "POST",
        "/v1/tenants/acme/keys",
        400,
        "unsupported_provider",
        body={"name": "new-key", "provider": {"type": "rot13"}},
    )
    add(
        "provider without type",
        "POST",
        "/v1/tenants/acme/keys",
        400,
        "unsupported_provider",
        body={"name": "new-key", "provider": {}},
    )
    add(
        "provider config with an unknown field",
        "POST",
        "/v1/tenants/acme/keys",
        400,
        "unsupported_provider",
        body={"name": "new-key", "provider": {"type": "local", "foo": 1}},
    )
    bad("provider as a string", "POST", "/v1/tenants/acme/keys", {"name": "new-key", "provider": "local"})
    bad(
        "rotation_period_days 3651 (create key)",
        "POST",
        "/v1/tenants/acme/keys",
        {"name": "new-key", "rotation_period_days": 3651},
    )
    bad(
        'rotation_period_days "30" (create key)',
        "POST",
        "/v1/tenants/acme/keys",
        {"name": "new-key", "rotation_period_days": "30"},
    )
    bad("audit limit not a number", "GET", "/v1/audit?limit=abc")
    bad(
        "rotation_period_days 0 (create key)",
        "POST",
        "/v1/tenants/acme/keys",
        {"name": "new-key", "rotation_period_days": 0},
    )
    bad("PATCH min_decryption_version above latest", "PATCH", DP, {"min_decryption_version": 2})
    bad("PATCH min_decryption_version 0", "PATCH", DP, {"min_decryption_version": 0})
    bad("PATCH min_decryption_version null", "PATCH", DP, {"min_decryption_version": None})
    bad('PATCH min_decryption_version "1"', "PATCH", DP, {"min_decryption_version": "1"})
    bad("PATCH nothing", "PATCH", DP, {})
    bad("PATCH rotation_period_days 0", "PATCH", DP, {"rotation_period_days": 0})
    add(
        "PATCH a missing key",
        "PATCH",
        "/v1/tenants/acme/keys/ghost",
        404,
        "not_found",
        body={"rotation_period_days": 30},
    )
    add(
        "enable an enabled version",
        "POST",
        f"{DP}/versions/1/enable",
        409,
        "invalid_state_transition",
        body={},
    )
    add(
        "disable a disabled version",
        "POST",
        f"{rotated}/versions/1/disable",
        409,
        "invalid_state_transition",
        body={},
    )
    add(
        "restore a version not scheduled", "POST", f"{DP}/versions/1/restore", 409, "invalid_state_transition"
    )
    bad(
        "schedule-destruction, waiting 6 days",
        "POST",
        f"{DP}/versions/1/schedule-destruction",
        {"waiting_period_days": 6},
    )
    bad(
        "schedule-destruction, waiting 366 days",
        "POST",
        f"{DP}/versions/1/schedule-destruction",
        {"waiting_period_days": 366},
    )
    bad("disable with a waiting period", "POST", f"{DP}/versions/1/disable", {"waiting_period_days": 10})
    bad("transition reason of 501 chars", "POST", f"{DP}/versions/1/disable", {"reason": "r" * 501})
    bad("rotate reason of 501 chars", "POST", f"{DP}/rotate", {"reason": "r" * 501})
    bad("path version 0", "POST", f"{DP}/versions/0/disable", {})
    bad("path version -1", "POST", f"{DP}/versions/-1/disable", {})
    bad("path version abc", "POST", f"{DP}/versions/abc/disable", {})
    add("path version 999", "POST", f"{DP}/versions/999/disable", 404, "not_found", body={})
    add("rotate a missing key", "POST", "/v1/tenants/acme/keys/ghost/rotate", 404, "not_found", body={})
    add("get a missing tenant", "GET", "/v1/tenants/nosuch", 404, "not_found")
    add("get a missing key", "GET", "/v1/tenants/acme/keys/ghost", 404, "not_found")
    add("list keys of a missing tenant", "GET", "/v1/tenants/nosuch/keys", 404, "not_found")

    # Tokens.
    def tok(name: str, body: dict[str, Any], status: int = 400, code: str = "invalid_request") -> None:
        add(f"token: {name}", "POST", "/v1/tokens", status, code, body=body)

    tok("agent without tenant", {"role": "agent", "description": "d"})
    tok("operator with tenant", {"role": "operator", "tenant": "acme", "description": "d"})
    tok("admin with keys", {"role": "admin", "keys": ["volumes"], "description": "d"})
    tok("auditor with operations", {"role": "auditor", "operations": ["derive"], "description": "d"})
    tok("unknown role", {"role": "root", "description": "d"})
    tok("ttl_seconds 0", {"role": "admin", "description": "d", "ttl_seconds": 0})
    tok("ttl_seconds 59", {"role": "admin", "description": "d", "ttl_seconds": 59})
    tok('ttl_seconds "3600"', {"role": "admin", "description": "d", "ttl_seconds": "3600"})
    tok("unknown operation", {"role": "agent", "tenant": "acme", "operations": ["sign"], "description": "d"})
    tok("empty operations", {"role": "agent", "tenant": "acme", "operations": [], "description": "d"})
    tok("empty keys", {"role": "agent", "tenant": "acme", "keys": [], "description": "d"})
    tok("no description", {"role": "admin"})
    tok("empty description", {"role": "admin", "description": ""})
    tok("description with NUL", {"role": "admin", "description": "d\x00"})
    tok(
        "tenant that does not exist",
        {"role": "agent", "tenant": "nosuch", "description": "d"},
        404,
        "not_found",
    )
    bad("revoke a malformed token id", "DELETE", "/v1/tokens/not-a-token-id")
    add("revoke an unknown token id", "DELETE", "/v1/tokens/tok_0000000000000000", 404, "not_found")

    # Audit queries.
    bad("audit limit 0", "GET", "/v1/audit?limit=0")
    bad("audit limit 1001", "GET", "/v1/audit?limit=1001")
    bad("audit after_seq -1", "GET", "/v1/audit?after_seq=-1")
    bad("audit tenant uppercase", "GET", "/v1/audit?tenant=ACME")
    bad("audit after_seq 2^63", "GET", f"/v1/audit?after_seq={2**63}")

    # Routing.
    add("unknown route", "GET", "/v1/nope", 404, "not_found")
    add("unknown route, no token", "GET", "/v1/nope", 404, "not_found", token=None)
    add("unknown data-plane operation", "POST", f"{DP}/sign", 404, "not_found", body={"id": "vol-1"})
    add("wrong method on /v1/tenants", "DELETE", "/v1/tenants", 405, "method_not_allowed")
    add("wrong method on derive", "GET", f"{DP}/derive", 405, "method_not_allowed")
    add("wrong method on a tenant", "PUT", "/v1/tenants/acme", 405, "method_not_allowed", body={"name": "X"})
    add("wrong method on /v1/tokens", "PUT", "/v1/tokens", 405, "method_not_allowed", body={})
    return rows


_JSON = {"Content-Type": "application/json"}


# -- tests ---------------------------------------------------------------------------------------


@pytest.fixture
async def observed(api: Api) -> AsyncIterator[list[httpx.Response]]:
    """Every response of the test; none may be a 5xx."""
    seen: list[httpx.Response] = []

    async def hook(response: httpx.Response) -> None:
        seen.append(response)

    api.http.event_hooks = {"request": [], "response": [hook]}
    yield seen
    errors = [
        f"{r.request.method} {r.request.url.path} -> {r.status_code}" for r in seen if r.status_code >= 500
    ]
    assert not errors, "5xx responses: " + "; ".join(errors)


def _assert_rows(failures: list[str], total: int) -> None:
    assert not failures, f"{len(failures)} of {total} rows failed:\n\n" + "\n".join(failures)


async def test_bad_input_table(api: Api, observed: list[httpx.Response]) -> None:
    world = await build_world(api)
    rows = build_rows(world)
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), "row names must be unique"
    failures = [f for row in rows if (f := await run_row(api, world, row)) is not None]
    _assert_rows(failures, len(rows))


KEY_ROWS = [
    "2 MiB body, chunked (no Content-Length)",
    "2 MiB body, streamed with Content-Length",
    "expired token",
    "agent of another tenant",
    "agent without the operation",
    "ciphertext of another tenant",
    "encrypt plaintext 64 KiB + 1",
]


@pytest.mark.parametrize("name", KEY_ROWS)
async def test_key_row(api: Api, observed: list[httpx.Response], name: str) -> None:
    world = await build_world(api)
    (row,) = [r for r in build_rows(world) if r.name == name]
    failure = await run_row(api, world, row)
    assert failure is None, failure


async def test_batch_item_errors_stay_in_their_slot(api: Api, observed: list[httpx.Response]) -> None:
    """A bad batch item fails alone: {"error": {...}} in its slot, the others succeed, in order."""
    await api.tenant_and_key()
    agent = await api.agent_token()
    items: list[Any] = [
        {"id": "vol-0"},
        {"id": "vol-1", "foo": 1},  # unknown field
        {"id": "vol 2"},  # bad id
        {"id": "vol-3", "length": "32"},  # no coercion
        "vol-4",  # not an object
        {"id": "vol-5", "version": 999},  # missing version
        {"id": "vol-6"},
    ]
    before = await snapshot(api)
    r = await api.post(f"{DP}/derive", {"batch": items}, token=agent)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(items)
    expected = {1: (400, "invalid_request"), 2: (400, "invalid_request"), 3: (400, "invalid_request")}
    expected |= {4: (400, "invalid_request"), 5: (404, "not_found")}
    for i, result in enumerate(results):
        if i in expected:
            assert set(result) == {"error"}, (i, result)
            error = result["error"]
            assert (error["status"], error["code"]) == expected[i], (i, error)
            assert isinstance(error["detail"], str) and error["detail"], (i, error)
        else:
            assert set(result) == {"key", "version", "latest_version"}, (i, result)
            assert len(base64.b64decode(result["key"])) == 32
    single = await api.post(f"{DP}/derive", {"id": "vol-6"}, token=agent)
    assert single.json()["key"] == results[6]["key"]  # slots are not shuffled
    assert results[0]["key"] != results[6]["key"]

    after = await snapshot(api)
    assert after.tables == before.tables
    new = [after.audit[s] for s in sorted(set(after.audit) - set(before.audit))]
    assert [(a, o) for a, o, _ in new] == [("key.dek.derived", "partial"), ("key.dek.derived", "success")]
