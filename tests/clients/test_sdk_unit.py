"""kms_client without a server: error mapping, retries, token files, request shapes, TLS.

HTTP answers come from ``httpx.MockTransport``; time is a fake clock advanced by the client's
(injected) sleep, so retry delays are asserted exactly, never measured.
"""

from __future__ import annotations

import base64
import datetime as dt
import inspect
import json
import os
import random
import ssl
import threading
from collections.abc import Callable, Iterator
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import kms_client
from kms_client import (
    AlreadyExists,
    AsyncKmsClient,
    CiphertextRequest,
    DecryptionFailed,
    DerivedKey,
    DeriveRequest,
    Encrypted,
    EncryptRequest,
    Forbidden,
    InvalidRequest,
    InvalidStateTransition,
    KeyVersionBelowMinimum,
    KeyVersionDisabled,
    KmsClient,
    KmsError,
    KmsTransportError,
    NoEnabledVersion,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    RetryPolicy,
    ServerError,
    TokenFileError,
    Unauthenticated,
    Unavailable,
)

Handler = Callable[[httpx.Request], httpx.Response]
DERIVED = {"key": base64.b64encode(b"k" * 32).decode(), "version": 3, "latest_version": 4}


def problem(status: int, code: str, detail: str = "it failed", **headers: str) -> httpx.Response:
    body = {"type": "about:blank", "title": "t", "status": status, "detail": detail, "code": code}
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json", **headers})


class Recorder:
    """A mock server: answers from a list (last one repeats) and keeps every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def body(self, i: int = -1) -> Any:
        return json.loads(self.requests[i].content)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def clock(self) -> float:
        return self.now


def client(handler: Handler, fake: FakeTime | None = None, **kw: Any) -> KmsClient:
    fake = fake or FakeTime()
    kw.setdefault("token", "tok")
    return KmsClient(
        "http://kms.test",
        transport=httpx.MockTransport(handler),
        sleep=fake.sleep,
        clock=fake.clock,
        rng=random.Random(7),
        **kw,
    )


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_request", InvalidRequest),
        (400, "malformed_json", InvalidRequest),
        (400, "batch_too_large", InvalidRequest),
        (400, "decryption_failed", DecryptionFailed),
        (401, "unauthenticated", Unauthenticated),
        (403, "forbidden", Forbidden),
        (404, "not_found", NotFound),
        (409, "already_exists", AlreadyExists),
        (409, "key_version_disabled", KeyVersionDisabled),
        (409, "key_version_below_minimum", KeyVersionBelowMinimum),
        (409, "no_enabled_version", NoEnabledVersion),
        (409, "invalid_state_transition", InvalidStateTransition),
        (409, "provider_access_denied", ProviderError),  # provider_* codes are open-ended
        (413, "payload_too_large", InvalidRequest),
        (415, "unsupported_media_type", InvalidRequest),
        (418, "something_new", InvalidRequest),  # unknown 4xx code: by status
        (500, "internal_error", ServerError),
    ],
)
def test_problem_codes_raise_their_exception_class_without_retrying(
    status: int, code: str, cls: type[KmsError]
) -> None:
    server = Recorder(problem(status, code, "what went wrong"))
    with client(server) as kms, pytest.raises(cls) as caught:
        kms.derive("acme", "volumes", "vol-1")
    assert isinstance(caught.value, KmsError)
    assert (caught.value.status, caught.value.code, caught.value.detail) == (status, code, "what went wrong")
    assert caught.value.problem["title"] == "t"
    assert len(server.requests) == 1


def test_non_json_error_pages_still_raise_typed_errors() -> None:
    server = Recorder(
        httpx.Response(502, text="<html>Bad gateway</html>", headers={"Content-Type": "text/html"})
    )
    with client(server) as kms, pytest.raises(ServerError) as caught:
        kms.identity()
    assert caught.value.code == "http_502" and "Bad gateway" in caught.value.detail
    assert len(server.requests) == 1


def test_success_with_an_unreadable_body_is_an_unexpected_response() -> None:
    server = Recorder(httpx.Response(200, json={"key": "not base64!", "version": 1}))
    with client(server) as kms, pytest.raises(kms_client.UnexpectedResponse):
        kms.derive("acme", "volumes", "vol-1")


# -- retries -----------------------------------------------------------------------------------


def test_503_is_retried_after_retry_after_plus_jitter_then_succeeds() -> None:
    fake = FakeTime()
    server = Recorder(
        problem(503, "audit_unavailable", **{"Retry-After": "2"}),
        problem(503, "database_unavailable", **{"Retry-After": "3"}),
        httpx.Response(200, json=DERIVED),
    )
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=4.0, max_total=60)
    with client(server, fake, retry=policy) as kms:
        result = kms.derive("acme", "volumes", "vol-1")
    assert result == DerivedKey(key=b"k" * 32, version=3, latest_version=4)
    assert len(server.requests) == 3
    assert len(fake.sleeps) == 2
    # Retry-After is a floor; the jitter on top is bounded by the backoff of that attempt.
    assert 2 <= fake.sleeps[0] <= 2 + 0.5
    assert 3 <= fake.sleeps[1] <= 3 + 1.0
    # Every attempt is the same request.
    assert all(r.content == server.requests[0].content for r in server.requests)


def test_429_without_retry_after_backs_off_exponentially_with_full_jitter() -> None:
    fake = FakeTime()
    server = Recorder(problem(429, "rate_limited"))
    policy = RetryPolicy(max_attempts=6, initial_backoff=1.0, max_backoff=8.0, max_total=1000)
    with client(server, fake, retry=policy) as kms, pytest.raises(RateLimited):
        kms.encrypt("acme", "volumes", b"x")
    assert len(server.requests) == 6
    caps = [1, 2, 4, 8, 8]
    assert len(fake.sleeps) == 5
    assert all(0 <= s <= cap for s, cap in zip(fake.sleeps, caps, strict=True))
    # Jitter means the delays are not simply the caps.
    assert fake.sleeps != caps


def test_attempts_are_bounded_and_the_last_error_is_raised() -> None:
    fake = FakeTime()
    server = Recorder(problem(503, "provider_unavailable", **{"Retry-After": "1"}))
    policy = RetryPolicy(max_attempts=3, max_total=100)
    with client(server, fake, retry=policy) as kms, pytest.raises(ProviderUnavailable) as caught:
        kms.derive("acme", "volumes", "vol-1")
    assert len(server.requests) == 3
    assert caught.value.retry_after == 1.0 and isinstance(caught.value, Unavailable)


def test_total_retry_time_is_bounded() -> None:
    """Retry-After 20 s with a 45 s budget: one wait (20), the next (would end at 40+) is not taken."""
    fake = FakeTime()
    server = Recorder(problem(503, "service_unavailable", **{"Retry-After": "20"}))
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=0.1, max_total=45)
    with client(server, fake, retry=policy) as kms, pytest.raises(Unavailable):
        kms.derive("acme", "volumes", "vol-1")
    assert len(server.requests) == 3
    assert sum(fake.sleeps) <= 45
    assert len(fake.sleeps) == 2


def test_retry_after_as_http_date() -> None:
    fake = FakeTime()
    when = format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30), usegmt=True)
    server = Recorder(
        problem(503, "service_unavailable", **{"Retry-After": when}), httpx.Response(200, json=DERIVED)
    )
    with client(server, fake, retry=RetryPolicy(initial_backoff=0, max_total=100)) as kms:
        kms.derive("acme", "volumes", "vol-1")
    assert 25 <= fake.sleeps[0] <= 30


@pytest.mark.parametrize(
    "answer",
    [
        problem(400, "invalid_request"),
        problem(401, "unauthenticated"),
        problem(404, "not_found"),
        problem(409, "key_version_disabled"),
        problem(500, "internal_error"),
        problem(502, "bad_gateway"),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("peer closed"),
    ],
)
def test_other_errors_are_never_retried(answer: httpx.Response | Exception) -> None:
    fake = FakeTime()
    server = Recorder(answer, httpx.Response(200, json=DERIVED))
    with client(server, fake) as kms, pytest.raises(KmsError):
        kms.derive("acme", "volumes", "vol-1")
    assert len(server.requests) == 1 and fake.sleeps == []


def test_connection_failures_are_retried_and_raised_as_transport_errors() -> None:
    fake = FakeTime()
    server = Recorder(httpx.ConnectError("refused"), httpx.Response(200, json=DERIVED))
    with client(server, fake) as kms:
        assert kms.derive("acme", "volumes", "vol-1").version == 3
    assert len(server.requests) == 2
    down = Recorder(httpx.ConnectError("refused"))
    with client(down, retry=RetryPolicy(max_attempts=2)) as kms, pytest.raises(KmsTransportError) as caught:
        kms.identity()
    assert caught.value.status == 0 and len(down.requests) == 2


def test_health_is_unauthenticated_and_a_503_report_is_returned_not_raised() -> None:
    report = {"status": "degraded", "database": {"ok": False}, "providers": []}
    server = Recorder(httpx.Response(503, json=report))
    with client(server) as kms:
        health = kms.health()
    assert (health.ok, health.status, health.http_status) == (False, "degraded", 503)
    assert "Authorization" not in server.requests[0].headers
    assert len(server.requests) == 1


async def test_async_client_retries_with_its_own_sleep() -> None:
    fake = FakeTime()
    server = Recorder(problem(429, "rate_limited", **{"Retry-After": "1"}), httpx.Response(200, json=DERIVED))
    async with AsyncKmsClient(
        "http://kms.test",
        token="tok",
        transport=httpx.MockTransport(server),
        sleep=fake.asleep,
        clock=fake.clock,
        retry=RetryPolicy(initial_backoff=0.2),
    ) as kms:
        result = await kms.derive("acme", "volumes", "vol-1", length=64, version=3)
    assert result.latest_version == 4
    assert len(server.requests) == 2 and 1 <= fake.sleeps[0] <= 1.2
    assert server.body() == {"id": "vol-1", "purpose": "volume", "length": 64, "version": 3}


# -- bearer tokens -----------------------------------------------------------------------------


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    server = Recorder(httpx.Response(200, json={"cluster_id": "c", "version": "1"}))
    with client(server, token=None, token_file=token_file) as kms:
        kms.identity()
        token_file.write_text("second-token")  # size changes
        kms.identity()
        # Kubernetes style: the file is a symlink into a directory swapped atomically.
        data1, data2 = tmp_path / "..data1", tmp_path / "..data2"
        data1.mkdir()
        data2.mkdir()
        (data1 / "token").write_text("third-token!")
        (data2 / "token").write_text("fourth-token")  # same size as the third
        link = tmp_path / "sa-token"
        link.symlink_to(data1 / "token")
    with client(server, token=None, token_file=link) as kms:
        kms.identity()
        tmp = tmp_path / "sa-token.new"
        tmp.symlink_to(data2 / "token")
        os.replace(tmp, link)
        kms.identity()
    seen = [r.headers["Authorization"] for r in server.requests]
    assert seen == ["Bearer first", "Bearer second-token", "Bearer third-token!", "Bearer fourth-token"]


def test_unchanged_token_file_is_not_reread(tmp_path: Path) -> None:
    """The cache key is (device, inode, size, mtime): an in-place edit that keeps all four (which
    no rotation does) is not noticed — proof that the file is not read on every call."""
    token_file = tmp_path / "token"
    token_file.write_text("aaaa")
    st = token_file.stat()
    server = Recorder(httpx.Response(200, json={"cluster_id": "c", "version": "1"}))
    with client(server, token=None, token_file=token_file) as kms:
        kms.identity()
        with open(token_file, "r+") as f:
            f.write("bbbb")
        os.utime(token_file, ns=(st.st_atime_ns, st.st_mtime_ns))
        kms.identity()
        os.utime(token_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        kms.identity()
    assert [r.headers["Authorization"] for r in server.requests] == [
        "Bearer aaaa",
        "Bearer aaaa",
        "Bearer bbbb",
    ]


def test_missing_or_empty_token_file_is_a_token_file_error(tmp_path: Path) -> None:
    server = Recorder(httpx.Response(200, json={"cluster_id": "c", "version": "1"}))
    with client(server, token=None, token_file=tmp_path / "absent") as kms, pytest.raises(TokenFileError):
        kms.identity()
    (tmp_path / "empty").write_text("\n")
    with client(server, token=None, token_file=tmp_path / "empty") as kms, pytest.raises(TokenFileError):
        kms.identity()
    assert server.requests == []
    with pytest.raises(ValueError, match="not both"):
        KmsClient("http://kms.test", token="a", token_file=tmp_path / "empty")


# -- request shapes ----------------------------------------------------------------------------


def test_requests_match_the_api_contract() -> None:
    key = {
        "tenant": "acme",
        "name": "volumes",
        "provider": {"type": "local"},
        "state": "enabled",
        "primary_version": 2,
        "latest_version": 2,
        "min_decryption_version": 1,
        "rotation_period_days": None,
        "next_rotation_at": None,
        "created_at": "2026-01-01T00:00:00Z",
        "versions": [
            {"version": 1, "state": "disabled", "created_at": "2026-01-01T00:00:00Z"},
            {"version": 2, "state": "enabled", "created_at": "2026-02-01T00:00:00+00:00", "destroy_at": None},
        ],
    }
    server = Recorder(httpx.Response(200, json=key))
    with client(server) as kms:
        got = kms.update_key("acme", "volumes", rotation_period_days=None)
        kms.update_key("acme", "volumes", min_decryption_version=2)
        kms.rotate_key("acme", "volumes", reason="quarterly")
        kms.schedule_version_destruction("acme", "volumes", 1, reason="retire", waiting_period_days=7)
        with pytest.raises(ValueError, match="nothing to change"):
            kms.update_key("acme", "volumes")
    assert got.version(2).state == "enabled" and got.primary_version == 2
    assert got.created_at == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    calls = [(r.method, r.url.path, json.loads(r.content)) for r in server.requests]
    assert calls == [
        ("PATCH", "/v1/tenants/acme/keys/volumes", {"rotation_period_days": None}),
        ("PATCH", "/v1/tenants/acme/keys/volumes", {"min_decryption_version": 2}),
        ("POST", "/v1/tenants/acme/keys/volumes/rotate", {"reason": "quarterly"}),
        (
            "POST",
            "/v1/tenants/acme/keys/volumes/versions/1/schedule-destruction",
            {"reason": "retire", "waiting_period_days": 7},
        ),
    ]
    assert all(r.headers["Authorization"] == "Bearer tok" for r in server.requests)


def test_data_plane_bodies_and_path_segments_are_encoded() -> None:
    encrypted = httpx.Response(200, json={"ciphertext": "kms:v1:abc", "version": 1})
    server = Recorder(encrypted, encrypted, httpx.Response(200, json={"events": [], "next_after_seq": None}))
    with client(server) as kms:
        kms.encrypt("acme", "a/b", b"\x00\xffsecret", context={"app": "billing"})
        kms.rewrap("acme", "volumes", "kms:v1:abc")
        kms.list_audit(tenant="acme", action="key.rotated", after_seq=5, limit=10)
    first, second, third = server.requests
    assert first.url.raw_path == b"/v1/tenants/acme/keys/a%2Fb/encrypt"
    assert json.loads(first.content) == {
        "plaintext": base64.b64encode(b"\x00\xffsecret").decode(),
        "context": {"app": "billing"},
    }
    assert json.loads(second.content) == {"ciphertext": "kms:v1:abc"}
    assert dict(third.url.params) == {
        "tenant": "acme",
        "action": "key.rotated",
        "after_seq": "5",
        "limit": "10",
    }


def test_batches_return_results_and_typed_errors_in_order() -> None:
    answer = {
        "results": [
            {"ciphertext": "kms:v2:aaa", "version": 2},
            {"error": {"status": 400, "code": "decryption_failed", "detail": "Decryption failed"}},
            {"ciphertext": "kms:v2:bbb", "version": 2},
        ]
    }
    derived = {
        "results": [DERIVED, {"error": {"status": 409, "code": "key_version_disabled", "detail": "off"}}]
    }
    server = Recorder(
        httpx.Response(200, json=answer), httpx.Response(200, json=answer), httpx.Response(200, json=derived)
    )
    with client(server) as kms:
        out = kms.rewrap_batch(
            "acme",
            "volumes",
            [CiphertextRequest("kms:v1:x", {"a": "b"}), CiphertextRequest("bad"), CiphertextRequest("y")],
        )
        kms.encrypt_batch("acme", "volumes", [EncryptRequest(b"one")])
        derived_out = kms.derive_batch(
            "acme", "volumes", [DeriveRequest("v1", length=64), DeriveRequest("v2", version=1)]
        )
    assert out[0] == Encrypted("kms:v2:aaa", 2) and out[2] == Encrypted("kms:v2:bbb", 2)
    assert isinstance(out[1], DecryptionFailed) and out[1].status == 400
    assert isinstance(derived_out[0], DerivedKey) and derived_out[0].key == b"k" * 32
    assert isinstance(derived_out[1], KeyVersionDisabled) and derived_out[1].detail == "off"
    assert server.body(0) == {
        "batch": [
            {"ciphertext": "kms:v1:x", "context": {"a": "b"}},
            {"ciphertext": "bad"},
            {"ciphertext": "y"},
        ]
    }
    assert server.body(1) == {"batch": [{"plaintext": base64.b64encode(b"one").decode()}]}
    assert server.body(2) == {
        "batch": [
            {"id": "v1", "purpose": "volume", "length": 64},
            {"id": "v2", "purpose": "volume", "length": 32, "version": 1},
        ]
    }


def test_key_material_is_kept_out_of_reprs() -> None:
    dek = DerivedKey(key=b"very-secret-key-bytes", version=1, latest_version=1)
    assert "very-secret" not in repr(dek) and "key=" not in repr(dek)
    assert "very-secret" not in repr(EncryptRequest(b"very-secret"))


def test_sync_and_async_clients_offer_the_same_methods() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(fn)
            for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") and name not in {"close", "aclose"}
        }

    sync, aio = public(KmsClient), public(AsyncKmsClient)
    assert set(sync) == set(aio)
    for name in sync:
        assert list(sync[name].parameters) == list(aio[name].parameters), name
        if name != "iter_audit":
            assert inspect.iscoroutinefunction(getattr(AsyncKmsClient, name)), name
    expected = {
        "derive", "derive_batch", "datakey", "datakey_batch", "encrypt", "encrypt_batch", "decrypt",
        "decrypt_batch", "rewrap", "rewrap_batch", "create_tenant", "list_tenants", "get_tenant",
        "create_key", "list_keys", "get_key", "update_key", "rotate_key", "transition_version",
        "disable_version", "enable_version", "schedule_version_destruction", "restore_version",
        "create_token", "list_tokens", "revoke_token", "list_audit", "iter_audit", "verify_audit",
        "health", "identity",
    }  # fmt: skip
    assert expected <= set(sync)


def test_doctests_in_the_sdk_hold() -> None:
    import doctest

    from kms_client import _core, errors

    for module in (errors, _core):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# -- TLS ---------------------------------------------------------------------------------------


def _cert(
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    issuer: x509.Name | None,
    *,
    ca: bool,
    eku: Any,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        if eku == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate) -> Path:
    data = cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data = (
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            + data
        )
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An HTTPS server requiring a client certificate from our CA; answers /v1/sys/identity with
    the client certificate's CN as cluster_id (so the test sees the handshake really used it)."""
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca = _cert("test-ca", None, None, ca=True, eku=None)
    srv_key, srv = _cert("127.0.0.1", ca_key, ca.subject, ca=False, eku=ExtendedKeyUsageOID.SERVER_AUTH)
    cli_key, cli = _cert("agent-1", ca_key, ca.subject, ca=False, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {
        "ca": _write(d / "ca.pem", None, ca),
        "server": _write(d / "server.pem", srv_key, srv),
        "client_cert": _write(d / "client.pem", None, cli),
        "client_key": d / "client.key",
    }
    files["client_key"].write_bytes(
        cli_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            peer = self.connection.getpeercert()  # type: ignore[attr-defined]
            cn = dict(x[0] for x in peer["subject"])["commonName"]
            body = json.dumps({"cluster_id": cn, "version": "tls"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files["ca"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(files["server"]))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"https://127.0.0.1:{httpd.server_address[1]}", **files}
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_mutual_tls_with_a_private_ca(mtls_server: dict[str, Any]) -> None:
    s = mtls_server
    no_retry = RetryPolicy(max_attempts=1)
    with KmsClient(
        s["url"],
        token="t",
        ca_bundle=s["ca"],
        client_cert=s["client_cert"],
        client_key=s["client_key"],
        retry=no_retry,
    ) as kms:
        assert kms.identity().cluster_id == "agent-1"
    # Without a client certificate the server refuses the handshake.
    with (
        KmsClient(s["url"], token="t", ca_bundle=s["ca"], retry=no_retry) as kms,
        pytest.raises(KmsTransportError),
    ):
        kms.identity()
    # Without the private CA the server's certificate is not trusted; that is not retried.
    fake = FakeTime()
    with (
        KmsClient(
            s["url"], token="t", client_cert=s["client_cert"], client_key=s["client_key"], sleep=fake.sleep
        ) as kms,
        pytest.raises(KmsTransportError, match="CERTIFICATE_VERIFY_FAILED") as caught,
    ):
        kms.identity()
    assert caught.value.code == "tls_error" and fake.sleeps == []
    # verify=False skips server verification (still presenting the client certificate).
    with KmsClient(
        s["url"],
        token="t",
        verify=False,
        client_cert=s["client_cert"],
        client_key=s["client_key"],
        retry=no_retry,
    ) as kms:
        assert kms.identity().cluster_id == "agent-1"


async def test_async_client_uses_the_same_tls_options(mtls_server: dict[str, Any]) -> None:
    s = mtls_server
    async with AsyncKmsClient(
        s["url"], token="t", ca_bundle=s["ca"], client_cert=s["client_cert"], client_key=s["client_key"]
    ) as kms:
        assert (await kms.identity()).cluster_id == "agent-1"


def test_unknown_conflicts_are_conflicts_and_provider_codes_are_provider_errors() -> None:
    from kms_client.errors import Conflict, ProviderError, error_from_problem

    other = error_from_problem({"status": 409, "code": "some_future_conflict", "detail": "x"})
    assert type(other) is Conflict
    provider = error_from_problem({"status": 409, "code": "provider_access_denied", "detail": "x"})
    assert isinstance(provider, ProviderError)
    assert provider.code == "provider_access_denied"
