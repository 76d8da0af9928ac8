"""The `kmip` peer: PyKMIP's own server (`pykmip-server`) with mutual TLS, one per test session.

Certificates come from a throwaway CA made here with `cryptography`. The provider reaches the server
through a small TCP relay the tests can freeze (an outage without restarting the server, whose
shutdown takes ~10 s). Each test gets a fresh, activated AES-256 key owned by the client
certificate's CN; the fixture's admin client uses the same certificate, so it can revoke and destroy
the key the provider uses. PyKMIP reports a revoked key as PERMISSION_DENIED; the provider reads the
key's State to turn that into ProviderKeyDisabled, so `disabled_errors` is narrowed to that.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import ipaddress
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from providers import ProviderKeyDisabled
from providers.kmip import KmipConfig
from tests.conftest import peer_missing
from tests.providers.conftest import Peer

CLIENT_CN = "kms-service-test"
START_TIMEOUT = 30.0


def pykmip() -> SimpleNamespace:
    """PyKMIP's client pieces. Importing any of `kmip` imports its SQLAlchemy 1.x models, which
    warn under SQLAlchemy 2: silenced here, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        enums = importlib.import_module("kmip.core.enums")
        client = importlib.import_module("kmip.pie.client")
        exceptions = importlib.import_module("kmip.pie.exceptions")
    return SimpleNamespace(
        enums=enums,
        ProxyKmipClient=client.ProxyKmipClient,
        KmipOperationFailure=exceptions.KmipOperationFailure,
    )


# --- a throwaway PKI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issuer(certificate, key)


def issue(
    ca: Issuer, cn: str, *, usages: list[x509.ObjectIdentifier] | None, ip: str | None = None
) -> tuple[str, str]:
    """(certificate PEM, unencrypted PKCS#8 key PEM) for ``cn``; ``usages`` None: no EKU at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    certificate = builder.sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


# --- a TCP relay that can be frozen ---------------------------------------------------------------


class PausableRelay:
    """Relays 127.0.0.1:<port> to the server. ``frozen``, it accepts and holds connections and
    relays nothing (a hung server); thawing drops every connection that lived through the freeze."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kmip-test-relay", daemon=True)
        self._thread.start()
        self.accepted = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self.port: int = self._run(self._start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def open_connections(self) -> int:
        """Client connections the relay holds that the client has not hung up."""
        return self._run(self._count())  # type: ignore[no-any-return]

    async def _count(self) -> int:
        return sum(1 for w in self._clients if not w.transport.is_closing())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        self._clients.add(writer)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            up_reader, upstream = await asyncio.open_connection(*self._target)
            self._writers.add(upstream)
            both = (writer, upstream)
            await asyncio.gather(self._pump(reader, upstream, both), self._pump(up_reader, writer, both))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for side in (writer, upstream):
                if side is not None:
                    side.transport.abort()
                    self._writers.discard(side)
            self._clients.discard(writer)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        """Copy until EOF; either side hanging up ends the whole relayed connection."""
        assert self._flowing is not None
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            for side in both:
                side.transport.abort()

    def freeze(self) -> None:
        self._run(self._freeze())

    def thaw(self) -> None:
        self._run(self._thaw())

    async def _freeze(self) -> None:
        assert self._flowing is not None
        self._flowing.clear()

    async def _thaw(self) -> None:
        assert self._flowing is not None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._clients.clear()
        self._flowing.set()

    def close(self) -> None:
        async def stop() -> None:
            await self._thaw()
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


# --- the server -----------------------------------------------------------------------------------


@dataclass
class KmipServer:
    """The running `pykmip-server`, its PKI, and the relay in front of it."""

    host: str
    port: int
    ca: Issuer
    client_cert_pem: str
    client_key_pem: str
    directory: Path
    relay: PausableRelay
    process: subprocess.Popen[bytes]
    log_path: Path
    _files: dict[str, str] = field(default_factory=dict)

    def admin(self) -> contextlib.AbstractContextManager[Any]:
        """A PyKMIP client straight to the server, as the key's owner (same certificate CN)."""
        client = pykmip().ProxyKmipClient(
            hostname=self.host,
            port=self.port,
            cert=self._files["client_cert"],
            key=self._files["client_key"],
            ca=self._files["ca"],
            ssl_version="PROTOCOL_TLSv1_2",
            config_file="/dev/null",
        )
        return contextlib.closing(_Opened(client))

    def new_key(self) -> str:
        enums = pykmip().enums
        with self.admin() as admin:
            uid: str = admin.client.create(enums.CryptographicAlgorithm.AES, 256)
            admin.client.activate(uid)
        return uid

    def revoke(self, uid: str) -> None:
        enums = pykmip().enums
        with self.admin() as admin:
            admin.client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)

    def destroy(self, uid: str) -> None:
        with self.admin() as admin:
            admin.client.destroy(uid)

    def server_decrypt(self, uid: str, iv: bytes, ciphertext: bytes) -> bytes | None:
        """What the server alone makes of a (possibly tampered) blob: plaintext, or None if refused."""
        enums, failure = pykmip().enums, pykmip().KmipOperationFailure
        params = {
            "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
            "block_cipher_mode": enums.BlockCipherMode.CBC,
            "padding_method": enums.PaddingMethod.PKCS5,
        }
        with self.admin() as admin:
            try:
                plaintext = admin.client.decrypt(
                    ciphertext, uid=uid, cryptographic_parameters=params, iv_counter_nonce=iv
                )
            except failure:
                return None
        return bytes(plaintext)

    def config(self, uid: str, **overrides: Any) -> KmipConfig:
        """The provider's config for key ``uid``, through the relay, as plain JSON-like data."""
        raw: dict[str, Any] = {
            "type": "kmip",
            "host": "127.0.0.1",
            "port": self.relay.port,
            "key_uid": uid,
            "ca_pem": self.ca.pem,
            "client_cert_pem": self.client_cert_pem,
            "client_key_pem": self.client_key_pem,
            "timeout_seconds": 2.0,
            **overrides,
        }
        return KmipConfig.model_validate(raw)


class _Opened:
    def __init__(self, client: Any) -> None:
        self.client = client
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # ssl.PROTOCOL_TLSv1_2, as documented
            client.open()

    def close(self) -> None:
        self.client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tls_ready(port: int, context: ssl.SSLContext) -> bool:
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            return True
    except OSError:
        return False


# Runs pykmip-server as its child, in a process group of their own; if pytest dies without its
# teardown (killed, interrupted twice), the group goes too instead of leaking a server.
_WATCHDOG = """
import os, signal, subprocess, sys, time
parent = os.getppid()
server = subprocess.Popen(sys.argv[1:])
while server.poll() is None:
    if os.getppid() != parent:
        os.killpg(0, signal.SIGKILL)
    time.sleep(0.5)
"""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(process: subprocess.Popen[bytes], port: int) -> None:
    """SIGTERM to the group, one connection to wake the accept loop (else the server notices after
    10 s), a short grace period, then SIGKILL for whatever is left (session threads, its policy
    Manager child)."""
    pgid = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=3)
    deadline = time.monotonic() + 3
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    process.wait(timeout=10)


def _write(path: Path, data: str, mode: int = 0o600) -> str:
    path.write_text(data)
    path.chmod(mode)
    return str(path)


@pytest.fixture(scope="session", name="kmip_server")
def fixture_kmip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmipServer]:
    script = Path(sys.executable).with_name("pykmip-server")
    if not script.exists():
        peer_missing(f"pykmip-server not found next to {sys.executable} (pip install pykmip)")
    directory = tmp_path_factory.mktemp("kmip")
    ca = make_ca("kms-test-kmip-ca")
    server_cert, server_key = issue(
        ca, "kmip-server", usages=[ExtendedKeyUsageOID.SERVER_AUTH], ip="127.0.0.1"
    )
    client_cert, client_key = issue(ca, CLIENT_CN, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {
        "ca": _write(directory / "ca.pem", ca.pem, 0o644),
        "server_cert": _write(directory / "server.pem", server_cert, 0o644),
        "server_key": _write(directory / "server.key", server_key),
        "client_cert": _write(directory / "client.pem", client_cert, 0o644),
        "client_key": _write(directory / "client.key", client_key),
    }
    (directory / "policies").mkdir()
    port = _free_port()
    conf = directory / "server.conf"
    conf.write_text(
        "[server]\n"
        "hostname=127.0.0.1\n"
        f"port={port}\n"
        f"certificate_path={files['server_cert']}\n"
        f"key_path={files['server_key']}\n"
        f"ca_path={files['ca']}\n"
        "auth_suite=TLS1.2\n"
        "enable_tls_client_auth=True\n"
        f"policy_path={directory / 'policies'}\n"
        f"database_path={directory / 'kmip.db'}\n"
    )
    log_path = directory / "log" / "server.log"  # pykmip-server needs a directory part
    log_path.parent.mkdir()
    output = (directory / "stdout.txt").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(script), "-f", str(conf), "-l", str(log_path)],
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group of its own: see _WATCHDOG
    )
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.load_verify_locations(cadata=ca.pem)
    probe.load_cert_chain(files["client_cert"], files["client_key"])
    deadline = time.monotonic() + START_TIMEOUT
    while not _tls_ready(port, probe):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process, port)
            output.close()
            stdout = (directory / "stdout.txt").read_text(errors="replace")[-2000:]
            peer_missing(f"pykmip-server did not start (exit {process.returncode}): {stdout}")
        time.sleep(0.1)
    relay = PausableRelay(("127.0.0.1", port))
    server = KmipServer(
        host="127.0.0.1",
        port=port,
        ca=ca,
        client_cert_pem=client_cert,
        client_key_pem=client_key,
        directory=directory,
        relay=relay,
        process=process,
        log_path=log_path,
        _files=files,
    )
    try:
        yield server
    finally:
        relay.close()
        _stop(process, port)
        output.close()


@pytest.fixture
def peer_kmip(kmip_server: KmipServer) -> Iterator[Peer]:
    kmip_server.relay.thaw()
    uid = kmip_server.new_key()

    async def disable() -> None:
        await asyncio.to_thread(kmip_server.revoke, uid)

    @contextlib.asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        kmip_server.relay.freeze()
        try:
            yield
        finally:
            kmip_server.relay.thaw()

    outage_factory: Callable[[], contextlib.AbstractAsyncContextManager[None]] = outage
    yield Peer(
        name="kmip",
        config=kmip_server.config(uid),
        unknown_key=kmip_server.config("kms-test-unknown-" + secrets.token_hex(8)),
        disable=disable,
        outage=outage_factory,
        disabled_errors=(ProviderKeyDisabled,),
        notes="pykmip-server behind a freezable relay; revoke = KMIP Revoke",
    )
    kmip_server.relay.thaw()
