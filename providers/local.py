"""The `local` provider: the service-hosted key, rooted in the master secret M.

Per DESIGN §2 a local key version's secret S is *derived* from M and the version salt, so local
key versions need no wrapping at all (the service derives them; see kms_service.keys.material).
This adapter still implements the full contract, wrapping with AES-256-GCM under a 32-byte key
the service derives from M, so that anything needing "a provider" (the conformance suite, sealed
configuration) can use the service-hosted root like any other backend.

Permissions needed: none (no external system).
"""

from __future__ import annotations

import os
import time
from typing import ClassVar, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from providers.base import (
    KeyProvider,
    ProviderConfig,
    ProviderCryptoError,
    ProviderHealth,
    ProviderInfo,
    WrapContext,
    encode_context,
)

_FORMAT = b"\x01"
_NONCE_LEN = 12


class LocalProvider(KeyProvider):
    type: ClassVar[str] = "local"

    def __init__(self, wrapping_key: bytes) -> None:
        if len(wrapping_key) != 32:
            raise ValueError("local wrapping key must be 32 bytes")
        self._aead = AESGCM(wrapping_key)

    def __repr__(self) -> str:
        return "LocalProvider()"

    async def wrap(self, secret: bytes, *, context: WrapContext) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        return _FORMAT + nonce + self._aead.encrypt(nonce, secret, encode_context(context))

    async def unwrap(self, blob: bytes, *, context: WrapContext) -> bytes:
        if len(blob) < 1 + _NONCE_LEN + 16 or blob[:1] != _FORMAT:
            raise ProviderCryptoError("wrapped secret is malformed")
        try:
            return self._aead.decrypt(
                blob[1 : 1 + _NONCE_LEN], blob[1 + _NONCE_LEN :], encode_context(context)
            )
        except InvalidTag:
            raise ProviderCryptoError("wrapped secret could not be unwrapped") from None

    async def describe(self) -> ProviderInfo:
        return ProviderInfo(type=self.type, key_ref="master-secret", hsm_backed=False)

    async def health(self) -> ProviderHealth:
        start = time.perf_counter()
        return ProviderHealth(ok=True, latency_ms=(time.perf_counter() - start) * 1000)


class LocalProviderConfig(ProviderConfig):
    """`{"type": "local"}`: key versions derived from the sealed master secret."""

    type: Literal["local"] = "local"

    async def connect(self, *, local_wrapping_key: bytes | None = None) -> KeyProvider:
        if local_wrapping_key is None:
            raise ValueError("the local provider needs the service's wrapping key")
        return LocalProvider(local_wrapping_key)
