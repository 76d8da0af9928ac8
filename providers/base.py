"""The provider contract: protect a short random secret, and nothing else.

A provider wraps and unwraps the 32-byte KEK secret S of one tenant key version. DEKs never
cross it: they are derived locally from S, so a provider is called once per cache miss, not once
per request. Every adapter translates its SDK's exceptions into the errors below at its boundary
and never logs, formats or returns key material in an error.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

WrapContext = Mapping[str, str]
"""Binds a wrapped secret to its owner, e.g. ``{"tenant": t, "key": k, "version": "3"}``.
Backends pass it as encryption context / AAD; unwrapping with another context must fail."""


def encode_context(context: WrapContext, *label: str) -> bytes:
    """``enc(*label, k1, v1, k2, v2, ...)`` with the context's keys sorted (DESIGN §2 ``enc``: each
    part UTF-8 preceded by its 2-byte big-endian length). Injective and order-independent: the AAD
    of backends that take one."""
    out = bytearray()
    for part in (*label, *(p for name in sorted(context) for p in (name, context[name]))):
        data = part.encode("utf-8")
        if len(data) > 0xFFFF:
            raise ProviderCryptoError("a wrap context entry is longer than 65535 bytes")
        out += len(data).to_bytes(2, "big") + data
    return bytes(out)


def context_mac(secret: bytes, context: WrapContext, *label: str) -> bytes:
    """HMAC-SHA256 keyed with S over ``encode_context(context, *label)``.

    For backends that wrap without associated data (RFC 5649, KMIP CBC, Key Vault wrapKey), the
    context is bound inside the wrapped payload as ``S || context_mac(S, context)``; unwrap
    recomputes it from the recovered S and compares in constant time. Only someone who knows S can
    make a valid tag, so a blob presented with another context, or moved to another row, fails."""
    return hmac.new(secret, encode_context(context, *label), hashlib.sha256).digest()


class ProviderError(Exception):
    """Base of every provider failure. Messages are safe to show: never key material."""

    code: ClassVar[str] = "provider_error"
    retryable: ClassVar[bool] = False


class ProviderUnavailable(ProviderError):
    """The backend could not be reached or timed out. Retry later (HTTP 503)."""

    code = "provider_unavailable"
    retryable = True


class ProviderAccessDenied(ProviderError):
    """The backend refused our credentials or role for this key."""

    code = "provider_access_denied"


class ProviderKeyNotFound(ProviderError):
    """The backend key does not exist (or is not visible to us)."""

    code = "provider_key_not_found"


class ProviderKeyDisabled(ProviderError):
    """The backend key exists but is disabled, revoked or pending deletion."""

    code = "provider_key_disabled"


class ProviderCryptoError(ProviderError):
    """Unwrap failed: wrong context, tampered or foreign blob. Deliberately unspecific."""

    code = "provider_crypto_error"


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """What `describe()` reports: safe, non-secret facts about the backend key."""

    type: str
    key_ref: str
    hsm_backed: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    ok: bool
    latency_ms: float
    detail: str = ""


class KeyProvider(abc.ABC):
    """One backend key, connected. Implementations must be safe for concurrent use."""

    type: ClassVar[str]

    @abc.abstractmethod
    async def wrap(self, secret: bytes, *, context: WrapContext) -> bytes:
        """Return an opaque blob from which only this backend key, with the same ``context``,
        recovers ``secret``. Raises ProviderError subclasses only."""

    @abc.abstractmethod
    async def unwrap(self, blob: bytes, *, context: WrapContext) -> bytes:
        """Invert :meth:`wrap`. A blob wrapped under another key or context raises
        :class:`ProviderCryptoError`; an unreachable backend :class:`ProviderUnavailable`."""

    @abc.abstractmethod
    async def describe(self) -> ProviderInfo:
        """Non-secret facts about the backend key."""

    @abc.abstractmethod
    async def health(self) -> ProviderHealth:
        """A cheap liveness probe of the backend key, with its latency. Never raises."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most adapters hold nothing
        """Release connections. Idempotent."""


class ProviderConfig(BaseModel, abc.ABC):
    """Plain data that knows how to connect. One subclass per provider ``type``.

    Fields listed in ``secret_fields`` are write-only credentials: the service stores them
    encrypted and never returns them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: str
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Connect/read timeout of every backend call: an unreachable backend fails within it."""
    secret_fields: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    async def connect(self, *, local_wrapping_key: bytes | None = None) -> KeyProvider:
        """Build a connected provider. SDKs are imported here, lazily."""

    def public_view(self) -> dict[str, Any]:
        """The config as the API shows it: secret fields omitted."""
        return self.model_dump(exclude=set(self.secret_fields))
