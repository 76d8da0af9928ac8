"""Test-only providers: one whose config carries a write-only credential, one that can be
switched off.

The first

It wraps like `local` but refuses to connect unless given the expected API token, so a working
wrap proves the service stored and reopened the credential correctly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import SecretStr

from providers.base import KeyProvider, ProviderAccessDenied, ProviderConfig, ProviderUnavailable
from providers.local import LocalProvider

EXPECTED_TOKEN = "s3cr3t-api-token-for-tests-0123456789"


class CredentialProviderConfig(ProviderConfig):
    type: Literal["test-credential"] = "test-credential"
    account: str
    api_token: SecretStr
    secret_fields: ClassVar[frozenset[str]] = frozenset({"api_token"})

    async def connect(self, *, local_wrapping_key: bytes | None = None) -> KeyProvider:
        if self.api_token.get_secret_value() != EXPECTED_TOKEN:
            raise ProviderAccessDenied("the API token was refused")
        return LocalProvider(hashlib.sha256(self.account.encode()).digest())


class Switch:
    """Shared state of the flaky provider: tests flip `down` to simulate an outage."""

    down = False
    calls = 0


class FlakyProvider(LocalProvider):
    type: ClassVar[str] = "test-flaky"

    async def wrap(self, secret: bytes, *, context: Mapping[str, str]) -> bytes:
        self._check()
        return await super().wrap(secret, context=context)

    async def unwrap(self, blob: bytes, *, context: Mapping[str, str]) -> bytes:
        self._check()
        return await super().unwrap(blob, context=context)

    @staticmethod
    def _check() -> None:
        Switch.calls += 1
        if Switch.down:
            raise ProviderUnavailable("test provider is down")


class FlakyProviderConfig(ProviderConfig):
    type: Literal["test-flaky"] = "test-flaky"

    async def connect(self, *, local_wrapping_key: bytes | None = None) -> KeyProvider:
        return FlakyProvider(bytes(32))
