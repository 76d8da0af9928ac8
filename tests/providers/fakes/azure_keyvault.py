"""An HTTPS fake of the Azure Key Vault data plane and of the Entra ID token endpoint.

No Key Vault emulator exists, so this speaks the REST API (api-version 7.x) the way the service
does, over real TLS with a CA generated here, so the azure SDK's own pipeline, challenge
authentication and credential run unmodified against it:

- ``POST /{tenant}/oauth2/v2.0/token`` (client credentials grant) -> ``{"access_token": ...}``;
  a wrong tenant, client or secret is refused with AAD's error shapes (``AADSTS...``).
- ``GET /keys/{name}[/{version}]`` -> the key bundle with *public* material only: RSA keys carry
  ``n``/``e``, ``oct`` keys carry no ``k`` at all (exactly what makes the SDK wrap locally).
- ``POST /keys/{name}/{version}/wrapkey|unwrapkey`` with ``{"alg", "value": base64url}`` for
  RSA-OAEP-256 (the fake holds the RSA private key) and A256KW (the fake holds the AES key).
- No or an unknown bearer token -> 401 with the ``WWW-Authenticate: Bearer authorization=...,
  resource=...`` challenge; a principal without the permission -> 403 in the access-policy shape;
  a disabled key -> unwrapKey 403 ``KeyDisabled`` (wrapKey and get stay allowed, as reported for
  the real service); unknown key or version -> 404 ``KeyNotFound``; a bad ciphertext -> 400.

Test hooks: :meth:`FakeKeyVault.paused` (hold every response, an outage), :meth:`injected`
(answer the next requests with a given error), :attr:`requests` (what reached the server).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hmac
import ipaddress
import json
import re
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VAULT_RESOURCE = "https://vault.azure.net"
ALL_PERMISSIONS = frozenset({"get", "wrapKey", "unwrapKey"})
_HOLD_LIMIT_SECONDS = 30.0  # a paused request is answered after this at the latest
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class TlsFiles:
    ca_path: Path
    cert_path: Path
    key_path: Path


def make_ca(
    directory: Path, name: str = "kms-test-ca"
) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA; returns its PEM path, key and certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1 / localhost issued by it."""
    ca_path, ca_key, ca_cert = make_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-keyvault")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return TlsFiles(ca_path=ca_path, cert_path=cert_path, key_path=key_path)


# --------------------------------------------------------------------------- state


@dataclass
class FakeKey:
    name: str
    kty: str  # RSA, RSA-HSM, oct, oct-HSM
    versions: dict[str, rsa.RSAPrivateKey | bytes] = field(
        default_factory=dict
    )  # insertion order: last = current
    enabled: bool = True
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def current_version(self) -> str:
        return next(reversed(self.versions))

    @property
    def is_rsa(self) -> bool:
        return self.kty.startswith("RSA")


@dataclass(frozen=True)
class Principal:
    client_id: str
    client_secret: str = field(repr=False)
    permissions: frozenset[str] = ALL_PERMISSIONS


@dataclass(frozen=True)
class LoggedRequest:
    """One request as it reached the fake (after TLS). ``client_id`` is the token's principal."""

    method: str
    path: str
    status: int
    client_id: str | None


@dataclass
class _Injection:
    status: int
    body: dict[str, Any]
    remaining: int
    path_prefix: str
    headers: dict[str, str]


class _Reply(Exception):
    """Control flow inside the fake: answer this and stop. Never escapes the handler."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _kv_error(status: int, code: str, message: str, inner: str | None = None) -> _Reply:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner is not None:
        error["innererror"] = {"code": inner}
    return _Reply(status, {"error": error})


# --------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TlsServer

    def setup(self) -> None:
        # The TLS handshake runs here, in the connection's own thread, so a client that aborts it
        # (an untrusted CA) never blocks the accept loop.
        self.request.settimeout(120)
        self.request.do_handshake()
        super().setup()

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    def do_POST(self) -> None:
        self.server.fake._handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeKeyVault, context: ssl.SSLContext) -> None:
        self.fake = fake
        self._context = context
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        return self._context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # aborted handshakes and clients that gave up while paused are expected here


class FakeKeyVault:
    """The fake vault (and its token endpoint) on https://127.0.0.1:<free port>."""

    def __init__(self, directory: Path, *, tenant_id: str | None = None) -> None:
        self.tenant_id = tenant_id or "72f988bf-0000-4000-8000-" + secrets.token_hex(6)
        self.tls = make_tls_files(directory)
        self._lock = threading.Lock()
        self._keys: dict[str, FakeKey] = {}
        self._principals: dict[str, Principal] = {}
        self._tokens: dict[str, tuple[str, str]] = {}  # token -> (client_id, scope)
        self._log: list[LoggedRequest] = []
        self._injections: list[_Injection] = []
        self._resume = threading.Event()
        self._resume.set()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert_path, self.tls.key_path)
        self._server = _TlsServer(self, context)
        self._thread: threading.Thread | None = None
        self.principal = self.add_principal()

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    @property
    def ca_path(self) -> Path:
        return self.tls.ca_path

    def start(self) -> FakeKeyVault:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-keyvault", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._resume.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeKeyVault:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test hooks

    def add_principal(self, permissions: frozenset[str] = ALL_PERMISSIONS) -> Principal:
        principal = Principal(
            client_id=str(uuid.uuid4()),
            client_secret="fake~" + secrets.token_urlsafe(24),
            permissions=permissions,
        )
        with self._lock:
            self._principals[principal.client_id] = principal
        return principal

    def create_key(self, name: str | None = None, *, kty: str = "RSA") -> str:
        """A new key with one version; ``kty`` is RSA, RSA-HSM, oct or oct-HSM."""
        if kty not in ("RSA", "RSA-HSM", "oct", "oct-HSM"):
            raise ValueError(kty)
        name = name or "kek-" + secrets.token_hex(6)
        key = FakeKey(name=name, kty=kty)
        key.versions[uuid.uuid4().hex] = self._material(kty)
        with self._lock:
            self._keys[name] = key
        return name

    def rotate_key(self, name: str) -> str:
        """Add a new current version; older versions keep working (as Key Vault does)."""
        with self._lock:
            key = self._keys[name]
        version = uuid.uuid4().hex
        material = self._material(key.kty)
        with self._lock:
            key.versions[version] = material
        return version

    def current_version(self, name: str) -> str:
        with self._lock:
            return self._keys[name].current_version

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self._lock:
            self._keys[name].enabled = enabled

    def unwrap_as_vault(self, name: str, version: str, wrapped: bytes) -> bytes:
        """Undo a wrap with the vault's own key material, bypassing HTTP: proves who wrapped a blob."""
        with self._lock:
            material = self._keys[name].versions[version]
        if isinstance(material, rsa.RSAPrivateKey):
            return material.decrypt(wrapped, _OAEP)
        return aes_key_unwrap(material, wrapped)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """An outage: every request is held (the client's read timeout fires) until the block ends."""
        self._resume.clear()
        try:
            yield
        finally:
            self._resume.set()

    @contextlib.contextmanager
    def injected(
        self,
        status: int,
        code: str,
        message: str,
        *,
        inner: str | None = None,
        count: int = 1000,
        path_prefix: str = "/keys/",
        headers: dict[str, str] | None = None,
    ) -> Iterator[None]:
        """Within the block, the next ``count`` requests under ``path_prefix`` get this Key Vault error."""
        error: dict[str, Any] = {"code": code, "message": message}
        if inner is not None:
            error["innererror"] = {"code": inner}
        injection = _Injection(status, {"error": error}, count, path_prefix, headers or {})
        with self._lock:
            self._injections.append(injection)
        try:
            yield
        finally:
            with self._lock:
                self._injections.remove(injection)

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def requests_for(self, key_name: str) -> list[LoggedRequest]:
        prefix = f"/keys/{key_name}"
        return [r for r in self.requests if r.path == prefix or r.path.startswith(prefix + "/")]

    # -- request handling

    @staticmethod
    def _material(kty: str) -> rsa.RSAPrivateKey | bytes:
        if kty.startswith("RSA"):
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return secrets.token_bytes(32)

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        parts = urlsplit(handler.path)
        path = parts.path
        self._resume.wait(_HOLD_LIMIT_SECONDS)
        client_id: str | None = None
        headers: dict[str, str] = {}
        try:
            injected = self._take_injection(path)
            if injected is not None:
                raise _Reply(injected.status, injected.body, dict(injected.headers))
            if handler.command == "POST" and (m := re.fullmatch(r"/([^/]+)/oauth2/v2\.0/token", path)):
                status, payload = 200, self._token(m.group(1), body)
            else:
                if "api-version" not in parse_qs(parts.query):
                    raise _kv_error(400, "BadParameter", "The request URI contains an invalid api-version.")
                client_id = self._authenticate(handler)
                status, payload = 200, self._keys_api(handler.command, path, body, client_id)
        except _Reply as reply:
            status, payload, headers = reply.status, reply.body, reply.headers
        with self._lock:
            self._log.append(LoggedRequest(handler.command, path, status, client_id))
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json; charset=utf-8")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            handler.close_connection = True  # the client gave up (it timed out while we were paused)

    def _take_injection(self, path: str) -> _Injection | None:
        with self._lock:
            for injection in self._injections:
                if injection.remaining > 0 and path.startswith(injection.path_prefix):
                    injection.remaining -= 1
                    return injection
        return None

    def _token(self, tenant: str, body: bytes) -> dict[str, Any]:
        form = {k: v[0] for k, v in parse_qs(body.decode("ascii", "replace")).items()}
        if tenant != self.tenant_id:
            raise _Reply(
                400,
                {
                    "error": "invalid_request",
                    "error_description": f"AADSTS90002: Tenant '{tenant}' not found.",
                },
            )
        if form.get("grant_type") != "client_credentials" or not form.get("scope"):
            raise _Reply(
                400, {"error": "invalid_request", "error_description": "AADSTS900144: grant_type/scope"}
            )
        with self._lock:
            principal = self._principals.get(form.get("client_id", ""))
        if principal is None:
            raise _Reply(
                400,
                {
                    "error": "unauthorized_client",
                    "error_description": "AADSTS700016: Application not found in the directory.",
                },
            )
        if not hmac.compare_digest(form.get("client_secret", "").encode(), principal.client_secret.encode()):
            raise _Reply(
                401,
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                },
            )
        token = "fake-at-" + secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = (principal.client_id, form["scope"])
        return {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}

    def _challenge(self, message: str) -> _Reply:
        header = (
            f'Bearer authorization="https://login.microsoftonline.com/{self.tenant_id}", '
            f'resource="{VAULT_RESOURCE}"'
        )
        reply = _kv_error(401, "Unauthorized", message)
        reply.headers["WWW-Authenticate"] = header
        return reply

    def _authenticate(self, handler: _Handler) -> str:
        auth = handler.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise self._challenge("AKV10000: Request is missing a Bearer or PoP token.")
        with self._lock:
            entry = self._tokens.get(auth.removeprefix("Bearer "))
        if entry is None:
            raise self._challenge("AKV10032: Invalid issuer or token.")
        client_id, scope = entry
        if scope.removesuffix("/.default").rstrip("/") != VAULT_RESOURCE:
            raise self._challenge("AKV10022: Invalid audience.")
        return client_id

    def _authorize(self, client_id: str, permission: str) -> None:
        with self._lock:
            principal = self._principals[client_id]
        if permission not in principal.permissions:
            raise _kv_error(
                403,
                "Forbidden",
                f"The user, group or application 'appid={client_id};"
                f"iss=https://sts.windows.net/{self.tenant_id}/' does not have keys {permission} "
                "permission on key vault 'fake;location=local'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
                inner="AccessDenied",
            )

    def _find(self, name: str, version: str | None) -> tuple[FakeKey, str]:
        with self._lock:
            key = self._keys.get(name)
            if key is not None and version and version not in key.versions:
                key = None
        if key is None:
            what = f"{name}/{version}" if version else name
            raise _kv_error(
                404,
                "KeyNotFound",
                f"A key with (name/id) {what} was not found in this key vault. "
                "If you recently deleted this key you may be able to recover it using the correct "
                "recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
            )
        return key, version or key.current_version

    def _kid(self, name: str, version: str) -> str:
        return f"{self.url}/keys/{name}/{version}"

    def _keys_api(self, method: str, path: str, body: bytes, client_id: str) -> dict[str, Any]:
        if method == "GET" and (m := re.fullmatch(r"/keys/([^/]+)(?:/([^/]*))?/?", path)):
            self._authorize(client_id, "get")
            key, version = self._find(m.group(1), m.group(2) or None)
            return self._bundle(key, version)
        if method == "POST" and (m := re.fullmatch(r"/keys/([^/]+)/([^/]+)/(wrapkey|unwrapkey)", path)):
            operation = "wrapKey" if m.group(3) == "wrapkey" else "unwrapKey"
            self._authorize(client_id, operation)
            key, version = self._find(m.group(1), m.group(2))
            return self._crypto(key, version, operation, body)
        raise _kv_error(404, "NotFound", f"no such operation: {method} {path}")

    def _bundle(self, key: FakeKey, version: str) -> dict[str, Any]:
        jwk: dict[str, Any] = {
            "kid": self._kid(key.name, version),
            "kty": key.kty,
            "key_ops": ["wrapKey", "unwrapKey", "encrypt", "decrypt"],
        }
        material = key.versions[version]
        if isinstance(material, rsa.RSAPrivateKey):  # public half only, as the service returns it
            numbers = material.public_key().public_numbers()
            jwk["n"] = b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
            jwk["e"] = b64url(numbers.e.to_bytes(3, "big"))
        return {
            "key": jwk,
            "attributes": {
                "enabled": key.enabled,
                "created": key.created,
                "updated": key.created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
                "exportable": False,
            },
            "tags": {},
        }

    def _crypto(self, key: FakeKey, version: str, operation: str, body: bytes) -> dict[str, Any]:
        if operation == "unwrapKey" and not key.enabled:
            raise _kv_error(
                403, "Forbidden", "Operation unwrapKey is not allowed on a disabled key.", inner="KeyDisabled"
            )
        try:
            request = json.loads(body)
            alg = request["alg"]
            value = unb64url(request["value"])
        except (ValueError, KeyError, TypeError):
            raise _kv_error(400, "BadParameter", "Property 'value' or 'alg' is missing or invalid.") from None
        material = key.versions[version]
        expected = "RSA-OAEP-256" if key.is_rsa else "A256KW"
        if alg != expected:
            raise _kv_error(400, "BadParameter", f"Algorithm {alg} is not supported for key type {key.kty}.")
        try:
            if isinstance(material, rsa.RSAPrivateKey):
                if operation == "wrapKey":
                    result = material.public_key().encrypt(value, _OAEP)
                else:
                    result = material.decrypt(value, _OAEP)
            elif operation == "wrapKey":
                result = aes_key_wrap(material, value)
            else:
                result = aes_key_unwrap(material, value)
        except (ValueError, InvalidUnwrap):
            raise _kv_error(
                400, "BadParameter", f"{operation} failed: the value is invalid for this key."
            ) from None
        return {"kid": self._kid(key.name, version), "value": b64url(result)}
