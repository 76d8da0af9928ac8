"""Where a version's KEK secret S comes from (DESIGN §2).

- ``local``: S = HKDF(M, version_salt, enc("kms/v1","kek",t,k,v), 32); only the salt is stored.
- any other provider: S = 32 random bytes, stored only as provider.wrap(S), and checked by
  unwrapping before it is stored.
Deleting the salt or the wrapped secret destroys the version (crypto-shredding).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
from typing import Any

from pydantic import SecretBytes as PydanticSecretBytes
from pydantic import SecretStr

from kms_service import crypto
from kms_service.errors import ProviderFailure, ProviderUnavailableError, ServiceError
from kms_service.keys.cache import KekSecretCache
from kms_service.keys.credentials import CredentialsError, full_config
from kms_service.keys.model import KeyMeta, VersionMeta
from kms_service.keys.resilience import CircuitOpen, ResilientProvider
from kms_service.master import Installation
from providers import KeyProvider, ProviderConfig, ProviderConfigError, ProviderError, ProviderUnavailable

log = logging.getLogger(__name__)


def wrap_context(tenant: str, key: str, version: int) -> dict[str, str]:
    return {"tenant": tenant, "key": key, "version": str(version)}


def provider_error(exc: ProviderError) -> ServiceError:
    """Translate a provider's error for the client; its message is safe by contract."""
    if isinstance(exc, CircuitOpen):
        return ProviderUnavailableError(str(exc), retry_after=math.ceil(exc.retry_after))
    if isinstance(exc, ProviderUnavailable):
        return ProviderUnavailableError(str(exc) or "the key provider is unreachable", retry_after=5)
    return ProviderFailure(str(exc) or "the key provider refused the operation", code=exc.code)


def _reveal(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, (SecretStr, PydanticSecretBytes)) else value


class ProviderPool:
    """Connected providers, one per distinct config, shared by every key that uses it."""

    def __init__(self, installation: Installation, *, resilience: dict[str, Any] | None = None) -> None:
        self._inst = installation
        self._providers: dict[str, KeyProvider] = {}
        self._resilience = resilience or {}

    async def get(self, config: ProviderConfig) -> KeyProvider:
        # Keyed by a digest of the whole config, credentials included (two keys that differ only
        # in credentials must not share a connection); the digest keeps them out of the dict.
        dumped = {k: _reveal(v) for k, v in config.model_dump().items()}
        ident = hashlib.sha256(json.dumps(dumped, sort_keys=True, default=str).encode()).hexdigest()
        provider = self._providers.get(ident)
        if provider is None:
            try:
                inner = await config.connect(local_wrapping_key=self._inst.local_wrapping_key.reveal())
            except ProviderError as exc:
                raise provider_error(exc) from None
            provider = ResilientProvider(inner, **self._resilience)
            self._providers[ident] = provider
        return provider

    def connected(self) -> list[KeyProvider]:
        return list(self._providers.values())

    async def close(self) -> None:
        providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            try:
                await provider.close()
            except Exception as exc:  # closing must not fail shutdown
                log.warning("closing provider %s failed: %s", provider.type, type(exc).__name__)


class KeyMaterial:
    def __init__(self, installation: Installation, pool: ProviderPool, cache: KekSecretCache) -> None:
        self._inst = installation
        self._pool = pool
        self._cache = cache

    def config_of(
        self, public: dict[str, Any], sealed: bytes | None, *, tenant: str, key: str
    ) -> ProviderConfig:
        """The connectable provider config of a key: public part plus its opened credentials."""
        try:
            return full_config(
                public, sealed, sealing_key=self._inst.config_secrets_key.reveal(), tenant=tenant, key=key
            )
        except (CredentialsError, ProviderConfigError) as exc:
            log.error("provider config of %s/%s unusable: %s", tenant, key, exc)
            raise ProviderFailure(
                f"the provider configuration of key {key!r} cannot be used",
                code="provider_config_error",
                status=500,
            ) from None

    async def new_version(
        self, config: ProviderConfig, *, tenant: str, key: str, version: int
    ) -> tuple[bytes | None, bytes | None]:
        """Material for a new version: ``(version_salt, None)`` or ``(None, wrapped_secret)``."""
        if config.type == "local":
            return secrets.token_bytes(crypto.kdf.SALT_LEN), None
        provider = await self._pool.get(config)
        secret = secrets.token_bytes(crypto.kdf.SECRET_LEN)
        context = wrap_context(tenant, key, version)
        try:
            wrapped = await provider.wrap(secret, context=context)
            check = await provider.unwrap(wrapped, context=context)
        except ProviderError as exc:
            raise provider_error(exc) from None
        if not hmac.compare_digest(check, secret):
            log.error("provider %s returned a different secret on unwrap; version not stored", provider.type)
            raise ProviderFailure(
                "the key provider failed the wrap/unwrap check", code="provider_integrity_error", status=502
            )
        return None, wrapped

    def forget_destroyed(self, meta: KeyMeta) -> None:
        """Drop cached secrets of versions that no longer have material (crypto-shredding)."""
        for version in meta.versions.values():
            if version.version_salt is None and version.wrapped_secret is None:
                self._cache.pop((meta.tenant, meta.name, version.version))

    async def secret(self, meta: KeyMeta, version: VersionMeta) -> bytes:
        """S of ``version`` (cached for the KEK cache TTL)."""
        ck = (meta.tenant, meta.name, version.version)
        found, cached = self._cache.get(ck)
        if found and cached is not None:
            return cached
        epoch = self._cache.epoch
        if version.version_salt is not None:
            value = crypto.derive_local_kek(
                master_secret=self._inst.master.reveal(),
                version_salt=version.version_salt,
                tenant=meta.tenant,
                key=meta.name,
                version=version.version,
            )
        elif version.wrapped_secret is not None:
            config = self.config_of(
                meta.provider_config, meta.provider_secrets, tenant=meta.tenant, key=meta.name
            )
            provider = await self._pool.get(config)
            try:
                value = await provider.unwrap(
                    version.wrapped_secret, context=wrap_context(meta.tenant, meta.name, version.version)
                )
            except ProviderError as exc:
                raise provider_error(exc) from None
        else:  # destroyed: no material left
            raise ServiceError("key version has no material")
        self._cache.put_if_current(ck, value, epoch)
        return value
