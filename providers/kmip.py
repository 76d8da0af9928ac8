"""The `kmip` provider: hold-your-own-key on the customer's KMIP server, over mutual TLS.

Every wrap and every unwrap is an Encrypt/Decrypt call to the customer's server with the customer's
AES-256 key, so the customer holds the off switch: revoking or destroying the key there (or removing
the client's access) stops unwraps as soon as the service's cached secrets expire (at most the
unwrapped-KEK cache TTL). The service never sees the KMIP key and never persists an unwrapped S.

What the customer's KMIP server must allow (KMIP 1.2 or later) for the client certificate's identity:

- Encrypt and Decrypt with the key named by ``key_uid``: a symmetric AES-256 key in state Active
  whose Cryptographic Usage Mask includes Encrypt and Decrypt, with cryptographic parameters
  AES / CBC / PKCS5 padding and a caller-supplied 16-byte IV.
- Get Attributes on that key (State, Cryptographic Algorithm, Cryptographic Length): used by the
  health probe and ``describe()``, and to tell a revoked key from a permission problem. Nothing
  else: no Create, Get (the key never leaves the server), Locate or Destroy.

TLS requirements: mutual TLS, TLS 1.2 or later, any cipher suite OpenSSL's defaults accept (TLS 1.3,
or TLS 1.2 with ECDHE and AES-GCM or AES-CBC-SHA256). The client
certificate must carry Extended Key Usage ``clientAuth``; the server certificate must be valid for
``server_name`` (default: ``host``; an IP address must be in its subjectAltName) and chain to
``ca_pem``. The client key is loaded into memory only: on Linux through an anonymous memory file,
elsewhere through a 0600 file in a 0700 directory deleted as soon as it is read.

Setup, on the customer's side:

1. Create an AES-256 symmetric key with usage Encrypt + Decrypt and activate it; note its Unique
   Identifier (``key_uid``).
2. Issue a client certificate for the service (EKU clientAuth) from a CA the KMIP server trusts for
   client authentication, and grant its identity (usually the subject CN) Encrypt, Decrypt and Get
   Attributes on the key.
3. Allow TCP from the service's egress addresses to the server's KMIP port (5696 by default).
4. Give the service ``host``, ``port``, ``key_uid``, the server's CA (``ca_pem``), the client
   certificate and its unencrypted private key (``client_key_pem``: write-only, stored sealed and
   never shown again) and, if the server certificate names a DNS name other than ``host``,
   ``server_name``.

To cut the service off: Revoke the key (stops wraps everywhere; stops unwraps on servers that,
like PyKMIP's, refuse Decrypt with a Deactivated key: the KMIP specification lets a server still
allow it), Destroy it, or remove the identity's permissions. The latter two stop unwraps on every
server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import logging
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from providers.base import (
    KeyProvider,
    ProviderAccessDenied,
    ProviderConfig,
    ProviderCryptoError,
    ProviderError,
    ProviderHealth,
    ProviderInfo,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderUnavailable,
    WrapContext,
    context_mac,
)

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

# blob = _FORMAT ‖ IV (16) ‖ AES-256-CBC-PKCS#5 ciphertext of P, P = S ‖ HMAC-SHA256(S, context)
_FORMAT = b"\x01"
_IV_LEN = 16
_BLOCK = 16
_TAG_LEN = 32
_MIN_SECRET, _MAX_SECRET = 16, 1024
_MIN_CIPHERTEXT = ((_MIN_SECRET + _TAG_LEN) // _BLOCK + 1) * _BLOCK
_MAC_LABEL = ("kms/v1", "kmip-wrap")

_MAX_CONNECTIONS = 8
"""TLS connections (and worker threads) per provider: concurrent calls queue for one."""
_IDLE_SECONDS = 30.0
"""An idle pooled connection older than this is closed rather than reused (servers drop them)."""

_MALFORMED = "wrapped secret is malformed"
_UNWRAP_FAILED = "wrapped secret could not be unwrapped (wrong key or context, or altered)"


def _tag(secret: bytes, context: WrapContext) -> bytes:
    return context_mac(secret, context, *_MAC_LABEL)


# Why the blob needs our own integrity check, and why this one holds.
#
# The KMIP server only offers unauthenticated AES-CBC: CBC is malleable, so whoever can edit a blob
# (storage, backups) can flip chosen bits of a plaintext block by flipping the IV or the previous
# ciphertext block, randomise a block by editing it, splice blocks of other blobs, or truncate.
# The server decrypts all of that without complaint (only PKCS#5 padding is checked), so on its
# own it would hand us a wrong S. We therefore encrypt P = S ‖ T with T = HMAC-SHA256(key=S,
# msg=enc(context)), enc injective, and on unwrap accept S' ‖ T' only if T' = HMAC(S', enc(ctx)),
# compared in constant time. An attacker without the KMIP key does not know S, hence not S' either
# (S' is S with known flips, or garbage): leaving T alone needs HMAC(S', c) = HMAC(S, c), a
# collision of a PRF under two keys; changing T needs the HMAC of an unknown key, i.e. a forgery;
# tags from other blobs are HMACs under other secrets or contexts (replay under another context is
# exactly that case). Truncation and splicing move the S/T boundary and land in the same cases.
# The tag needs no key of its own because S is a uniformly random secret the attacker never sees.
#
# Residual risk: the PKCS#5 check happens on the server, before ours. Both failures surface as the
# same ProviderCryptoError with the same message, but they take different paths (an error answer
# vs. a local tag mismatch), so a padding oracle is not excluded by construction: it would take an
# attacker who can plant blobs in storage, trigger many unwraps of them, and tell the two paths
# apart by fine timing or from the KMIP server's logs; every probe is a failed Decrypt in the
# customer's audit trail. CBC without padding, or AES-GCM with its tag (PyKMIP drops tags), would
# close it; we use CBC-PKCS#5 because every KMIP server implementing Encrypt offers it.


class KmipConfig(ProviderConfig):
    """`{"type": "kmip", "host": ..., "key_uid": ..., "ca_pem": ..., "client_cert_pem": ...,
    "client_key_pem": ...}`: a customer's AES-256 key on their KMIP server (hold-your-own-key)."""

    # Validation errors name the field and the reason, never the input (it may hold the key).
    model_config = ConfigDict(hide_input_in_errors=True)

    type: Literal["kmip"] = "kmip"
    host: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:\-\[\]]+$")]
    port: Annotated[int, Field(ge=1, le=65535)] = 5696
    key_uid: Annotated[str, Field(min_length=1, max_length=256)]
    """The Unique Identifier of the customer's AES-256 key."""
    ca_pem: Annotated[str, Field(min_length=1, max_length=65536)]
    """CA certificate(s), PEM, that the KMIP server's certificate must chain to."""
    client_cert_pem: Annotated[str, Field(min_length=1, max_length=65536)]
    """The service's client certificate (PEM, EKU clientAuth), optionally followed by intermediates."""
    client_key_pem: Annotated[SecretStr, Field(repr=False)]
    """The client certificate's private key, unencrypted PEM. Write-only."""
    server_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """Name the server certificate must be valid for (and TLS SNI); default: ``host``."""

    secret_fields: ClassVar[frozenset[str]] = frozenset({"client_key_pem"})

    @field_validator("host")
    @classmethod
    def _bare_host(cls, value: str) -> str:
        return value.removeprefix("[").removesuffix("]")

    @field_validator("ca_pem")
    @classmethod
    def _ca_parses(cls, value: str) -> str:
        _load_certificates(value, "ca_pem")
        return value

    @field_validator("client_cert_pem")
    @classmethod
    def _client_cert_parses(cls, value: str) -> str:
        leaf = _load_certificates(value, "client_cert_pem")[0]
        try:
            usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise ValueError(
                "client_cert_pem has no Extended Key Usage extension: KMIP servers require "
                "clientAuth (1.3.6.1.5.5.7.3.2); issue the certificate with EKU clientAuth"
            ) from None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise ValueError(
                "client_cert_pem's Extended Key Usage lacks clientAuth (1.3.6.1.5.5.7.3.2): the KMIP "
                "server will refuse it; issue the certificate with EKU clientAuth"
            )
        return value

    @field_validator("client_key_pem")
    @classmethod
    def _client_key_parses(cls, value: SecretStr) -> SecretStr:
        _load_private_key(value)
        return value

    @model_validator(mode="after")
    def _key_matches_cert(self) -> KmipConfig:
        leaf = _load_certificates(self.client_cert_pem, "client_cert_pem")[0]
        key = _load_private_key(self.client_key_pem)
        if _spki(leaf.public_key()) != _spki(key.public_key()):
            raise ValueError("client_key_pem is not the private key of client_cert_pem")
        return self

    async def connect(self, *, local_wrapping_key: bytes | None = None) -> KeyProvider:
        pykmip = _import_pykmip()
        try:
            context = await asyncio.to_thread(_client_ssl_context, self)
        except (ssl.SSLError, OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else type(exc).__name__
            raise ProviderError(
                f"TLS could not load ca_pem, client_cert_pem or client_key_pem ({reason})"
            ) from None
        return KmipProvider(self, pykmip=pykmip, ssl_context=context)


def _load_certificates(pem: str, field: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("utf-8"))
    except ValueError:
        certificates = []
    if not certificates:
        raise ValueError(f"{field} is not a PEM certificate (-----BEGIN CERTIFICATE-----)")
    return certificates


def _load_private_key(pem: SecretStr) -> Any:
    try:
        return serialization.load_pem_private_key(pem.get_secret_value().encode("utf-8"), password=None)
    except TypeError:
        raise ValueError("client_key_pem is encrypted: provide the key as unencrypted PEM") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("client_key_pem is not a PEM private key (RSA or EC)") from None


def _spki(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _identity(config: KmipConfig) -> str:
    """The client certificate's subject CN: the identity most KMIP servers grant access to."""
    leaf = _load_certificates(config.client_cert_pem, "client_cert_pem")[0]
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else leaf.subject.rfc4514_string()


# --- TLS: the client key goes into an SSLContext and nowhere else -------------------------------


@contextlib.contextmanager
def _pem_paths(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths OpenSSL can read the client certificate and key from, valid inside the block only.

    Python's ``ssl`` loads a key only from a path. On Linux the paths are anonymous memory files
    (memfd: no filesystem ever holds the key); elsewhere 0600 files in a fresh 0700 directory,
    removed on exit.
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for name, data in (("kmip-client-cert", cert_pem), ("kmip-client-key", key_pem)):
                fd = memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
                fds.append(fd)
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="kms-kmip-")  # created 0700
    try:
        paths = []
        for name, data in (("client.crt", cert_pem), ("client.key", key_pem)):
            path = os.path.join(directory, name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(path, flags, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            paths.append(path)
        yield paths[0], paths[1]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _client_ssl_context(config: KmipConfig) -> ssl.SSLContext:
    """Mutual TLS ≥ 1.2, server certificate checked against ``ca_pem`` and the server name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=config.ca_pem)
    cert_pem = config.client_cert_pem.encode("utf-8")
    key_pem = config.client_key_pem.get_secret_value().encode("utf-8")
    with _pem_paths(cert_pem, key_pem) as (cert_path, key_path):
        context.load_cert_chain(cert_path, key_path)
    return context


# --- PyKMIP, imported lazily and typed as Any ----------------------------------------------------


@dataclass(frozen=True)
class _PyKmip:
    client_class: Any
    protocol_class: Any
    enums: Any
    operation_failure: type[Exception]
    wire_errors: tuple[type[BaseException], ...]


class _NoWireDumps(logging.Filter):
    """PyKMIP's protocol logger dumps whole messages (plaintexts included) at DEBUG: drop those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


def _import_pykmip() -> _PyKmip:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its SQLAlchemy 1.x imports
            client = importlib.import_module("kmip.pie.client")
            pie_exceptions = importlib.import_module("kmip.pie.exceptions")
            protocol = importlib.import_module("kmip.services.kmip_protocol")
            enums = importlib.import_module("kmip.core.enums")
    except ModuleNotFoundError as exc:
        raise ProviderError(
            "the kmip provider needs PyKMIP: install the service with the 'kmip' extra"
        ) from exc
    wire_logger = logging.getLogger("kmip.services.kmip_protocol")
    if not any(isinstance(f, _NoWireDumps) for f in wire_logger.filters):
        wire_logger.addFilter(_NoWireDumps())
    return _PyKmip(
        client_class=client.ProxyKmipClient,
        protocol_class=protocol.KMIPProtocol,
        enums=enums,
        operation_failure=pie_exceptions.KmipOperationFailure,
        wire_errors=(EOFError, protocol.RequestLengthMismatch),
    )


# --- Connections and calls ------------------------------------------------------------------------


class _Refused(Exception):
    """The server answered with a KMIP failure; ``state`` is the key's State when we could read it."""

    def __init__(self, operation: str, reason: str, message: str, state: str | None) -> None:
        super().__init__(f"{operation}: {reason}")
        self.operation = operation
        self.reason = reason
        self.message = message
        self.state = state


class _Aborted(Exception):
    """The caller gave up on this call (deadline or cancellation) before it had a connection."""


class _Call:
    """One call's handle on its socket, so the event loop can hang it up from outside the thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.aborted = False

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self.aborted:
                raise _Aborted
            self._socket = sock

    def abort(self) -> None:
        """Unblock the worker: shutting the socket down ends any recv/send in progress at once."""
        with self._lock:
            self.aborted = True
            sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, not SSLSocket's (which also drops its TLS state
                # under the reading thread's feet).
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


@dataclass
class _Connection:
    client: Any
    last_used: float

    @property
    def socket(self) -> socket.socket | None:
        sock: socket.socket | None = self.client.proxy.socket
        return sock

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


class KmipProvider(KeyProvider):
    """A customer's AES-256 key on their KMIP server. PyKMIP's client blocks, so every call runs in
    this provider's own worker threads on a pooled TLS connection, under ``timeout_seconds``: the
    sockets time out, and past the deadline the caller hangs the socket up, so no thread or socket
    outlives a stuck server."""

    type: ClassVar[str] = "kmip"

    def __init__(self, config: KmipConfig, *, pykmip: _PyKmip, ssl_context: ssl.SSLContext) -> None:
        self._config = config
        self._kmip = pykmip
        self._ssl = ssl_context
        self._timeout = config.timeout_seconds
        self._server_name = config.server_name or config.host
        self._identity = _identity(config)
        host = f"[{config.host}]" if ":" in config.host else config.host
        self._where = f"{host}:{config.port}"
        self._key_ref = f"kmip://{self._where}/{config.key_uid}"
        enums = pykmip.enums
        self._cbc_pkcs5 = {
            "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
            "block_cipher_mode": enums.BlockCipherMode.CBC,
            "padding_method": enums.PaddingMethod.PKCS5,
        }
        # Dedicated threads: calls never queue behind the loop's shared executor, so the deadline
        # measures the server, and a slot is held until its thread has really finished.
        self._executor = ThreadPoolExecutor(max_workers=_MAX_CONNECTIONS, thread_name_prefix="kmip")
        self._slots = asyncio.Semaphore(_MAX_CONNECTIONS)
        self._pool_lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._inflight: set[_Call] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"KmipProvider({self._key_ref!r})"

    # -- the contract

    async def wrap(self, secret: bytes, *, context: WrapContext) -> bytes:
        if not _MIN_SECRET <= len(secret) <= _MAX_SECRET:
            raise ProviderError(f"the secret to wrap must be {_MIN_SECRET} to {_MAX_SECRET} bytes")
        plaintext = secret + _tag(secret, context)
        iv = os.urandom(_IV_LEN)
        uid = self._config.key_uid

        def encrypt(client: Any) -> tuple[bytes, bytes | None]:
            ciphertext, server_iv = client.encrypt(
                plaintext, uid=uid, cryptographic_parameters=self._cbc_pkcs5, iv_counter_nonce=iv
            )
            return bytes(ciphertext), server_iv

        ciphertext, server_iv = await self._call("Encrypt", encrypt)
        if server_iv is not None:  # a server may pick its own IV; KMIP returns it then
            iv = bytes(server_iv)
        expected = (len(plaintext) // _BLOCK + 1) * _BLOCK
        if len(ciphertext) != expected or len(iv) != _IV_LEN:
            raise ProviderCryptoError(
                f"the KMIP server at {self._where} did not encrypt with AES-CBC and PKCS#5 padding; "
                "is the key an AES key?"
            )
        return _FORMAT + iv + ciphertext

    async def unwrap(self, blob: bytes, *, context: WrapContext) -> bytes:
        body = len(blob) - 1 - _IV_LEN
        if blob[:1] != _FORMAT or body < _MIN_CIPHERTEXT or body % _BLOCK:
            raise ProviderCryptoError(_MALFORMED)
        iv, ciphertext = blob[1 : 1 + _IV_LEN], blob[1 + _IV_LEN :]
        uid = self._config.key_uid

        def decrypt(client: Any) -> bytes:
            return bytes(
                client.decrypt(
                    ciphertext, uid=uid, cryptographic_parameters=self._cbc_pkcs5, iv_counter_nonce=iv
                )
            )

        plaintext = await self._call("Decrypt", decrypt)
        secret, tag = plaintext[:-_TAG_LEN], plaintext[-_TAG_LEN:]
        if len(secret) < _MIN_SECRET or not hmac.compare_digest(tag, _tag(secret, context)):
            _log.info("kmip unwrap refused: integrity check failed (key %s)", self._key_ref)
            raise ProviderCryptoError(_UNWRAP_FAILED)
        return secret

    async def describe(self) -> ProviderInfo:
        details: dict[str, Any] = {"server": self._where, "identity": self._identity}
        try:
            attributes = await self._call(
                "Get Attributes", self._attributes("Cryptographic Algorithm", "Cryptographic Length", "State")
            )
        except ProviderError as exc:
            details["attributes_error"] = str(exc)
        else:
            for name, key in (
                ("Cryptographic Algorithm", "algorithm"),
                ("Cryptographic Length", "length"),
                ("State", "state"),
            ):
                if name in attributes:
                    details[key] = attributes[name]
        return ProviderInfo(type=self.type, key_ref=self._key_ref, hsm_backed=False, details=details)

    async def health(self) -> ProviderHealth:
        start = time.perf_counter()
        try:
            attributes = await self._call("Get Attributes", self._attributes("State"))
        except Exception as exc:  # never raises: a probe reports
            detail = str(exc) if isinstance(exc, ProviderError) else f"unexpected {type(exc).__name__}"
            return ProviderHealth(ok=False, latency_ms=_ms_since(start), detail=detail)
        state = attributes.get("State", "unknown")
        ok = state == "ACTIVE"
        detail = "" if ok else f"KMIP key {self._config.key_uid!r} is in state {state}, not ACTIVE"
        return ProviderHealth(ok=ok, latency_ms=_ms_since(start), detail=detail)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for call in list(self._inflight):
            call.abort()
        # Aborted calls end at once; one stuck connecting ends within the socket timeout.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    # -- calls

    def _attributes(self, *names: str) -> Callable[[Any], dict[str, Any]]:
        uid = self._config.key_uid

        def get_attributes(client: Any) -> dict[str, Any]:
            _uid, attributes = client.get_attributes(uid, list(names))
            return {a.attribute_name.value: _plain(a.attribute_value) for a in attributes}

        return get_attributes

    async def _call(self, operation: str, work: Callable[[Any], _T]) -> _T:
        """Run ``work(client)`` on a pooled connection in a worker thread, within the timeout."""
        if self._closed:
            raise ProviderUnavailable("the kmip provider is closed")
        try:
            await asyncio.wait_for(self._slots.acquire(), self._timeout)
        except TimeoutError:
            raise ProviderUnavailable(
                f"KMIP server {self._where}: all {_MAX_CONNECTIONS} connections stayed busy for "
                f"{self._timeout:g} s"
            ) from None
        call = _Call()
        self._inflight.add(call)
        try:
            if self._closed:
                raise RuntimeError("closed")
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, self._in_thread, call, operation, work
            )
        except BaseException as exc:
            self._inflight.discard(call)
            self._slots.release()
            if isinstance(exc, RuntimeError):  # closed meanwhile: the executor refuses work
                raise ProviderUnavailable("the kmip provider is closed") from None
            raise
        future.add_done_callback(lambda done: self._finished(call, done))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            call.abort()
            raise ProviderUnavailable(
                f"KMIP server {self._where} did not complete {operation} within {self._timeout:g} s"
            ) from None
        except asyncio.CancelledError:
            call.abort()
            raise
        except Exception as exc:
            raise self._translate(operation, exc) from None

    def _finished(self, call: _Call, future: asyncio.Future[Any]) -> None:
        self._inflight.discard(call)
        self._slots.release()
        if not future.cancelled():
            future.exception()  # retrieved: an abandoned call's error is not "never retrieved"

    def _in_thread(self, call: _Call, operation: str, work: Callable[[Any], _T]) -> _T:
        for attempt in (1, 2):
            connection, reused = self._checkout(call)
            try:
                result = work(connection.client)
            except self._kmip.operation_failure as exc:
                try:
                    refused = self._refused(operation, exc, connection.client)
                except BaseException:
                    connection.close()
                    raise
                self._checkin(connection)
                raise refused from None
            except BaseException as exc:
                connection.close()
                # A pooled connection the server dropped while idle fails at once: retry once on a
                # fresh one. Not after a timeout or an abort: that is the server, not the pool.
                stale = isinstance(exc, (*self._kmip.wire_errors, ConnectionError, ssl.SSLEOFError))
                if reused and attempt == 1 and stale and not call.aborted:
                    continue
                raise
            else:
                self._checkin(connection)
                return result
            finally:
                with contextlib.suppress(_Aborted):
                    call.attach(None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _checkout(self, call: _Call) -> tuple[_Connection, bool]:
        now = time.monotonic()
        stale: list[_Connection] = []
        connection = None
        with self._pool_lock:
            while self._idle:
                candidate = self._idle.pop()
                if now - candidate.last_used < _IDLE_SECONDS:
                    connection = candidate
                    break
                stale.append(candidate)
        for old in stale:
            old.close()
        if connection is not None:
            try:
                call.attach(connection.socket)
            except _Aborted:
                self._checkin(connection)
                raise
            return connection, True
        client = self._kmip.client_class(
            hostname=self._config.host, port=self._config.port, config_file=os.devnull
        )
        client.proxy.open = lambda: self._open_socket(client.proxy, call)
        client.open()
        return _Connection(client=client, last_used=now), False

    def _open_socket(self, proxy: Any, call: _Call) -> None:
        """Replaces PyKMIP's ``KMIPProxy.open``: IPv4/IPv6, our SSLContext (TLS ≥ 1.2, hostname
        check, key in memory), and a socket timeout on connect, handshake and every read."""
        raw = socket.create_connection((self._config.host, self._config.port), timeout=self._timeout)
        try:
            tls = self._ssl.wrap_socket(raw, server_hostname=self._server_name, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        try:
            call.attach(tls)  # from here on, an abort also interrupts the handshake
            tls.settimeout(self._timeout)
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        proxy.socket = tls
        proxy.protocol = self._kmip.protocol_class(tls)
        call.attach(tls)

    def _checkin(self, connection: _Connection) -> None:
        connection.last_used = time.monotonic()
        with self._pool_lock:
            if not self._closed:
                self._idle.append(connection)
                return
        connection.close()

    def _refused(self, operation: str, exc: Exception, client: Any) -> _Refused:
        reason = getattr(getattr(exc, "reason", None), "name", "UNKNOWN")
        message = str(getattr(exc, "message", "") or "")[:200]
        state = None
        if reason in ("PERMISSION_DENIED", "WRONG_KEY_LIFECYCLE_STATE") and operation != "Get Attributes":
            # Servers report a key that is not Active differently (PyKMIP: PERMISSION_DENIED).
            # Its State tells a revoked key from a missing permission.
            with contextlib.suppress(self._kmip.operation_failure):
                state = self._attributes("State")(client).get("State")
        return _Refused(operation, reason, message, state)

    def _translate(self, operation: str, exc: BaseException) -> ProviderError:
        uid = self._config.key_uid
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, _Refused):
            _log.info("kmip %s on %s refused: %s %s", operation, self._key_ref, exc.reason, exc.message)
            reason, server_says = exc.reason, f" (server: {exc.reason}: {exc.message})"
            if reason == "ITEM_NOT_FOUND":
                return ProviderKeyNotFound(
                    f"KMIP key {uid!r} does not exist on {self._where}, or is not visible to the "
                    f"client certificate's identity {self._identity!r}{server_says}"
                )
            if reason == "WRONG_KEY_LIFECYCLE_STATE" or exc.state not in (None, "ACTIVE"):
                return ProviderKeyDisabled(
                    f"KMIP key {uid!r} on {self._where} is not Active (state: {exc.state or 'unknown'}): "
                    "it was revoked or deactivated on the KMIP server, so it can no longer wrap or "
                    "unwrap secrets"
                )
            if reason in ("PERMISSION_DENIED", "AUTHENTICATION_NOT_SUCCESSFUL"):
                return ProviderAccessDenied(
                    f"the KMIP server {self._where} denied {operation} on key {uid!r} to the identity "
                    f"{self._identity!r}{server_says}; grant it Encrypt, Decrypt and Get Attributes "
                    "on the key"
                )
            if operation == "Decrypt" and reason in (
                "CRYPTOGRAPHIC_FAILURE",
                "GENERAL_FAILURE",
                "INVALID_FIELD",
                "INVALID_MESSAGE",
            ):
                # Bad padding after tampering shows up here (PyKMIP: GENERAL_FAILURE). Same answer
                # as a failed integrity check: see the construction comment.
                return ProviderCryptoError(_UNWRAP_FAILED)
            if reason == "CRYPTOGRAPHIC_FAILURE":
                return ProviderCryptoError(f"the KMIP server {self._where} failed {operation}{server_says}")
            return ProviderError(f"the KMIP server {self._where} refused {operation}{server_says}")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return ProviderAccessDenied(
                f"TLS to the KMIP server {self._where}: its certificate failed verification "
                f"({exc.verify_message}); check ca_pem, and server_name (the name the server "
                f"certificate is issued for; now {self._server_name!r})"
            )
        if isinstance(exc, ssl.SSLError) and not isinstance(
            exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
        ):
            return ProviderAccessDenied(
                f"TLS handshake with the KMIP server {self._where} failed ({exc.reason or exc}); the "
                "server must trust the CA that issued client_cert_pem, accept its identity "
                f"{self._identity!r}, and offer TLS 1.2 or later"
            )
        if isinstance(exc, TimeoutError):
            return ProviderUnavailable(
                f"KMIP server {self._where} did not answer {operation} within {self._timeout:g} s"
            )
        if isinstance(exc, _Aborted):
            return ProviderUnavailable(f"KMIP {operation} on {self._where} was abandoned")
        if isinstance(exc, (OSError, *self._kmip.wire_errors)):
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            return ProviderUnavailable(f"KMIP server {self._where} unreachable during {operation}: {detail}")
        _log.warning("kmip %s on %s failed: %s", operation, self._key_ref, type(exc).__name__)
        return ProviderError(f"KMIP {operation} on {self._where} failed: {type(exc).__name__}")


def _plain(value: Any) -> Any:
    """A PyKMIP attribute value as JSON-friendly data: enums by name, primitives by value."""
    inner = getattr(value, "value", value)
    name = getattr(inner, "name", None)
    if isinstance(name, str):
        return name
    return inner if isinstance(inner, (int, str, bool, float)) else str(inner)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000
