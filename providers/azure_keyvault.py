"""The `azure-keyvault` provider: S wrapped by the customer's key in Azure Key Vault or Managed HSM.

The vault performs every wrap and unwrap (``POST {vault}/keys/{name}/{version}/wrapkey|unwrapkey``,
api-version 7.5). This adapter deliberately does not use the SDK's ``CryptographyClient``: for RSA
keys it wraps *locally* with the public key, and for ``oct`` keys, whose GET carries no key
material, azure-keyvault-keys 4.11 wraps under a random *local* key that no other process can ever
unwrap. Instead the requests go through ``KeyClient.send_request``, i.e. the SDK's own pipeline:
its challenge authentication (the 401 ``WWW-Authenticate`` handshake; the token's resource must
contain the vault's domain, except for a vault on loopback), bounded retries and TLS.

Permissions the identity needs on the key (nothing on the vault's management plane):

- Vault using Azure RBAC: the built-in role **Key Vault Crypto Service Encryption User**
  (data actions ``Microsoft.KeyVault/vaults/keys/read``, ``.../keys/wrap/action``,
  ``.../keys/unwrap/action``), assigned at the key's scope (or the vault's).
- Vault using access policies: key permissions **get, wrapKey, unwrapKey** — nothing else.
- Managed HSM: the local RBAC role **Managed HSM Crypto Service Encryption User** on ``/keys/<name>``.

Customer setup:

1. Create (or import, BYOK) a key: ``RSA`` / ``RSA-HSM`` of 2048 bits or more for ``RSA-OAEP-256``
   (the default), or an ``oct-HSM`` 256-bit key in a Managed HSM for ``A256KW``. Its permitted
   operations must include wrapKey and unwrapKey. Keep soft-delete and purge protection on:
   purging the key destroys every secret it wraps.
2. Create an app registration (service principal) for this service and a client secret for it, or
   federate the service's workload identity. Grant that principal the role/access policy above.
3. If the vault's firewall is on, allow the service's egress addresses (or a private endpoint).
4. Register the key: ``{"type": "azure-keyvault", "vault_url": "https://<vault>.vault.azure.net",
   "key_name": "<key>", "tenant_id": "...", "client_id": "...", "client_secret": "..."}``;
   optionally ``key_version`` to pin one version (default: the current version at each wrap),
   ``algorithm`` (``RSA-OAEP-256`` or ``A256KW``) and, for a service principal in a sovereign
   cloud, ``authority_host`` (e.g. ``https://login.microsoftonline.us``).

Disabling the key (or removing the role) stops unwraps at once on the vault's side; the service
then stops issuing DEKs for that tenant within its unwrapped-KEK cache TTL. Rotating the key in
Key Vault is safe: each wrapped secret records the key version that wrapped it and is unwrapped
with that version. Without ``tenant_id``/``client_id``/``client_secret`` the service's own
identity is used (environment, workload identity or managed identity; developer tool logins are
excluded in a server; its authority comes from the service's AZURE_AUTHORITY_HOST, never from a
tenant's config).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
import os
import re
import ssl
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, SecretStr, Strict, field_validator, model_validator

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

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.keyvault.keys.aio import KeyClient

_LOG = logging.getLogger(__name__)

API_VERSION = "7.5"
_BLOB_FORMAT = 0x01
_ALGORITHM_IDS: dict[str, int] = {"RSA-OAEP-256": 1, "A256KW": 2}
_ALGORITHMS_BY_ID = {number: name for name, number in _ALGORITHM_IDS.items()}
_TAG_LEN = 32
_VERSION_RE = re.compile(r"[0-9A-Za-z]{1,64}")
_RETRIES = 2  # after the first attempt; each attempt is bounded by timeout_seconds
_CONTEXT_LABEL = ("kms/v1", "azure-keyvault-wrap")

# Per operation: the access-policy permission and the RBAC data action the vault checks.
_PERMISSIONS: dict[str, tuple[str, str]] = {
    "get": ("get", "Microsoft.KeyVault/vaults/keys/read"),
    "wrapKey": ("wrapKey", "Microsoft.KeyVault/vaults/keys/wrap/action"),
    "unwrapKey": ("unwrapKey", "Microsoft.KeyVault/vaults/keys/unwrap/action"),
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not a base64url string") from None


def _context_tag(secret: bytes, context: WrapContext) -> bytes:
    """HMAC-SHA256 keyed with S over an injective encoding of the context.

    Key Vault's wrapKey takes no additional authenticated data, so the context is bound here: the
    vault wraps P = S || tag, and unwrap recomputes the tag from the recovered S and the caller's
    context, comparing in constant time. Only someone who knows S can make a valid tag, so a blob
    moved to another tenant/key/version row, or presented with another context, fails closed.
    Tampering with the ciphertext itself is caught by the vault (RSA-OAEP decoding, or the A256KW
    integrity check) and, failing that, by the tag.
    """
    return context_mac(secret, context, *_CONTEXT_LABEL)


def _encode_blob(algorithm: str, version: str, wrapped: bytes) -> bytes:
    """format(1) || algorithm id(1) || len(version)(1) || version (ASCII) || vault ciphertext."""
    raw_version = version.encode("ascii")
    return bytes([_BLOB_FORMAT, _ALGORITHM_IDS[algorithm], len(raw_version)]) + raw_version + wrapped


def _decode_blob(blob: bytes) -> tuple[str, str, bytes]:
    if len(blob) < 4 or blob[0] != _BLOB_FORMAT or blob[1] not in _ALGORITHMS_BY_ID:
        raise ProviderCryptoError("wrapped secret is malformed")
    end = 3 + blob[2]
    version = blob[3:end].decode("ascii", "replace")
    wrapped = blob[end:]
    if not wrapped or not _VERSION_RE.fullmatch(version):
        raise ProviderCryptoError("wrapped secret is malformed")
    return _ALGORITHMS_BY_ID[blob[1]], version, wrapped


def _version_of(kid: object) -> str:
    """The version segment of a key id ``https://<vault>/keys/<name>/<version>``."""
    parts = urlsplit(kid).path.strip("/").split("/") if isinstance(kid, str) else []
    if len(parts) != 3 or parts[0] != "keys" or not _VERSION_RE.fullmatch(parts[2]):
        raise ProviderError("Azure Key Vault returned a key id without a usable version")
    return parts[2]


def _is_tls_failure(exc: BaseException) -> bool:
    """Whether a (wrapped) transport error is a TLS verification/handshake failure."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen or len(seen) > 50:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError) or type(current).__name__ == "SSLError":
            return True
        linked = (
            getattr(current, "inner_exception", None),
            getattr(current, "reason", None),
            current.__cause__,
            current.__context__,
            *current.args,
        )
        stack.extend(item for item in linked if isinstance(item, BaseException))
    return False


class AzureKeyVaultProvider(KeyProvider):
    """One Key Vault key, connected. Safe for concurrent use (one SDK pipeline, thread-pooled I/O)."""

    type: ClassVar[str] = "azure-keyvault"

    def __init__(
        self, config: AzureKeyVaultConfig, client: KeyClient, credential: AsyncTokenCredential
    ) -> None:
        self._client = client
        self._credential = credential
        self._vault_url = config.vault_url.rstrip("/")
        self._host = urlsplit(config.vault_url).hostname or config.vault_url
        self._key_name = config.key_name
        self._pinned_version = config.key_version
        self._algorithm = config.algorithm
        self._principal = (
            f"service principal {config.client_id}"
            if config.client_id
            else "the service's Azure identity (workload/managed identity)"
        )
        # The SDK bounds each attempt by timeout_seconds; this bounds the whole call, retries,
        # Retry-After waits and token acquisition included.
        self._deadline = config.timeout_seconds * (_RETRIES + 1)
        self._managed_hsm = ".managedhsm." in self._host
        self._closed = False

    def __repr__(self) -> str:
        return f"AzureKeyVaultProvider(vault_url={self._vault_url!r}, key_name={self._key_name!r})"

    # -- the contract

    async def wrap(self, secret: bytes, *, context: WrapContext) -> bytes:
        if not secret:
            raise ProviderCryptoError("nothing to wrap: the secret is empty")
        payload = secret + _context_tag(secret, context)
        if self._algorithm == "A256KW" and len(payload) % 8:
            raise ProviderCryptoError("A256KW wraps only secrets whose length is a multiple of 8 bytes")
        # The key's state is checked here: the vault still performs wrapKey (a public-key
        # operation for RSA) on a disabled key, but a secret wrapped now could not be unwrapped.
        bundle = await self._get_key()
        key = self._jwk(bundle)
        if not self._enabled(bundle):
            raise ProviderKeyDisabled(f"{self._where()} is disabled in Azure Key Vault: enable it to resume")
        kty = str(key.get("kty", ""))
        if (self._algorithm == "A256KW") != kty.startswith("oct"):
            raise ProviderError(
                f"{self._where()} is of type {kty or 'unknown'}, which cannot wrap with {self._algorithm}: "
                "use RSA-OAEP-256 with RSA keys and A256KW with oct-HSM keys"
            )
        version = _version_of(key.get("kid"))
        result = await self._call(
            "POST",
            f"/keys/{self._key_name}/{version}/wrapkey",
            operation="wrapKey",
            body={"alg": self._algorithm, "value": _b64url(payload)},
        )
        try:
            wrapped = _unb64url(result.get("value"))
        except ValueError:
            raise ProviderError("Azure Key Vault returned an unreadable wrapKey result") from None
        if not wrapped:
            raise ProviderError("Azure Key Vault returned an empty wrapKey result")
        # The version that really wrapped (from the response's kid) goes into the blob, so the
        # blob stays unwrappable after the key is rotated in Key Vault.
        wrapped_version = _version_of(result["kid"]) if "kid" in result else version
        return _encode_blob(self._algorithm, wrapped_version, wrapped)

    async def unwrap(self, blob: bytes, *, context: WrapContext) -> bytes:
        algorithm, version, wrapped = _decode_blob(blob)
        try:
            result = await self._call(
                "POST",
                f"/keys/{self._key_name}/{version}/unwrapkey",
                operation="unwrapKey",
                body={"alg": algorithm, "value": _b64url(wrapped)},
            )
        except ProviderKeyNotFound:
            # The key exists but has no such version: the blob belongs to another key (or its
            # version field was altered). If the key itself is gone, this raises KeyNotFound.
            await self._call("GET", f"/keys/{self._key_name}", operation="get")
            raise ProviderCryptoError("wrapped secret could not be unwrapped by this key") from None
        try:
            payload = _unb64url(result.get("value"))
        except ValueError:
            raise ProviderCryptoError("wrapped secret could not be unwrapped") from None
        secret, tag = payload[:-_TAG_LEN], payload[-_TAG_LEN:]
        if not secret or not hmac.compare_digest(tag, _context_tag(secret, context)):
            _LOG.info("azure-keyvault: context check failed on unwrap with key %s", self._key_name)
            raise ProviderCryptoError("wrapped secret could not be unwrapped")
        return secret

    async def describe(self) -> ProviderInfo:
        bundle = await self._get_key()
        key = self._jwk(bundle)
        kty = str(key.get("kty", ""))
        key_ops = key.get("key_ops")
        return ProviderInfo(
            type=self.type,
            key_ref=str(key.get("kid", "")) or f"{self._vault_url}/keys/{self._key_name}",
            hsm_backed=kty.endswith("-HSM") or self._managed_hsm,
            details={
                "kty": kty,
                "key_ops": [str(op) for op in key_ops] if isinstance(key_ops, list) else [],
                "enabled": self._enabled(bundle),
            },
        )

    async def health(self) -> ProviderHealth:
        start = time.perf_counter()
        try:
            bundle = await self._get_key()
        except ProviderError as exc:
            return ProviderHealth(ok=False, latency_ms=_elapsed_ms(start), detail=str(exc))
        except Exception as exc:  # never raises: a probe reports, it does not fail
            return ProviderHealth(ok=False, latency_ms=_elapsed_ms(start), detail=type(exc).__name__)
        enabled = self._enabled(bundle)
        return ProviderHealth(
            ok=enabled,
            latency_ms=_elapsed_ms(start),
            detail="" if enabled else f"{self._where()} is disabled",
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._client.close()
        finally:
            await self._credential.close()

    # -- the wire

    async def _get_key(self) -> dict[str, Any]:
        suffix = f"/{self._pinned_version}" if self._pinned_version else ""
        return await self._call("GET", f"/keys/{self._key_name}{suffix}", operation="get")

    async def _call(
        self, method: str, path: str, *, operation: str, body: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """One REST call through the SDK pipeline; every failure leaves as a ProviderError."""
        from azure.core.rest import HttpRequest

        request = HttpRequest(method, path, json=dict(body) if body is not None else None)
        try:
            async with asyncio.timeout(self._deadline):
                response = await self._client.send_request(request)
        except TimeoutError:
            raise ProviderUnavailable(
                f"Azure Key Vault {self._host} did not complete {operation} within {self._deadline:g} s"
            ) from None
        except Exception as exc:
            raise self._exception_error(exc, operation) from None
        try:
            payload: object = response.json()
        except ValueError:
            payload = None
        if response.status_code == 200 and isinstance(payload, dict):
            return payload
        raise self._status_error(response.status_code, payload, operation)

    def _status_error(self, status: int, payload: object, operation: str) -> ProviderError:
        error = payload.get("error") if isinstance(payload, dict) else None
        error = error if isinstance(error, dict) else {}
        code = str(error.get("code", ""))
        message = str(error.get("message", ""))
        inner_error = error.get("innererror")
        inner = str(inner_error.get("code", "")) if isinstance(inner_error, dict) else ""
        _LOG.warning(
            "azure-keyvault: %s on key %s at %s answered HTTP %d %s/%s: %.300s",
            operation,
            self._key_name,
            self._host,
            status,
            code,
            inner,
            message,
        )
        where = self._where()
        if status in (400, 403) and (inner == "KeyDisabled" or "disabled key" in message.lower()):
            return ProviderKeyDisabled(f"{where} is disabled in Azure Key Vault: enable it to resume")
        if status == 401:
            akv = re.search(r"AKV\d+", message)
            return ProviderAccessDenied(
                f"Azure Key Vault {self._host} rejected the access token of {self._principal}"
                f"{f' ({akv.group(0)})' if akv else ''}: check that tenant_id is the vault's tenant "
                "and that authority_host matches the vault's cloud"
            )
        if status == 403:
            if inner == "ForbiddenByFirewall" or "firewall" in message.lower():
                return ProviderAccessDenied(
                    f"the firewall of Azure Key Vault {self._host} refused this service's address: allow it "
                    "in the vault's networking settings (or use a private endpoint)"
                )
            permission, action = _PERMISSIONS.get(operation, (operation, operation))
            return ProviderAccessDenied(
                f"{self._principal} may not {permission} on {where} ({inner or code or 'Forbidden'}): "
                "grant it the role 'Key Vault Crypto Service Encryption User' "
                f"(data action {action}; Managed HSM: 'Managed HSM Crypto Service Encryption User'), "
                "or an access policy with key permissions get, wrapKey and unwrapKey"
            )
        if status == 404:
            return ProviderKeyNotFound(
                f"{where} was not found: check vault_url, key_name and key_version (a deleted key can be "
                "recovered while it is soft-deleted)"
            )
        if status in (408, 429) or status >= 500:
            return ProviderUnavailable(f"Azure Key Vault {self._host} answered HTTP {status} to {operation}")
        if status == 400 and operation == "unwrapKey":
            return ProviderCryptoError("wrapped secret could not be unwrapped")
        return ProviderError(f"Azure Key Vault refused {operation} on {where}: HTTP {status} {code}".rstrip())

    def _exception_error(self, exc: Exception, operation: str) -> ProviderError:
        from azure.core.exceptions import (
            AzureError,
            ClientAuthenticationError,
            ServiceRequestError,
            ServiceResponseError,
        )

        # Messages of these errors carry URLs and AAD error text, never secrets or key material.
        _LOG.warning(
            "azure-keyvault: %s on key %s failed: %s: %.300s",
            operation,
            self._key_name,
            type(exc).__name__,
            exc,
        )
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if (
            isinstance(exc, ClientAuthenticationError)
            and isinstance(status, int)
            and (status == 429 or status >= 500)
        ):
            return ProviderUnavailable(f"the Entra ID token endpoint answered HTTP {status}: retry later")
        if isinstance(exc, ClientAuthenticationError):
            aadsts = re.search(r"AADSTS\d+", str(exc))
            return ProviderAccessDenied(
                f"could not get an Entra ID token for {self._principal}"
                f"{f' ({aadsts.group(0)})' if aadsts else ''}: check tenant_id, client_id and client_secret "
                "(or the workload/managed identity) and authority_host"
            )
        if _is_tls_failure(exc):
            # Refused, not denied: no authenticated vault answered, so nothing says our permissions
            # are wrong. Retrying is harmless (bounded) and a corrected CA bundle or a restored
            # network path heals it; the message says which setting to check.
            return ProviderUnavailable(
                f"TLS connection to {self._host} for {operation} failed: its certificate is not trusted or "
                "the handshake failed (check ca_bundle_path, or TLS interception on the path)"
            )
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            return ProviderUnavailable(
                f"Azure Key Vault {self._host} unreachable for {operation}: {type(exc).__name__}"
            )
        if isinstance(exc, ValueError) and "challenge" in str(exc).lower():
            return ProviderAccessDenied(
                f"the authentication challenge of {self._host} names a resource outside the vault's domain: "
                "refusing to send it a token (check vault_url)"
            )
        if isinstance(exc, AzureError):
            return ProviderUnavailable(
                f"Azure Key Vault {self._host} failed {operation}: {type(exc).__name__}"
            )
        return ProviderError(
            f"unexpected failure calling Azure Key Vault for {operation}: {type(exc).__name__}"
        )

    # -- helpers

    def _where(self) -> str:
        version = f" version {self._pinned_version}" if self._pinned_version else ""
        return f"key '{self._key_name}'{version} in {self._vault_url}"

    @staticmethod
    def _jwk(bundle: Mapping[str, Any]) -> dict[str, Any]:
        key = bundle.get("key")
        if not isinstance(key, dict):
            raise ProviderError("Azure Key Vault returned a key bundle without a key")
        return key

    @staticmethod
    def _enabled(bundle: Mapping[str, Any]) -> bool:
        attributes = bundle.get("attributes")
        return isinstance(attributes, dict) and attributes.get("enabled") is True


def _is_loopback(url: str) -> bool:
    """Whether the vault is on this machine (an emulator or test fake).

    The SDK sends a token only if the 401 challenge's resource (e.g. https://vault.azure.net) is a
    parent domain of the vault's host, so a hostile vault_url cannot collect a token for real
    vaults. No Azure domain can contain a loopback address, so there the check cannot pass and is
    skipped; such a token never leaves this machine. Everywhere else it stays on.
    """
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _https_url(value: str, field: str, *, allow_path: bool) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{field} must be an https:// URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{field} must not carry credentials, a query or a fragment")
    if not allow_path and parts.path not in ("", "/"):
        raise ValueError(f"{field} must be the vault's base URL, without a path")
    return value


class AzureKeyVaultConfig(ProviderConfig):
    """``{"type": "azure-keyvault", "vault_url": ..., "key_name": ..., ...}``: a customer's Key Vault key."""

    model_config = ConfigDict(hide_input_in_errors=True)  # merged with the base's strict/forbid/frozen

    type: Literal["azure-keyvault"] = "azure-keyvault"
    vault_url: Annotated[str, Field(max_length=2048)]
    """https://<name>.vault.azure.net or https://<name>.managedhsm.azure.net (any https URL)."""
    key_name: Annotated[str, Field(pattern=r"^[0-9A-Za-z-]{1,127}$")]
    key_version: Annotated[str, Field(pattern=r"^[0-9A-Za-z]{1,64}$")] | None = None
    """Pin one key version for wraps; absent: the key's current version at each wrap."""
    algorithm: Literal["RSA-OAEP-256", "A256KW"] = "RSA-OAEP-256"
    tenant_id: Annotated[str, Field(pattern=r"^[0-9A-Za-z.-]{1,256}$")] | None = None
    client_id: Annotated[str, Field(pattern=r"^[0-9A-Za-z-]{1,128}$")] | None = None
    client_secret: Annotated[
        Annotated[SecretStr, Strict(False), Field(min_length=1, max_length=1024)] | None, Field(repr=False)
    ] = None
    """Write-only. Accepted as a plain string (JSON); never shown by repr, str or public_view()."""
    authority_host: Annotated[str, Field(max_length=2048)] | None = None
    """Entra ID authority of the service principal, e.g. https://login.microsoftonline.us;
    default: the public cloud."""
    ca_bundle_path: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    """PEM file of the CAs trusted for TLS to the vault and authority; default: the system's."""

    secret_fields: ClassVar[frozenset[str]] = frozenset({"client_secret"})

    @field_validator("vault_url")
    @classmethod
    def _check_vault_url(cls, value: str) -> str:
        return _https_url(value, "vault_url", allow_path=False)

    @field_validator("authority_host")
    @classmethod
    def _check_authority_host(cls, value: str | None) -> str | None:
        return None if value is None else _https_url(value, "authority_host", allow_path=False)

    @model_validator(mode="after")
    def _check_credentials(self) -> AzureKeyVaultConfig:
        given = [self.tenant_id is not None, self.client_id is not None, self.client_secret is not None]
        if any(given) and not all(given):
            raise ValueError(
                "tenant_id, client_id and client_secret go together (a service principal); "
                "omit all three to use the service's own workload or managed identity"
            )
        if self.authority_host is not None and self.client_secret is None:
            # The service's own credential (its AZURE_CLIENT_SECRET, federated token) must never be
            # sent to an authority a tenant chose; that identity takes AZURE_AUTHORITY_HOST instead.
            raise ValueError(
                "authority_host applies only to a service principal (tenant_id, client_id, client_secret); "
                "the service's own identity uses the AZURE_AUTHORITY_HOST of the service"
            )
        return self

    async def connect(self, *, local_wrapping_key: bytes | None = None) -> KeyProvider:
        """Build the SDK client; no network I/O happens here."""
        del local_wrapping_key  # the customer's key protects S; the service's key is not involved
        from azure.core.pipeline.transport import AsyncioRequestsTransport
        from azure.keyvault.keys.aio import KeyClient

        transport_options = self._transport_options()
        retry_options: dict[str, Any] = {
            "retry_total": _RETRIES,
            "retry_connect": _RETRIES,
            "retry_read": 1,
            "retry_status": _RETRIES,
            "retry_backoff_factor": 0.2,
            "retry_backoff_max": self.timeout_seconds,
        }
        # requests in a thread pool: no aiohttp dependency (not in the azure extra).
        credential = self._credential(AsyncioRequestsTransport(**transport_options), retry_options)
        client = KeyClient(
            self.vault_url,
            credential,
            api_version=API_VERSION,
            transport=AsyncioRequestsTransport(**transport_options),
            verify_challenge_resource=not _is_loopback(self.vault_url),
            **retry_options,
        )
        return AzureKeyVaultProvider(self, client, credential)

    def _transport_options(self) -> dict[str, Any]:
        """Options of each azure-core transport: one connect/read timeout per attempt, TLS trust."""
        if self.ca_bundle_path is not None and not os.path.isfile(self.ca_bundle_path):
            raise ProviderError("ca_bundle_path does not name a readable PEM file")
        return {
            "connection_timeout": self.timeout_seconds,
            "read_timeout": self.timeout_seconds,
            "connection_verify": self.ca_bundle_path or True,
        }

    def _credential(self, transport: Any, retry_options: dict[str, Any]) -> AsyncTokenCredential:
        from azure.identity.aio import ClientSecretCredential, DefaultAzureCredential

        options: dict[str, Any] = {"transport": transport, **retry_options}
        if self.client_secret is not None and self.tenant_id is not None and self.client_id is not None:
            if self.authority_host is not None:
                options["authority"] = self.authority_host
            return ClientSecretCredential(
                self.tenant_id, self.client_id, self.client_secret.get_secret_value(), **options
            )
        # The production chain only: environment, workload identity, managed identity. Developer
        # logins (Azure CLI, VS Code, PowerShell, shared cache) must not leak into a server.
        return DefaultAzureCredential(
            exclude_shared_token_cache_credential=True,
            exclude_visual_studio_code_credential=True,
            exclude_cli_credential=True,
            exclude_powershell_credential=True,
            exclude_developer_cli_credential=True,
            **options,
        )
