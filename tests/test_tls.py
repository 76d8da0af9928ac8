"""`kms serve` terminating TLS, with real TLS clients: TLS 1.2 minimum, client certificates
(optional / required), agents bound to a certificate, and the settings checks at start."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509

from kms_service.settings import Settings
from kms_service.tls import server_ssl_context
from tests.pki import Ca, Issued
from tests.procs import KMS, kms, kms_env, running_server

pytestmark = pytest.mark.slow

SAN_URI = "spiffe://kms.test/ns/storage/sa/agent"


@dataclass
class Pki:
    ca: Ca
    server: Issued
    by_san: Issued  # bound by its URI SAN: acme/volumes, derive only
    by_spki: Issued  # bound by its key: every key and operation of acme
    stranger: Issued  # issued by the CA, bound to nothing
    rogue: Issued  # from another CA

    def ctx(self, client: Issued | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        if client is not None:
            ctx.load_cert_chain(str(client.cert), str(client.key))
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = Ca(tmp_path / "pki", "test-ca")
    server = ca.issue(
        "server",
        server=True,
        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    return Pki(
        ca=ca,
        server=server,
        by_san=ca.issue("by-san", sans=[x509.UniformResourceIdentifier(SAN_URI)]),
        by_spki=ca.issue("by-spki"),
        stranger=ca.issue("stranger", sans=[x509.UniformResourceIdentifier("spiffe://kms.test/other")]),
        rogue=Ca(tmp_path / "rogue", "rogue-ca").issue(
            "rogue", sans=[x509.UniformResourceIdentifier(SAN_URI)]
        ),
    )


def tls_env(pki: Pki, tmp_path: Path, mode: str) -> dict[str, str]:
    principals = tmp_path / "principals.json"
    principals.write_text(
        json.dumps(
            [
                {
                    "san": SAN_URI,
                    "tenant": "acme",
                    "keys": ["volumes"],
                    "operations": ["derive"],
                    "description": "storage agent",
                },
                {
                    "spki_sha256": pki.by_spki.spki_sha256.upper(),
                    "tenant": "acme",
                    "description": "all of acme",
                },
            ]
        )
    )
    env = {
        "KMS_TLS_CERT_FILE": str(pki.server.cert),
        "KMS_TLS_KEY_FILE": str(pki.server.key),
        "KMS_TLS_CLIENT_CA_FILE": str(pki.ca.cert),
        "KMS_TLS_CLIENT_CERT": mode,
    }
    if mode != "none":
        env["KMS_CERT_PRINCIPALS_FILE"] = str(principals)
    return env


@pytest.fixture
def admin_token(settings: Settings) -> str:
    token = kms(settings, "init").stdout.strip().splitlines()[-1]
    assert token.startswith("kms_")
    return token


@pytest.fixture
def optional_server(settings: Settings, admin_token: str, pki: Pki, tmp_path: Path) -> Iterator[str]:
    with running_server(settings, extra_env=tls_env(pki, tmp_path, "optional"), tls=pki.ctx()) as base:
        assert base.startswith("https://")
        with httpx.Client(
            base_url=base, verify=pki.ctx(), headers={"Authorization": f"Bearer {admin_token}"}
        ) as c:
            for tenant in ("acme", "beta"):
                assert c.post("/v1/tenants", json={"id": tenant, "name": tenant}).status_code == 201
                for key in ("volumes", "other"):
                    r = c.post(
                        f"/v1/tenants/{tenant}/keys", json={"name": key, "provider": {"type": "local"}}
                    )
                    assert r.status_code == 201, r.text
        yield base


def call(
    base: str, ctx: ssl.SSLContext, tenant: str, key: str, op: str = "derive", **kw: Any
) -> httpx.Response:
    body = {"id": "vol-1"} if op == "derive" else {"plaintext": "aGk="}
    with httpx.Client(base_url=base, verify=ctx) as c:
        return c.post(f"/v1/tenants/{tenant}/keys/{key}/{op}", json=body, **kw)


def audit(base: str, pki: Pki, admin_token: str, action: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=base, verify=pki.ctx()) as c:
        r = c.get(f"/v1/audit?action={action}&limit=1000", headers={"Authorization": f"Bearer {admin_token}"})
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["events"]
    return events


def test_a_bound_certificate_derives_within_its_scope_and_sees_nothing_else(
    optional_server: str, pki: Pki, admin_token: str
) -> None:
    san = pki.ctx(pki.by_san)
    r = call(optional_server, san, "acme", "volumes")
    assert r.status_code == 200, r.text
    assert call(optional_server, san, "acme", "other").status_code == 404
    assert call(optional_server, san, "beta", "volumes").status_code == 404
    assert call(optional_server, san, "acme", "volumes", "encrypt").status_code == 404
    spki = pki.ctx(pki.by_spki)
    assert call(optional_server, spki, "acme", "other").status_code == 200
    assert call(optional_server, spki, "acme", "volumes", "encrypt").status_code == 200
    assert call(optional_server, spki, "beta", "other").status_code == 404
    # The same key derives the same DEK whichever credential asked.
    with httpx.Client(base_url=optional_server, verify=pki.ctx()) as c:
        admin = c.post(
            "/v1/tenants/acme/keys/volumes/derive",
            json={"id": "vol-1"},
            headers={"Authorization": f"Bearer {admin_token}"},
        )
    assert admin.json()["key"] == r.json()["key"]
    actors = {e["actor"]["id"] for e in audit(optional_server, pki, admin_token, "key.dek.derived")}
    assert {"cert:" + pki.by_san.spki_sha256[:16], "cert:" + pki.by_spki.spki_sha256[:16]} <= actors


def test_unknown_certificates_and_missing_credentials_are_401_and_audited(
    optional_server: str, pki: Pki, admin_token: str
) -> None:
    r = call(optional_server, pki.ctx(pki.stranger), "acme", "volumes")
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    assert call(optional_server, pki.ctx(), "acme", "volumes").status_code == 401  # neither: as today
    denied = [
        (e["actor"]["id"], e["details"]["reason"])
        for e in audit(optional_server, pki, admin_token, "auth.denied")
    ]
    assert ("cert:" + pki.stranger.spki_sha256[:16], "cert_unknown") in denied
    assert ("-", "missing") in denied
    # A bearer token still works over TLS, next to (and taking precedence over) a certificate.
    with httpx.Client(base_url=optional_server, verify=pki.ctx()) as c:
        r = c.post(
            "/v1/tokens",
            json={"role": "agent", "tenant": "beta", "description": "t"},
            headers={"Authorization": f"Bearer {admin_token}"},
        )
    token = r.json()["token"]
    assert (
        call(
            optional_server,
            pki.ctx(pki.by_san),
            "beta",
            "other",
            headers={"Authorization": f"Bearer {token}"},
        ).status_code
        == 200
    )


def test_a_certificate_from_another_ca_fails_the_handshake(optional_server: str, pki: Pki) -> None:
    # TLS 1.3: the client finishes first, so the server's alert may surface on the first read.
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        call(optional_server, pki.ctx(pki.rogue), "acme", "volumes")


def _handshake(base: str, ctx: ssl.SSLContext) -> str | None:
    url = urlsplit(base)
    assert url.hostname and url.port
    with (
        socket.create_connection((url.hostname, url.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=url.hostname) as tls,
    ):
        return tls.version()


def _legacy_client(pki: Pki, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca.cert))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer the old versions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1: that is the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = maximum
    return ctx


def test_the_legacy_client_really_speaks_tls_1_1(pki: Pki) -> None:
    """Control for the test below: against a server that allows it, this client gets TLS 1.1 (so
    its refusal by `kms serve` is the server's doing)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), server.wrap_socket(conn, server_side=True):
                pass

        thread = threading.Thread(target=accept)
        thread.start()
        try:
            assert (
                _handshake(f"https://127.0.0.1:{port}", _legacy_client(pki, ssl.TLSVersion.TLSv1_1))
                == "TLSv1.1"
            )
        finally:
            thread.join()


def test_the_server_context_enforces_tls_1_2_and_the_client_certificate_mode(
    pki: Pki, tmp_path: Path
) -> None:
    for mode, verify in [
        ("none", ssl.CERT_NONE),
        ("optional", ssl.CERT_OPTIONAL),
        ("required", ssl.CERT_REQUIRED),
    ]:
        env = tls_env(pki, tmp_path, mode)
        ctx = server_ssl_context(
            Settings(
                tls_cert_file=Path(env["KMS_TLS_CERT_FILE"]),
                tls_key_file=Path(env["KMS_TLS_KEY_FILE"]),
                tls_client_ca_file=Path(env["KMS_TLS_CLIENT_CA_FILE"]),
                tls_client_cert=mode,
            )
        )
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == verify


def test_tls_1_1_is_refused_and_1_2_accepted(optional_server: str, pki: Pki) -> None:
    assert _handshake(optional_server, _legacy_client(pki, ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    with pytest.raises(ssl.SSLError) as failed:
        _handshake(optional_server, _legacy_client(pki, ssl.TLSVersion.TLSv1_1))
    # Refused by the server (a protocol-version alert), not by this client's own library.
    assert "NO_PROTOCOLS_AVAILABLE" not in str(failed.value), failed.value
    with pytest.raises(httpx.TransportError):  # and no plain HTTP on the port
        httpx.get(optional_server.replace("https://", "http://") + "/v1/sys/health", timeout=5)


def test_required_client_certificates_fail_the_handshake_without_one(
    settings: Settings, admin_token: str, pki: Pki, tmp_path: Path
) -> None:
    env = tls_env(pki, tmp_path, "required")
    with running_server(settings, "--workers", "2", extra_env=env, tls=pki.ctx(pki.stranger)) as base:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(base + "/v1/sys/health", verify=pki.ctx(), timeout=5)
        for _ in range(4):  # several connections: every worker built its context from the settings
            assert (
                httpx.get(base + "/v1/sys/health", verify=pki.ctx(pki.by_spki), timeout=5).status_code == 200
            )
            with pytest.raises(ssl.SSLError):
                _handshake(base, _legacy_client(pki, ssl.TLSVersion.TLSv1_1))
        assert call(base, pki.ctx(pki.by_san), "acme", "volumes").status_code == 404  # no such tenant yet


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KMS_TLS_CERT_FILE": "{cert}"}, "KMS_TLS_CERT_FILE and KMS_TLS_KEY_FILE: set both"),
        ({"KMS_TLS_KEY_FILE": "{key}"}, "KMS_TLS_CERT_FILE and KMS_TLS_KEY_FILE: set both"),
        (
            {"KMS_TLS_CERT_FILE": "{cert}", "KMS_TLS_KEY_FILE": "{key}", "KMS_TLS_CLIENT_CERT": "required"},
            "KMS_TLS_CLIENT_CERT=required needs KMS_TLS_CLIENT_CA_FILE",
        ),
        (
            {"KMS_TLS_CERT_FILE": "{cert}", "KMS_TLS_KEY_FILE": "{tmp}/nope.key"},
            "KMS_TLS_CERT_FILE/KMS_TLS_KEY_FILE: no such file",
        ),
        (
            {"KMS_TLS_CERT_FILE": "{key}", "KMS_TLS_KEY_FILE": "{cert}"},
            "KMS_TLS_CERT_FILE/KMS_TLS_KEY_FILE: cannot load",
        ),
        (
            {
                "KMS_TLS_CERT_FILE": "{cert}",
                "KMS_TLS_KEY_FILE": "{key}",
                "KMS_TLS_CLIENT_CA_FILE": "{cert}",
                "KMS_TLS_CLIENT_CERT": "optional",
                "KMS_CERT_PRINCIPALS_FILE": "{tmp}/bad.json",
            },
            "KMS_CERT_PRINCIPALS_FILE: ",
        ),
        ({"KMS_JWT_ISSUER": "https://k8s"}, "also needs KMS_JWT_AUDIENCE, KMS_JWT_SUBJECTS_FILE"),
    ],
)
def test_bad_tls_settings_stop_serve_with_a_clear_message(
    settings: Settings, admin_token: str, pki: Pki, tmp_path: Path, env: dict[str, str], message: str
) -> None:
    (tmp_path / "bad.json").write_text('[{"san": "x", "tenant": "acme", "colour": "red"}]')
    fill = {"cert": str(pki.server.cert), "key": str(pki.server.key), "tmp": str(tmp_path)}
    proc = subprocess.run(
        [KMS, "serve"],
        env=kms_env(settings, **{k: v.format(**fill) for k, v in env.items()}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "PRIVATE KEY" not in proc.stderr + proc.stdout
