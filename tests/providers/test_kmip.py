"""The `kmip` provider beyond the conformance suite: hold-your-own-key against PyKMIP's server,
certificate validation, TLS refusals, the blob's integrity against CBC tampering, the connection
pool, and where the client key may (not) appear."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import select
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import SecretStr, ValidationError

import providers.kmip as kmip_module
from providers import (
    ProviderAccessDenied,
    ProviderConfigError,
    ProviderCryptoError,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderUnavailable,
    parse_provider_config,
)
from providers.kmip import KmipConfig, KmipProvider
from tests.providers.conftest import Peer
from tests.providers.peers.kmip import CLIENT_CN, Issuer, KmipServer, issue, make_ca

CTX = {"tenant": "acme", "key": "volumes", "version": "1"}
BOUND = 2.0 * 3 + 5  # the conformance suite's bound on a hung call, for timeout_seconds=2


def _key_body(key_pem: str) -> list[str]:
    """The base64 lines of a PEM key: any one of them showing up is a leak."""
    return [line for line in key_pem.splitlines() if line and not line.startswith("-----")]


def _raw(server: KmipServer, **overrides: Any) -> dict[str, Any]:
    return {
        "type": "kmip",
        "host": "127.0.0.1",
        "port": server.port,
        "key_uid": "1",
        "ca_pem": server.ca.pem,
        "client_cert_pem": server.client_cert_pem,
        "client_key_pem": server.client_key_pem,
        **overrides,
    }


def _entries(directory: Path) -> list[Path]:
    return list(directory.iterdir())


async def _connect(config: KmipConfig) -> KmipProvider:
    provider = await config.connect()
    assert isinstance(provider, KmipProvider)
    return provider


# --- configuration ---------------------------------------------------------------------------------


def test_config_parses_from_plain_json_and_never_shows_the_key(kmip_server: KmipServer) -> None:
    raw = _raw(kmip_server, server_name="127.0.0.1")
    from_json = KmipConfig.model_validate_json(json.dumps(raw))
    from_registry = parse_provider_config(raw)  # how the service parses a stored config
    assert from_json == from_registry
    assert isinstance(from_json.client_key_pem, SecretStr)
    assert from_json.client_key_pem.get_secret_value() == kmip_server.client_key_pem
    assert "client_key_pem" not in from_json.public_view()
    # Stored as public part + sealed secret, then reopened: the same config.
    stored = json.loads(json.dumps(from_json.public_view()))
    reopened = parse_provider_config({**stored, "client_key_pem": kmip_server.client_key_pem})
    assert reopened == from_json
    shown = " ".join(
        [repr(from_json), str(from_json), json.dumps(from_json.public_view()), from_json.model_dump_json()]
    )
    for line in _key_body(kmip_server.client_key_pem):
        assert line not in shown


@pytest.mark.parametrize(
    "usages", [None, [ExtendedKeyUsageOID.SERVER_AUTH]], ids=["no-eku", "server-auth-only"]
)
def test_client_cert_without_client_auth_is_refused(
    kmip_server: KmipServer, usages: list[Any] | None
) -> None:
    cert, key = issue(kmip_server.ca, CLIENT_CN, usages=usages)
    with pytest.raises(ProviderConfigError) as err:
        parse_provider_config(_raw(kmip_server, client_cert_pem=cert, client_key_pem=key))
    assert "clientAuth" in str(err.value)
    assert "client_cert_pem" in str(err.value)
    with pytest.raises(ValidationError) as verr:
        KmipConfig.model_validate(_raw(kmip_server, client_cert_pem=cert, client_key_pem=key))
    for line in _key_body(key):
        assert line not in str(err.value) + str(verr.value)


def _encrypted(key_pem: str) -> str:
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass"),
    ).decode()


@pytest.mark.parametrize(
    ("field", "make", "expected"),
    [
        ("ca_pem", lambda s: "not a pem", "ca_pem is not a PEM certificate"),
        ("client_cert_pem", lambda s: s.ca.pem.replace("CERTIFICATE", "X"), "client_cert_pem is not a PEM"),
        ("client_key_pem", lambda s: s.client_key_pem[:-40], "client_key_pem is not a PEM private key"),
        ("client_key_pem", lambda s: _encrypted(s.client_key_pem), "client_key_pem is encrypted"),
        ("client_key_pem", lambda s: issue(s.ca, "x", usages=None)[1], "is not the private key of"),
        ("host", lambda s: "a,b", "host"),
    ],
    ids=["ca", "cert", "key-garbled", "key-encrypted", "key-mismatch", "host-list"],
)
def test_bad_config_is_refused_with_a_clear_error(
    kmip_server: KmipServer, field: str, make: Any, expected: str
) -> None:
    value = make(kmip_server)
    with pytest.raises(ProviderConfigError) as err:
        parse_provider_config(_raw(kmip_server, **{field: value}))
    with pytest.raises(ValidationError) as verr:
        KmipConfig.model_validate(_raw(kmip_server, **{field: value}))
    message = str(err.value)
    assert expected in message
    for text in (message, str(verr.value)):
        assert "PRIVATE KEY" not in text
        for key in (kmip_server.client_key_pem, value if "KEY" in value else ""):
            for line in _key_body(key):
                for chunk in range(0, len(line) - 11, 12):
                    assert line[chunk : chunk + 12] not in text


# --- hold-your-own-key ---------------------------------------------------------------------------


async def test_revoking_the_key_stops_wrap_and_unwrap(kmip_server: KmipServer) -> None:
    uid = kmip_server.new_key()
    provider = await _connect(kmip_server.config(uid))
    try:
        secret = os.urandom(32)
        blob = await provider.wrap(secret, context=CTX)
        assert await provider.unwrap(blob, context=CTX) == secret
        info = await provider.describe()
        assert info.key_ref == f"kmip://127.0.0.1:{kmip_server.relay.port}/{uid}"
        assert {k: info.details[k] for k in ("algorithm", "length", "state")} == {
            "algorithm": "AES",
            "length": 256,
            "state": "ACTIVE",
        }

        await asyncio.to_thread(kmip_server.revoke, uid)

        for call in (provider.unwrap(blob, context=CTX), provider.wrap(os.urandom(32), context=CTX)):
            with pytest.raises(ProviderKeyDisabled) as err:
                await call
            assert uid in str(err.value)
            assert "DEACTIVATED" in str(err.value)
        health = await provider.health()
        assert not health.ok
        assert "DEACTIVATED" in health.detail
    finally:
        await provider.close()


async def test_destroying_the_key_stops_wrap_and_unwrap(kmip_server: KmipServer) -> None:
    uid = kmip_server.new_key()
    provider = await _connect(kmip_server.config(uid))
    try:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        await asyncio.to_thread(kmip_server.revoke, uid)  # KMIP destroys only non-Active keys
        await asyncio.to_thread(kmip_server.destroy, uid)
        for call in (provider.unwrap(blob, context=CTX), provider.wrap(os.urandom(32), context=CTX)):
            with pytest.raises(ProviderKeyNotFound) as err:
                await call
            assert uid in str(err.value)
            assert CLIENT_CN in str(err.value)  # names the identity that cannot see it
        assert not (await provider.health()).ok
    finally:
        await provider.close()


# --- TLS refusals --------------------------------------------------------------------------------


def _untrusted_client(server: KmipServer) -> dict[str, Any]:
    other = make_ca("some-other-ca")
    cert, key = issue(other, CLIENT_CN, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    return {"client_cert_pem": cert, "client_key_pem": key}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (_untrusted_client, "must trust the CA that issued client_cert_pem"),
        (lambda s: {"ca_pem": make_ca("not-the-server-ca").pem}, "failed verification"),
        (lambda s: {"server_name": "kmip.example.com"}, "kmip.example.com"),
    ],
    ids=["client-cert-from-another-ca", "server-not-under-ca_pem", "server-name-mismatch"],
)
async def test_tls_refusal_is_access_denied(kmip_server: KmipServer, overrides: Any, expected: str) -> None:
    config = kmip_server.config(kmip_server.new_key(), **overrides(kmip_server))
    provider = await _connect(config)
    try:
        with pytest.raises(ProviderAccessDenied) as err:
            await provider.wrap(os.urandom(32), context=CTX)
        assert expected in str(err.value)
        health = await provider.health()
        assert not health.ok
        assert expected in health.detail
    finally:
        await provider.close()


# --- the blob's integrity ------------------------------------------------------------------------


def _flip(blob: bytes, index: int) -> bytes:
    out = bytearray(blob)
    out[index] ^= 0x80
    return bytes(out)


async def test_cbc_bit_flips_that_the_server_accepts_are_refused(kmip_server: KmipServer) -> None:
    """CBC alone is malleable: flipping a bit of the IV flips the same bit of the decrypted S, and
    the server happily returns that wrong S. The provider's tag must refuse every such blob."""
    uid = kmip_server.new_key()
    provider = await _connect(kmip_server.config(uid))
    try:
        secret = os.urandom(32)
        blob = await provider.wrap(secret, context=CTX)
        iv, ciphertext = blob[1:17], blob[17:]
        blocks = len(ciphertext) // 16
        assert blocks == 5  # 32-byte S + 32-byte tag + a padding block

        original = await asyncio.to_thread(kmip_server.server_decrypt, uid, iv, ciphertext)
        assert original is not None
        assert original[:32] == secret

        # Position 1 is the IV's first byte; 17 + 16*b the first byte of ciphertext block b.
        accepted_by_server = 0
        for index in [1, 8] + [17 + 16 * b for b in range(blocks)]:
            tampered = _flip(blob, index)
            plaintext = await asyncio.to_thread(
                kmip_server.server_decrypt, uid, tampered[1:17], tampered[17:]
            )
            if plaintext is not None:
                accepted_by_server += 1
                assert plaintext != original
            with pytest.raises(ProviderCryptoError):
                await provider.unwrap(tampered, context=CTX)
        # The IV flips and the early block flips decrypt fine at the server: the tag caught them.
        assert accepted_by_server >= 4
        flipped_iv = await asyncio.to_thread(kmip_server.server_decrypt, uid, _flip(iv, 0), ciphertext)
        assert flipped_iv is not None
        assert flipped_iv[0] == secret[0] ^ 0x80
        assert flipped_iv[1:32] == secret[1:]

        # Splicing and reordering blocks of two blobs, and dropping a block.
        other = await provider.wrap(os.urandom(32), context=CTX)
        for forged in (
            blob[:17] + other[17:],
            other[:17] + blob[17:],
            blob[:17] + blob[33:49] + blob[17:33] + blob[49:],
            blob[:17] + other[17:33] + blob[33:],
            blob[:-16],
            blob[:17] + blob[33:],
        ):
            with pytest.raises(ProviderCryptoError):
                await provider.unwrap(forged, context=CTX)
        assert await provider.unwrap(blob, context=CTX) == secret
    finally:
        await provider.close()


def test_context_encoding_is_injective() -> None:
    pairs = [
        ({"a": "bc"}, {"ab": "c"}),
        ({"a": ""}, {}),
        ({"a": "b", "c": "d"}, {"a": "b\x00\x00\x00\x01c\x00\x00\x00\x01d"}),
        ({"t": "x", "k": "y"}, {"t": "y", "k": "x"}),
    ]
    for left, right in pairs:
        assert _kmip_context(left) != _kmip_context(right)
    assert _kmip_context({"a": "1", "b": "2"}) == _kmip_context({"b": "2", "a": "1"})


async def test_context_that_shifts_a_boundary_is_refused(peer_kmip: Peer) -> None:
    provider = await peer_kmip.config.connect()
    try:
        blob = await provider.wrap(os.urandom(32), context={"a": "bc"})
        with pytest.raises(ProviderCryptoError):
            await provider.unwrap(blob, context={"ab": "c"})
    finally:
        await provider.close()


# --- connections ---------------------------------------------------------------------------------


async def test_50_concurrent_unwraps_share_a_bounded_pool(kmip_server: KmipServer) -> None:
    provider = await _connect(kmip_server.config(kmip_server.new_key()))
    try:
        before = kmip_server.relay.accepted
        secrets = [os.urandom(32) for _ in range(50)]
        blobs = await asyncio.gather(*(provider.wrap(s, context=CTX) for s in secrets))
        results = await asyncio.gather(*(provider.unwrap(b, context=CTX) for b in blobs))
        assert results == secrets
        # 100 calls, 50 at a time, over at most the pool's size of connections.
        assert 1 <= kmip_server.relay.accepted - before <= kmip_module._MAX_CONNECTIONS
        assert kmip_server.relay.open_connections >= 1
    finally:
        await provider.close()
    for _ in range(40):  # bounded wait: close() hangs up every pooled connection
        if kmip_server.relay.open_connections == 0:
            break
        await asyncio.sleep(0.05)
    assert kmip_server.relay.open_connections == 0


async def test_a_pooled_connection_dropped_while_idle_is_replaced(kmip_server: KmipServer) -> None:
    provider = await _connect(kmip_server.config(kmip_server.new_key()))
    try:
        secret = os.urandom(32)
        blob = await provider.wrap(secret, context=CTX)
        before = kmip_server.relay.accepted
        kmip_server.relay.thaw()  # drops every relayed connection, as a server's idle timeout would
        assert await provider.unwrap(blob, context=CTX) == secret
        assert kmip_server.relay.accepted == before + 1
    finally:
        await provider.close()


async def test_provider_recovers_after_an_outage(peer_kmip: Peer) -> None:
    assert peer_kmip.outage is not None
    provider = await peer_kmip.config.connect()
    try:
        secret = os.urandom(32)
        blob = await provider.wrap(secret, context=CTX)
        async with peer_kmip.outage():
            with pytest.raises(ProviderUnavailable) as err:
                await asyncio.wait_for(provider.unwrap(blob, context=CTX), BOUND)
            assert "within 2 s" in str(err.value)
        # The relay dropped the pooled connection: the next call reconnects transparently.
        assert await provider.unwrap(blob, context=CTX) == secret
        assert (await provider.health()).ok
    finally:
        await provider.close()
    with pytest.raises(ProviderUnavailable):
        await provider.unwrap(blob, context=CTX)
    await provider.close()  # idempotent


class DribblingTlsServer:
    """A TLS endpoint (trusted, mutual TLS) that answers any request with one byte per TLS record
    every ``gap`` seconds, forever: each read completes within the socket timeout, so only a
    caller-side deadline ends the call. Records when the client hangs up."""

    def __init__(self, ca: Issuer, directory: Path, gap: float = 0.3) -> None:
        cert, key = issue(ca, "dribbler", usages=[ExtendedKeyUsageOID.SERVER_AUTH], ip="127.0.0.1")
        (directory / "dribbler.pem").write_text(cert)
        (directory / "dribbler.key").write_text(key)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(directory / "dribbler.pem", directory / "dribbler.key")
        self._context.verify_mode = ssl.CERT_REQUIRED
        self._context.load_verify_locations(cadata=ca.pem)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(30)
        self.port: int = self._listener.getsockname()[1]
        self._gap = gap
        self.dribbling = threading.Event()
        self.hung_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="kmip-test-dribbler")
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            raw, _ = self._listener.accept()
            with self._context.wrap_socket(raw, server_side=True) as conn:
                conn.recv(65536)  # the request
                self.dribbling.set()
                deadline = time.monotonic() + 60
                while not self._stop.is_set() and time.monotonic() < deadline:
                    conn.sendall(b"\x42")  # one TLS record each
                    readable, _, _ = select.select([conn], [], [], self._gap)
                    if readable and not conn.recv(1):
                        break
        self.hung_up.set()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)


async def test_a_dribbling_server_is_hung_up_at_the_deadline(kmip_server: KmipServer, tmp_path: Path) -> None:
    """The socket timeout bounds each read, not a call: a server sending a byte now and then would
    hold a worker thread forever. The provider must give up at its deadline and hang up."""
    dribbler = DribblingTlsServer(kmip_server.ca, tmp_path)
    config = kmip_server.config("1").model_copy(update={"port": dribbler.port})
    provider = await _connect(config)
    try:
        with pytest.raises(ProviderUnavailable) as err:
            await asyncio.wait_for(provider.wrap(os.urandom(32), context=CTX), BOUND)
        assert "within 2 s" in str(err.value)
        assert dribbler.dribbling.is_set()
        # Bounded wait: without the hang-up the thread would read a byte every 0.3 s for ever.
        assert await asyncio.to_thread(dribbler.hung_up.wait, 1.5)
    finally:
        dribbler.close()
        await provider.close()


# --- where the client key and the secrets may appear -----------------------------------------------


@contextlib.contextmanager
def _debug_logging(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


async def test_no_client_key_or_secret_in_logs_reprs_or_errors(
    kmip_server: KmipServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = os.urandom(32)
    errors: list[str] = []
    config = kmip_server.config(kmip_server.new_key())
    untrusted = kmip_server.config(config.key_uid, **_untrusted_client(kmip_server))
    with _debug_logging("kmip", "kmip.services.kmip_protocol", "providers"):
        provider = await _connect(config)
        try:
            blob = await provider.wrap(secret, context=CTX)
            assert await provider.unwrap(blob, context=CTX) == secret
            for bad_blob, ctx in ((_flip(blob, 20), CTX), (blob, {**CTX, "tenant": "other"})):
                with pytest.raises(ProviderCryptoError) as err:
                    await provider.unwrap(bad_blob, context=ctx)
                errors.append(f"{err.value!r} {err.value}")
            other = await _connect(untrusted)
            try:
                with pytest.raises(ProviderAccessDenied) as denied:
                    await other.unwrap(blob, context=CTX)
                errors.append(f"{denied.value!r} {denied.value}")
            finally:
                await other.close()
        finally:
            await provider.close()
    assert "KMIPProtocol.write" not in caplog.text  # PyKMIP's wire dumps carry plaintexts
    assert "TLSV1_ALERT_UNKNOWN_CA" in caplog.text  # ... while its other logs still flow
    haystack = "\n".join(
        [caplog.text, *errors, repr(provider), repr(config), str(config), json.dumps(config.public_view())]
    )
    for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
        assert form not in haystack
    for key in (kmip_server.client_key_pem, untrusted.client_key_pem.get_secret_value()):
        for line in _key_body(key):
            assert line not in haystack


async def test_client_key_never_touches_a_filesystem(
    kmip_server: KmipServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    seen: list[tuple[str, str]] = []
    original = kmip_module._pem_paths

    @contextlib.contextmanager
    def spy(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
        with original(cert_pem, key_pem) as paths:
            seen.append(paths)
            assert Path(paths[1]).read_bytes() == key_pem
            yield paths

    monkeypatch.setattr(kmip_module, "_pem_paths", spy)
    provider = await _connect(kmip_server.config(kmip_server.new_key()))
    try:
        secret = os.urandom(32)
        assert await provider.unwrap(await provider.wrap(secret, context=CTX), context=CTX) == secret
    finally:
        await provider.close()
    assert len(seen) == 1
    assert all(p.startswith("/proc/self/fd/") for p in seen[0])  # memfd: anonymous memory
    assert _entries(tmp_path) == []


async def test_without_memfd_the_key_file_is_private_and_removed(
    kmip_server: KmipServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    seen: list[Path] = []
    original = kmip_module._pem_paths

    @contextlib.contextmanager
    def spy(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
        with original(cert_pem, key_pem) as paths:
            key_path = Path(paths[1])
            seen.append(key_path.parent)
            assert key_path.parent.parent == tmp_path
            assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
            assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
            assert key_path.read_bytes() == key_pem
            yield paths

    monkeypatch.setattr(kmip_module, "_pem_paths", spy)
    provider = await _connect(kmip_server.config(kmip_server.new_key()))
    try:
        assert len(seen) == 1
        assert not seen[0].exists()  # gone once the SSLContext holds the key
        secret = os.urandom(32)
        assert await provider.unwrap(await provider.wrap(secret, context=CTX), context=CTX) == secret
    finally:
        await provider.close()
    assert _entries(tmp_path) == []


def _kmip_context(context: dict[str, str]) -> bytes:
    from providers.base import encode_context

    return encode_context(context, *kmip_module._MAC_LABEL)
