"""The `gcp-kms` provider: S wrapped by a customer's Google Cloud KMS key (customer-hosted KMS).

Config (``{"type": "gcp-kms", ...}``):

- ``key_name``: the CryptoKey, ``projects/<p>/locations/<l>/keyRings/<r>/cryptoKeys/<k>``, of
  purpose ``ENCRYPT_DECRYPT`` (symmetric; protection level SOFTWARE, HSM or EXTERNAL). Not a
  version: Cloud KMS encrypts under the key's primary version and finds the version of a
  ciphertext itself, so the customer can rotate the key without us noticing.
- ``credentials_json`` (optional, write-only): a service-account JSON key. Absent, the service's
  own identity is used (Application Default Credentials: GKE Workload Identity, the VM's service
  account, ``GOOGLE_APPLICATION_CREDENTIALS``). Only ``"type": "service_account"`` keys are
  accepted: other credential configurations (``external_account`` ...) can name local files,
  URLs or executables to fetch tokens from, which a tenant must not be able to point at our host.
- ``endpoint`` (optional): ``host:port`` of a private endpoint (Private Service Connect, a
  regional endpoint); TLS as for ``cloudkms.googleapis.com``.
- ``insecure_endpoint``: no TLS to ``endpoint``, for tests only: refused unless the endpoint host
  is loopback, and gRPC "local" channel credentials check the peer is loopback again at connect.
  ``credentials_json`` is still sent (so tests cover it); without it calls are anonymous.

Permissions (IAM, on the CryptoKey itself, not on the project):

- ``roles/cloudkms.cryptoKeyEncrypterDecrypter``: ``cloudkms.cryptoKeyVersions.useToEncrypt``
  (wrap) and ``cloudkms.cryptoKeyVersions.useToDecrypt`` (unwrap).
- ``roles/cloudkms.viewer`` (or a custom role holding ``cloudkms.cryptoKeys.get``): describe,
  health and onboarding validation read the key with GetCryptoKey.

Customer setup:

1. ``gcloud kms keyrings create RING --location LOC`` and ``gcloud kms keys create KEY
   --keyring RING --location LOC --purpose encryption [--protection-level hsm]
   [--rotation-period 90d --next-rotation-time ...]``.
2. Grant both roles on the key to the service's principal, e.g. ``gcloud kms keys
   add-iam-policy-binding KEY --keyring RING --location LOC --member
   serviceAccount:<the service's service account> --role
   roles/cloudkms.cryptoKeyEncrypterDecrypter`` (and again with ``roles/cloudkms.viewer``). With
   GKE Workload Identity Federation the member may also be the Kubernetes service account's
   principal, ``principal://iam.googleapis.com/projects/<number>/locations/global/
   workloadIdentityPools/<project>.svc.id.goog/subject/ns/<namespace>/sa/<ksa>``. Only where the
   service's identity cannot be granted: create a service account in the customer's project,
   grant it the two roles, create a JSON key and pass it as ``credentials_json`` (a long-lived
   secret; rotate it, and prefer the identity grant).
3. Create the tenant key with this provider and run ``POST .../validate``.
4. To revoke: remove the binding, or disable/destroy the key version. DEK issuance stops within
   the unwrapped-KEK cache TTL. Destroying a version makes every secret wrapped under it
   unrecoverable (crypto-shredding).

Blob format: ``0x01 ‖ Cloud KMS ciphertext``. AAD: ``enc("kms/v1", "gcp-kms-wrap", k1, v1, k2,
v2, ...)`` over the context sorted by name (DESIGN §2 ``enc``). With both, ``gcloud kms decrypt
--additional-authenticated-data-file`` can recover S without this service.

Every call is bounded by ``timeout_seconds`` (the gRPC deadline, and a hard ceiling around the
SDK's retry of UNAVAILABLE, which otherwise spins for 60 s). Request and response carry CRC32C
checksums both ways; a response whose checksums or ``name`` do not match is discarded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import ConfigDict, Field, SecretStr, ValidationInfo, field_validator

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
    encode_context,
)

_KEY_NAME = re.compile(
    r"projects/[a-z0-9][a-z0-9.:-]{0,99}/locations/[a-z0-9][a-z0-9-]{0,62}"
    r"/keyRings/[A-Za-z0-9_-]{1,63}/cryptoKeys/[A-Za-z0-9_-]{1,63}"
)
_ENDPOINT = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))"
    r":(?P<port>[0-9]{1,5})"
)
_VERSION_SUFFIX = re.compile(r"/cryptoKeyVersions/[0-9]{1,20}")
_FORMAT = b"\x01"
_MAX_PAYLOAD = 64 * 1024  # Cloud KMS limit for plaintext and for AAD
_SCOPES = ("https://www.googleapis.com/auth/cloudkms",)
_SERVER_DETAIL_CHARS = 300
_T = TypeVar("_T")

logger = logging.getLogger(__name__)

# The generated gRPC transport logs every request and response payload (plaintext S on Encrypt,
# on Decrypt's answer) whenever its logger is enabled for DEBUG. These loggers never log here.
_PAYLOAD_LOGGERS = (
    "google.cloud.kms_v1.services.key_management_service.transports.grpc_asyncio",
    "google.cloud.kms_v1.services.key_management_service.transports.grpc",
)


class _DropPayloads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (hasattr(record, "request") or hasattr(record, "response"))


def _silence_payload_logging() -> None:
    for name in _PAYLOAD_LOGGERS:
        sdk_logger = logging.getLogger(name)
        if sdk_logger.level == logging.NOTSET:
            sdk_logger.setLevel(logging.INFO)  # spares serialising payloads nobody may see
        if not any(isinstance(f, _DropPayloads) for f in sdk_logger.filters):
            sdk_logger.addFilter(_DropPayloads())  # holds even if someone sets DEBUG later


def context_aad(context: WrapContext) -> bytes:
    """The AAD binding a wrapped secret to ``context``: injective, order-independent."""
    aad = encode_context(context, "kms/v1", "gcp-kms-wrap")
    if len(aad) > _MAX_PAYLOAD:
        raise ProviderError("encryption context is too large for Cloud KMS (64 KiB)")
    return aad


def _crc32c(data: bytes) -> int:
    import google_crc32c

    value: int = google_crc32c.value(data)
    return value


def _endpoint_host(endpoint: str) -> str:
    match = _ENDPOINT.fullmatch(endpoint)
    assert match is not None  # validated by GcpKmsConfig
    return match["host"].strip("[]")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GcpKmsConfig(ProviderConfig):
    """`{"type": "gcp-kms", "key_name": "projects/.../cryptoKeys/k"}` (see the module docstring)."""

    # Validation errors never echo the input: it may hold the service-account key.
    model_config = ConfigDict(hide_input_in_errors=True)

    type: Literal["gcp-kms"] = "gcp-kms"
    key_name: str
    credentials_json: SecretStr | None = Field(default=None, repr=False)  # not even masked
    endpoint: str | None = None
    insecure_endpoint: bool = False
    secret_fields: ClassVar[frozenset[str]] = frozenset({"credentials_json"})

    @field_validator("key_name")
    @classmethod
    def _check_key_name(cls, value: str) -> str:
        if not _KEY_NAME.fullmatch(value):
            raise ValueError(
                "must be a CryptoKey name, projects/<project>/locations/<location>/keyRings/<ring>"
                "/cryptoKeys/<key> (not a key version, no leading slash or URL)"
            )
        return value

    @field_validator("credentials_json")
    @classmethod
    def _check_credentials(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        try:
            info = json.loads(value.get_secret_value())
        except ValueError:
            raise ValueError("must be a service-account JSON key (the key file's contents)") from None
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise ValueError('must be a service-account JSON key ("type": "service_account")')
        missing = [f for f in ("client_email", "private_key") if not isinstance(info.get(f), str)]
        if missing:
            raise ValueError("the service-account JSON key lacks " + ", ".join(missing))
        return value

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _ENDPOINT.fullmatch(value)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError("must be host:port (e.g. private.cloudkms.example:443), no scheme or path")
        return value

    @field_validator("insecure_endpoint")
    @classmethod
    def _check_insecure(cls, value: bool, info: ValidationInfo) -> bool:
        if not value:
            return value
        endpoint = info.data.get("endpoint")
        if endpoint is None:
            raise ValueError("needs an endpoint (host:port) on a loopback address")
        if not _is_loopback(_endpoint_host(endpoint)):
            raise ValueError("plaintext gRPC is only allowed to a loopback endpoint (tests)")
        return value

    async def connect(self, *, local_wrapping_key: bytes | None = None) -> KeyProvider:
        return await GcpKmsProvider.open(self)


def _load_credentials(config: GcpKmsConfig) -> Any:
    """Blocking (ADC may query the metadata server): run in a thread."""
    import google.auth
    from google.auth import exceptions as auth_exceptions
    from google.oauth2 import service_account

    account_credentials: Any = service_account.Credentials  # untyped in google-auth

    if config.credentials_json is not None:
        try:
            info = json.loads(config.credentials_json.get_secret_value())
            return account_credentials.from_service_account_info(info, scopes=_SCOPES)
        except (ValueError, KeyError, TypeError, auth_exceptions.GoogleAuthError):
            raise ProviderAccessDenied(
                "credentials_json is not a usable service-account key (malformed private key?)"
            ) from None
    try:
        credentials, _project = google.auth.default(scopes=_SCOPES)
    except auth_exceptions.DefaultCredentialsError:
        raise ProviderAccessDenied(
            "no Google credentials: give credentials_json, or run the service with Application "
            "Default Credentials (Workload Identity, a VM service account)"
        ) from None
    return credentials


def _server_detail(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    if not isinstance(message, str):
        details = getattr(exc, "details", None)
        message = details() if callable(details) else ""
    text = " ".join(str(message).split())
    return text[:_SERVER_DETAIL_CHARS]


class GcpKmsProvider(KeyProvider):
    """One Cloud KMS CryptoKey over gRPC (asyncio). Bound to the event loop that opened it.

    The asyncio client is used rather than the sync client in a thread: a grpc.aio channel
    multiplexes any number of concurrent calls on one HTTP/2 connection without tying up a
    thread per call, so an outage (every call waiting for its deadline) cannot exhaust the
    default executor that the rest of the service shares.
    """

    type: ClassVar[str] = "gcp-kms"

    def __init__(self, client: Any, *, key_name: str, timeout_seconds: float) -> None:
        from google.api_core import exceptions as api_exceptions
        from google.api_core import retry_async

        self._client = client
        self._key_name = key_name
        self._timeout = timeout_seconds
        self._closed = False
        # Retry only UNAVAILABLE (a transient connection problem), quickly, within the deadline.
        self._retry = retry_async.AsyncRetry(
            predicate=retry_async.if_exception_type(api_exceptions.ServiceUnavailable),
            initial=0.05,
            maximum=min(1.0, timeout_seconds / 4),
            multiplier=2.0,
            timeout=timeout_seconds,
        )

    @classmethod
    async def open(cls, config: GcpKmsConfig) -> GcpKmsProvider:
        from google.cloud.kms_v1 import KeyManagementServiceAsyncClient

        _silence_payload_logging()
        credentials: Any
        if config.insecure_endpoint:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud.kms_v1.services.key_management_service.transports.grpc_asyncio import (
                KeyManagementServiceGrpcAsyncIOTransport,
            )
            from grpc import (  # type: ignore[import-untyped,unused-ignore]
                LocalConnectionType,
                local_channel_credentials,
            )

            anonymous: Any = AnonymousCredentials  # untyped in google-auth
            credentials = anonymous()
            if config.credentials_json is not None:
                credentials = await asyncio.to_thread(_load_credentials, config)
            transport = KeyManagementServiceGrpcAsyncIOTransport(
                host=config.endpoint or "",
                credentials=credentials,
                # No TLS, and grpc itself refuses a peer that is not on this machine.
                ssl_channel_credentials=local_channel_credentials(LocalConnectionType.LOCAL_TCP),
                always_use_jwt_access=True,
            )
            client = KeyManagementServiceAsyncClient(transport=transport)
        else:
            from google.api_core.client_options import ClientOptions

            credentials = await asyncio.to_thread(_load_credentials, config)
            options = ClientOptions(api_endpoint=config.endpoint) if config.endpoint else None
            client = KeyManagementServiceAsyncClient(credentials=credentials, client_options=options)
        return cls(client, key_name=config.key_name, timeout_seconds=config.timeout_seconds)

    def __repr__(self) -> str:
        return f"GcpKmsProvider(key_name={self._key_name!r})"

    async def _call(self, op: str, rpc: Callable[..., Awaitable[_T]], request: dict[str, Any]) -> _T:
        from google.api_core import exceptions as api_exceptions
        from google.auth import exceptions as auth_exceptions

        if self._closed:
            raise ProviderUnavailable("the Cloud KMS connection is closed")
        try:
            async with asyncio.timeout(self._timeout):
                return await rpc(request=request, timeout=self._timeout, retry=self._retry)
        except TimeoutError:
            raise ProviderUnavailable(
                f"Cloud KMS {op} on {self._key_name} timed out after {self._timeout:g}s"
            ) from None
        except api_exceptions.RetryError as exc:  # UNAVAILABLE until the deadline
            if exc.cause is None:
                raise ProviderUnavailable(f"Cloud KMS {op} on {self._key_name}: retries exhausted") from None
            raise self._translate(op, exc.cause) from None
        except api_exceptions.GoogleAPICallError as exc:
            raise self._translate(op, exc) from None
        except auth_exceptions.RefreshError:
            raise ProviderAccessDenied(f"Google refused the credentials for {self._key_name}") from None
        except auth_exceptions.GoogleAuthError:
            raise ProviderUnavailable("could not obtain a Google access token") from None

    def _translate(self, op: str, exc: BaseException) -> ProviderError:
        from google.api_core import exceptions as api

        code = getattr(exc, "grpc_status_code", None)
        name = str(getattr(code, "name", "no status"))
        message = f"Cloud KMS {op} on {self._key_name}: {name}: {_server_detail(exc)}"
        logger.info("Cloud KMS %s on %s failed: %s", op, self._key_name, name)
        if isinstance(exc, (api.PermissionDenied, api.Unauthenticated)):
            return ProviderAccessDenied(message)
        if isinstance(exc, api.NotFound):
            return ProviderKeyNotFound(message)
        if isinstance(exc, api.FailedPrecondition):  # version disabled, destroyed, EKM refused
            return ProviderKeyDisabled(message)
        if isinstance(exc, api.InvalidArgument) and op == "Decrypt":
            # Wrong AAD, a tampered or foreign ciphertext: "Decryption failed". Stay unspecific.
            return ProviderCryptoError("the wrapped secret could not be unwrapped by Cloud KMS")
        if isinstance(
            exc,
            (
                api.ServiceUnavailable,
                api.DeadlineExceeded,
                api.TooManyRequests,  # RESOURCE_EXHAUSTED: quota
                api.InternalServerError,
                api.Aborted,
            ),
        ):
            return ProviderUnavailable(message)
        return ProviderError(message)

    def _corrupt(self, op: str, what: str) -> ProviderError:
        logger.warning(
            "Cloud KMS %s response for %s failed its integrity check: %s", op, self._key_name, what
        )
        return ProviderError(
            f"Cloud KMS {op} response for {self._key_name} failed its integrity check ({what}); discarded"
        )

    async def wrap(self, secret: bytes, *, context: WrapContext) -> bytes:
        if not 0 < len(secret) <= _MAX_PAYLOAD:
            raise ProviderError("the secret to wrap must be 1 byte to 64 KiB")
        aad = context_aad(context)
        response: Any = await self._call(
            "Encrypt",
            self._client.encrypt,
            {
                "name": self._key_name,
                "plaintext": secret,
                "additional_authenticated_data": aad,
                "plaintext_crc32c": _crc32c(secret),
                "additional_authenticated_data_crc32c": _crc32c(aad),
            },
        )
        ciphertext = bytes(response.ciphertext)
        used = str(response.name)
        if used != self._key_name and not (
            used.startswith(self._key_name) and _VERSION_SUFFIX.fullmatch(used[len(self._key_name) :])
        ):
            raise self._corrupt("Encrypt", "it names another key")
        if not response.verified_plaintext_crc32c:
            raise self._corrupt("Encrypt", "the plaintext checksum was not verified")
        if not response.verified_additional_authenticated_data_crc32c:
            raise self._corrupt("Encrypt", "the AAD checksum was not verified")
        if not ciphertext or response.ciphertext_crc32c is None:
            raise self._corrupt("Encrypt", "ciphertext or its checksum missing")
        if _crc32c(ciphertext) != response.ciphertext_crc32c:
            raise self._corrupt("Encrypt", "ciphertext checksum mismatch")
        return _FORMAT + ciphertext

    async def unwrap(self, blob: bytes, *, context: WrapContext) -> bytes:
        if len(blob) < 2 or blob[:1] != _FORMAT or len(blob) - 1 > 2 * _MAX_PAYLOAD:
            raise ProviderCryptoError("the wrapped secret is malformed")
        ciphertext = blob[1:]
        aad = context_aad(context)
        response: Any = await self._call(
            "Decrypt",
            self._client.decrypt,
            {
                "name": self._key_name,
                "ciphertext": ciphertext,
                "additional_authenticated_data": aad,
                "ciphertext_crc32c": _crc32c(ciphertext),
                "additional_authenticated_data_crc32c": _crc32c(aad),
            },
        )
        plaintext = bytes(response.plaintext)
        if response.plaintext_crc32c is None or _crc32c(plaintext) != response.plaintext_crc32c:
            raise self._corrupt("Decrypt", "plaintext checksum mismatch")
        return plaintext

    async def _get_key(self) -> Any:
        return await self._call("GetCryptoKey", self._client.get_crypto_key, {"name": self._key_name})

    async def describe(self) -> ProviderInfo:
        key = await self._get_key()
        primary = key.primary
        level = primary.protection_level.name if primary else "UNKNOWN"
        return ProviderInfo(
            type=self.type,
            key_ref=self._key_name,
            hsm_backed=level in ("HSM", "HSM_SINGLE_TENANT"),
            details={
                "purpose": key.purpose.name,
                "protection_level": level,
                "primary_version": primary.name.rpartition("/")[2] if primary else None,
                "primary_state": primary.state.name if primary else None,
                "algorithm": primary.algorithm.name if primary else None,
                "external": level in ("EXTERNAL", "EXTERNAL_VPC"),
            },
        )

    async def health(self) -> ProviderHealth:
        start = time.perf_counter()
        try:
            key = await self._get_key()
        except ProviderError as exc:
            return ProviderHealth(ok=False, latency_ms=(time.perf_counter() - start) * 1000, detail=str(exc))
        except Exception as exc:  # never raises, whatever the SDK does
            logger.warning("Cloud KMS health probe failed unexpectedly: %s", type(exc).__name__)
            return ProviderHealth(
                ok=False, latency_ms=(time.perf_counter() - start) * 1000, detail=type(exc).__name__
            )
        latency = (time.perf_counter() - start) * 1000
        purpose = key.purpose.name
        if purpose != "ENCRYPT_DECRYPT":
            return ProviderHealth(ok=False, latency_ms=latency, detail=f"key purpose is {purpose}")
        state = key.primary.state.name if key.primary else "NO_PRIMARY"
        if state != "ENABLED":
            return ProviderHealth(ok=False, latency_ms=latency, detail=f"primary version is {state}")
        return ProviderHealth(ok=True, latency_ms=latency)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.transport.close()
