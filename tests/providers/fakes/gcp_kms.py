"""A fake Google Cloud KMS speaking the real gRPC protocol (google.cloud.kms.v1).

`google-cloud-kms` ships no server, but its proto-plus message types serialize and deserialize
the real wire format, so a generic gRPC handler registered under the real service name is what
the real client library talks to. Implemented: Encrypt, Decrypt and GetCryptoKey for symmetric
(`ENCRYPT_DECRYPT`) keys, as the real service behaves:

- Encrypt accepts a CryptoKey (primary version) or a CryptoKeyVersion name; Decrypt only a
  CryptoKey and finds the version from the ciphertext. Ciphertext: a 5-byte header (magic and
  version number, as real ciphertexts carry their version's identity) ‖ nonce ‖ ct ‖ tag,
  AES-256-GCM with the header and the caller's AAD authenticated.
- Request checksums (`plaintext_crc32c`, `ciphertext_crc32c`, `additional_authenticated_data_crc32c`)
  are checked when present (INVALID_ARGUMENT on mismatch) and reported in `verified_*`;
  responses carry `name`, `ciphertext_crc32c`, `plaintext_crc32c`, `protection_level`.
- Authentication and IAM: a key created with ``members`` admits only callers presenting a
  self-signed JWT (``authorization: Bearer``, RS256, as google-auth's service-account
  credentials send to Google APIs) from a trusted service account among its members, with the
  cloudkms or cloud-platform scope: no or bad token -> UNAUTHENTICATED, another account or a
  key marked forbidden -> PERMISSION_DENIED (checked before existence, as IAM is). Keys
  without ``members`` admit anonymous callers.
- Errors: NOT_FOUND for unknown keys; FAILED_PRECONDITION for a version that is not ENABLED; INVALID_ARGUMENT
  "Decryption failed" for a foreign, tampered or wrong-AAD ciphertext; 64 KiB limits.

Test hooks: `corrupt_next` (damage the next response of a method), `fail_next` (answer the next
call with a status), `paused()` (hold calls past their deadline), `stop()`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import grpc
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud.kms_v1.types import resources, service

SERVICE = "google.cloud.kms.v1.KeyManagementService"
PROJECT_RING = "projects/fake-project/locations/global/keyRings/fake-ring"
_MAGIC = b"\x9a"
_HEADER_LEN = 5
_NONCE_LEN = 12
_MAX_PAYLOAD = 64 * 1024

State = resources.CryptoKeyVersion.CryptoKeyVersionState
Level = resources.ProtectionLevel
Purpose = resources.CryptoKey.CryptoKeyPurpose

ENCRYPT_CORRUPTIONS = frozenset(
    {
        "flip_ciphertext",  # one ciphertext bit flipped, ciphertext_crc32c of the original kept
        "bad_ciphertext_crc",  # ciphertext intact, ciphertext_crc32c altered
        "no_ciphertext_crc",  # ciphertext_crc32c left unset
        "unverified_plaintext",  # verified_plaintext_crc32c = false
        "unverified_aad",  # verified_additional_authenticated_data_crc32c = false
        "foreign_name",  # name of another key
    }
)
DECRYPT_CORRUPTIONS = frozenset(
    {
        "flip_plaintext",  # one plaintext bit flipped, plaintext_crc32c of the original kept
        "bad_plaintext_crc",  # plaintext intact, plaintext_crc32c altered
        "no_plaintext_crc",  # plaintext_crc32c left unset
    }
)


def crc32c(data: bytes) -> int:
    value: int = google_crc32c.value(data)
    return value


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Version:
    number: int
    material: bytes | None  # None once destroyed
    state: Any = State.ENABLED


@dataclass
class _Key:
    name: str
    protection_level: Any
    purpose: Any = Purpose.ENCRYPT_DECRYPT
    versions: dict[int, _Version] = field(default_factory=dict)
    primary: int = 1
    forbidden: bool = False
    members: frozenset[str] | None = None  # None: anyone, even anonymous


@dataclass
class RecordedCall:
    method: str
    request: Any
    metadata: dict[str, str]
    caller: str | None = None  # the authenticated service account, if any


_SCOPES = frozenset(
    {"https://www.googleapis.com/auth/cloudkms", "https://www.googleapis.com/auth/cloud-platform"}
)


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeCloudKms:
    """An in-memory Cloud KMS on 127.0.0.1:<port>, served by a thread pool (independent of any
    event loop). Thread-safe; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int = 16,
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        """``tls``: (certificate chain PEM, private key PEM) to serve TLS as Google does."""
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._counter = 0
        self._corrupt: dict[str, deque[str]] = {"Encrypt": deque(), "Decrypt": deque()}
        self._fail: dict[str, deque[tuple[grpc.StatusCode, str]]] = {}
        self._accounts: dict[str, rsa.RSAPublicKey] = {}
        self._resume = threading.Event()
        self._resume.set()
        self.calls: deque[RecordedCall] = deque(maxlen=200)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        self._server.add_generic_rpc_handlers((self._handler(),))
        if tls is None:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        else:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self._server.add_secure_port(f"{host}:{port}", credentials)
        if not self.port:
            raise RuntimeError(f"cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeCloudKms:
        self._server.start()
        return self

    def stop(self) -> None:
        self._resume.set()
        self._server.stop(grace=None).wait(5)

    def __enter__(self) -> FakeCloudKms:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state for tests -------------------------------------------------------------------

    def trust_service_account(self, email: str, public_key: rsa.RSAPublicKey) -> None:
        """Accept JWTs signed by this service account (what Google's token check does)."""
        with self._lock:
            self._accounts[email] = public_key

    def create_key(
        self,
        key_id: str | None = None,
        *,
        protection_level: str = "SOFTWARE",
        members: set[str] | frozenset[str] | None = None,
    ) -> str:
        """A new ENCRYPT_DECRYPT key with one ENABLED primary version; returns its name.
        ``members``: the service accounts granted the key (None: open to anonymous callers)."""
        with self._lock:
            self._counter += 1
            name = f"{PROJECT_RING}/cryptoKeys/{key_id or f'key-{self._counter}'}"
            if name in self._keys:
                raise ValueError(f"{name} exists")
            key = _Key(
                name=name,
                protection_level=Level.__members__[protection_level],
                members=None if members is None else frozenset(members),
            )
            key.versions[1] = _Version(1, os.urandom(32))
            self._keys[name] = key
        return name

    def unknown_key_name(self) -> str:
        return f"{PROJECT_RING}/cryptoKeys/never-created-{os.urandom(4).hex()}"

    def rotate(self, key_name: str) -> str:
        """Add a version and make it primary (what Cloud KMS rotation does)."""
        with self._lock:
            key = self._keys[key_name]
            number = max(key.versions) + 1
            key.versions[number] = _Version(number, os.urandom(32))
            key.primary = number
        return f"{key_name}/cryptoKeyVersions/{number}"

    def set_state(self, key_name: str, state: str, version: int | None = None) -> None:
        """ENABLED, DISABLED, DESTROY_SCHEDULED or DESTROYED (erases the material)."""
        with self._lock:
            key = self._keys[key_name]
            entry = key.versions[version or key.primary]
            entry.state = State.__members__[state]
            if entry.state == State.DESTROYED:
                entry.material = None

    def disable_primary(self, key_name: str) -> None:
        self.set_state(key_name, "DISABLED")

    def set_purpose(self, key_name: str, purpose: str) -> None:
        with self._lock:
            self._keys[key_name].purpose = Purpose.__members__[purpose]

    def forbid(self, key_name: str, forbidden: bool = True) -> None:
        """Answer PERMISSION_DENIED for this key, as IAM does without a binding."""
        with self._lock:
            self._keys[key_name].forbidden = forbidden

    def corrupt_next(self, method: str, mode: str) -> None:
        allowed = ENCRYPT_CORRUPTIONS if method == "Encrypt" else DECRYPT_CORRUPTIONS
        if method not in self._corrupt or mode not in allowed:
            raise ValueError(f"cannot corrupt {method} with {mode!r}")
        with self._lock:
            self._corrupt[method].append(mode)

    def fail_next(
        self, method: str, code: str, message: str = "injected by the test", *, times: int = 1
    ) -> None:
        """Answer the next ``times`` calls of ``method`` with status ``code`` (a grpc.StatusCode name)."""
        with self._lock:
            self._fail.setdefault(method, deque()).extend([(grpc.StatusCode[code], message)] * times)

    def clear_failures(self) -> None:
        with self._lock:
            self._fail.clear()
            for queue in self._corrupt.values():
                queue.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within this block calls are held until their client gives up (the deadline)."""
        self._resume.clear()
        try:
            yield
        finally:
            self._resume.set()

    def calls_of(self, method: str) -> list[RecordedCall]:
        return [c for c in list(self.calls) if c.method == method]

    # -- gRPC plumbing ---------------------------------------------------------------------

    def _handler(self) -> grpc.GenericRpcHandler:
        def unary(method: str, impl: Callable[[Any, str | None], Any], req_type: Any, resp_type: Any) -> Any:
            def handle(request: Any, context: grpc.ServicerContext) -> Any:
                metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
                call = RecordedCall(method, request, metadata)
                self.calls.append(call)
                self._hold_if_paused(context)
                with self._lock:
                    injected = self._fail.get(method)
                    failure = injected.popleft() if injected else None
                if failure is not None:
                    context.abort(*failure)
                try:
                    call.caller = self._authenticate(metadata.get("authorization"))
                    return impl(request, call.caller)
                except _Abort as exc:
                    context.abort(exc.code, exc.message)

            return grpc.unary_unary_rpc_method_handler(
                handle,
                request_deserializer=req_type.deserialize,
                response_serializer=resp_type.serialize,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Encrypt": unary("Encrypt", self._encrypt, service.EncryptRequest, service.EncryptResponse),
                "Decrypt": unary("Decrypt", self._decrypt, service.DecryptRequest, service.DecryptResponse),
                "GetCryptoKey": unary(
                    "GetCryptoKey", self._get_crypto_key, service.GetCryptoKeyRequest, resources.CryptoKey
                ),
            },
        )

    def _hold_if_paused(self, context: grpc.ServicerContext) -> None:
        while not self._resume.is_set() and context.is_active():
            self._resume.wait(0.02)
        if not context.is_active():
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the client gave up")

    # -- the service -----------------------------------------------------------------------

    def _authenticate(self, authorization: str | None) -> str | None:
        """The service account whose valid self-signed JWT this is; None when anonymous."""
        if authorization is None:
            return None
        invalid = _Abort(grpc.StatusCode.UNAUTHENTICATED, "Request had invalid authentication credentials.")
        scheme, _, token = authorization.partition(" ")
        parts = token.split(".")
        if scheme != "Bearer" or len(parts) != 3:
            raise invalid
        try:
            header, claims = json.loads(_b64url(parts[0])), json.loads(_b64url(parts[1]))
            signature = _b64url(parts[2])
        except ValueError:
            raise invalid from None
        with self._lock:
            public_key = self._accounts.get(claims.get("iss"))
        if header.get("alg") != "RS256" or public_key is None or claims.get("sub") != claims.get("iss"):
            raise invalid
        try:
            public_key.verify(
                signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            raise invalid from None
        if not claims.get("iat", 0) - 300 <= time.time() < claims.get("exp", 0):
            raise invalid
        if not _SCOPES & set(str(claims.get("scope", "")).split()):
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, "Request had insufficient authentication scopes.")
        email: str = claims["iss"]
        return email

    def _lookup(self, name: str, permission: str, caller: str | None) -> _Key:
        key_name, _, version = name.partition("/cryptoKeyVersions/")
        key = self._keys.get(key_name)
        if key is not None and key.members is not None and caller is None:
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "Request is missing required authentication credential.",
            )
        if key is not None and (key.forbidden or (key.members is not None and caller not in key.members)):
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Permission '{permission}' denied on resource '{name}' (or it may not exist).",
            )
        if key is None or (version and (not version.isdigit() or int(version) not in key.versions)):
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"{name} not found.")
        return key

    @staticmethod
    def _check_crc(data: bytes, checksum: int | None, field_name: str, data_field: str) -> bool:
        if checksum is None:
            return False
        if crc32c(data) != checksum:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The checksum in field {field_name} did not match the data in field {data_field}.",
            )
        return True

    @staticmethod
    def _usable(key: _Key, number: int) -> _Version:
        entry = key.versions[number]
        if entry.state != State.ENABLED or entry.material is None:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{key.name}/cryptoKeyVersions/{number} is not enabled, "
                f"current state is: {entry.state.name}.",
            )
        return entry

    def _encrypt(self, request: service.EncryptRequest, caller: str | None) -> service.EncryptResponse:
        plaintext, aad = bytes(request.plaintext), bytes(request.additional_authenticated_data)
        with self._lock:
            key = self._lookup(request.name, "cloudkms.cryptoKeyVersions.useToEncrypt", caller)
            if key.purpose != Purpose.ENCRYPT_DECRYPT:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"{key.name} is not an ENCRYPT_DECRYPT key."
                )
            if len(plaintext) > _MAX_PAYLOAD or len(aad) > _MAX_PAYLOAD:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "plaintext or AAD exceeds 65536 bytes.")
            verified_plaintext = self._check_crc(
                plaintext, request.plaintext_crc32c, "plaintext_crc32c", "plaintext"
            )
            verified_aad = self._check_crc(
                aad,
                request.additional_authenticated_data_crc32c,
                "additional_authenticated_data_crc32c",
                "additional_authenticated_data",
            )
            _, _, named = request.name.partition("/cryptoKeyVersions/")
            number = int(named) if named else key.primary
            entry = self._usable(key, number)
            assert entry.material is not None
            header = _MAGIC + number.to_bytes(4, "big")
            nonce = os.urandom(_NONCE_LEN)
            ciphertext = header + nonce + AESGCM(entry.material).encrypt(nonce, plaintext, header + aad)
            response = service.EncryptResponse(
                name=f"{key.name}/cryptoKeyVersions/{number}",
                ciphertext=ciphertext,
                ciphertext_crc32c=crc32c(ciphertext),
                verified_plaintext_crc32c=verified_plaintext,
                verified_additional_authenticated_data_crc32c=verified_aad,
                protection_level=key.protection_level,
            )
            mode = self._corrupt["Encrypt"].popleft() if self._corrupt["Encrypt"] else None
        if mode == "flip_ciphertext":
            damaged = bytearray(ciphertext)
            damaged[len(damaged) // 2] ^= 0x01
            response.ciphertext = bytes(damaged)
        elif mode == "bad_ciphertext_crc":
            response.ciphertext_crc32c = (crc32c(ciphertext) + 1) % 2**32
        elif mode == "no_ciphertext_crc":
            response.ciphertext_crc32c = None
        elif mode == "unverified_plaintext":
            response.verified_plaintext_crc32c = False
        elif mode == "unverified_aad":
            response.verified_additional_authenticated_data_crc32c = False
        elif mode == "foreign_name":
            response.name = f"{PROJECT_RING}/cryptoKeys/someone-else/cryptoKeyVersions/1"
        return response

    def _decrypt(self, request: service.DecryptRequest, caller: str | None) -> service.DecryptResponse:
        ciphertext, aad = bytes(request.ciphertext), bytes(request.additional_authenticated_data)
        if "/cryptoKeyVersions/" in request.name:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, "name must be a CryptoKey, not a CryptoKeyVersion."
            )
        with self._lock:
            key = self._lookup(request.name, "cloudkms.cryptoKeyVersions.useToDecrypt", caller)
            if not ciphertext or len(ciphertext) > _MAX_PAYLOAD + 800:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "ciphertext must be 1 to 66336 bytes.")
            self._check_crc(ciphertext, request.ciphertext_crc32c, "ciphertext_crc32c", "ciphertext")
            self._check_crc(
                aad,
                request.additional_authenticated_data_crc32c,
                "additional_authenticated_data_crc32c",
                "additional_authenticated_data",
            )
            failed = _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Decryption failed: verify that 'name' refers to the correct CryptoKey.",
            )
            header = ciphertext[:_HEADER_LEN]
            number = int.from_bytes(header[1:], "big") if len(header) == _HEADER_LEN else 0
            if header[:1] != _MAGIC or number not in key.versions:
                raise failed
            entry = self._usable(key, number)
            assert entry.material is not None
            body = ciphertext[_HEADER_LEN:]
            try:
                plaintext = AESGCM(entry.material).decrypt(body[:_NONCE_LEN], body[_NONCE_LEN:], header + aad)
            except (InvalidTag, ValueError):
                raise failed from None
            mode = self._corrupt["Decrypt"].popleft() if self._corrupt["Decrypt"] else None
            response = service.DecryptResponse(
                plaintext=plaintext,
                plaintext_crc32c=crc32c(plaintext),
                used_primary=number == key.primary,
                protection_level=key.protection_level,
            )
        if mode == "flip_plaintext":
            damaged = bytearray(plaintext)
            damaged[0] ^= 0x01
            response.plaintext = bytes(damaged)
        elif mode == "bad_plaintext_crc":
            response.plaintext_crc32c = (crc32c(plaintext) + 1) % 2**32
        elif mode == "no_plaintext_crc":
            response.plaintext_crc32c = None
        return response

    def _get_crypto_key(
        self, request: service.GetCryptoKeyRequest, caller: str | None
    ) -> resources.CryptoKey:
        if "/cryptoKeyVersions/" in request.name:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "name must be a CryptoKey.")
        with self._lock:
            key = self._lookup(request.name, "cloudkms.cryptoKeys.get", caller)
            primary = key.versions[key.primary]
            return resources.CryptoKey(
                name=key.name,
                purpose=key.purpose,
                primary=resources.CryptoKeyVersion(
                    name=f"{key.name}/cryptoKeyVersions/{key.primary}",
                    state=primary.state,
                    protection_level=key.protection_level,
                    algorithm=resources.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
                ),
                version_template=resources.CryptoKeyVersionTemplate(
                    protection_level=key.protection_level,
                    algorithm=resources.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
                ),
            )
