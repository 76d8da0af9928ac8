"""The asynchronous client, :class:`AsyncKmsClient` (same methods as :class:`KmsClient`, awaited)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from kms_client import _api
from kms_client._api import UNSET, Operation, Role, Unset, VersionAction
from kms_client._core import (
    ClientConfig,
    Op,
    RetryPolicy,
    StrPath,
    TokenSource,
    finish,
    headers,
    next_delay,
    ssl_context,
    transport_error,
)
from kms_client.errors import KmsError
from kms_client.models import (
    AuditPage,
    AuditVerification,
    CiphertextRequest,
    CreatedToken,
    DataKey,
    DatakeyRequest,
    Decrypted,
    DerivedKey,
    DeriveRequest,
    Encrypted,
    EncryptRequest,
    Health,
    Identity,
    Key,
    Tenant,
    TokenInfo,
)

T = TypeVar("T")


class AsyncKmsClient:
    """An asynchronous client of kms-service (one connection pool per instance; close it with
    ``await client.aclose()`` or use it as an async context manager).

    >>> async with AsyncKmsClient("https://kms.example:8400", token_file="/var/run/secrets/kms/token",
    ...                ca_bundle="/etc/kms/ca.pem") as kms:
    ...     dek = await kms.derive("acme", "volumes", "pg-data-0", length=64)
    ...     if dek.latest_version and dek.latest_version > dek.version:
    ...         ...  # the key was rotated: re-key the volume

    Authentication: ``token`` (the bearer token itself) or ``token_file`` (re-read whenever the
    file changes, for rotated Kubernetes service-account tokens). TLS: ``ca_bundle`` to trust a
    private CA, ``client_cert`` + ``client_key`` for mutual TLS, ``verify=False`` to skip server
    verification (tests only). 503 and 429 answers are retried per ``retry``
    (:class:`RetryPolicy`); every other error is raised at once as a :class:`KmsError` subclass.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        token_file: StrPath | None = None,
        ca_bundle: StrPath | None = None,
        client_cert: StrPath | None = None,
        client_key: StrPath | None = None,
        verify: bool = True,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._config = ClientConfig(
            base_url=base_url.rstrip("/"),
            tokens=TokenSource(token, token_file),
            timeout=timeout,
            retry=retry or RetryPolicy(),
            verify=ssl_context(
                verify=verify, ca_bundle=ca_bundle, client_cert=client_cert, client_key=client_key
            ),
            rng=rng or random.Random(),  # noqa: S311 - jitter, not cryptography
        )
        self._http = httpx.AsyncClient(
            base_url=self._config.base_url,
            timeout=timeout,
            verify=self._config.verify,
            transport=transport,
            trust_env=False,
        )
        self._sleep = sleep
        self._clock = clock

    # -- plumbing --------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncKmsClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _run(self, op: Op[T]) -> T:
        policy = self._config.retry if op.retry else RetryPolicy(max_attempts=1)
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    response = await self._http.request(
                        op.method,
                        op.path,
                        json=op.json,
                        params=op.params,
                        headers=headers(self._config.tokens, op),
                    )
                except httpx.TransportError as exc:
                    raise transport_error(exc, op) from exc
                return finish(op, response)
            except KmsError as exc:
                wait = next_delay(policy, exc, attempt, self._clock() - started, self._config.rng)
                if wait is None:
                    raise
            await self._sleep(wait)

    # -- data plane ------------------------------------------------------------------------

    async def derive(
        self,
        tenant: str,
        key: str,
        id: str,
        *,
        purpose: str = "volume",
        length: int = 32,
        version: int | None = None,
    ) -> DerivedKey:
        """The deterministic DEK ``id`` of the key's primary version (or of ``version``).

        >>> dek = await kms.derive("acme", "volumes", "pg-data-0", length=64)
        >>> len(dek.key), dek.version, dek.latest_version
        (64, 1, 1)
        """
        return await self._run(_api.derive(tenant, key, id, purpose, length, version))

    async def derive_batch(
        self, tenant: str, key: str, items: Iterable[DeriveRequest]
    ) -> list[DerivedKey | KmsError]:
        """Up to 1000 derivations in one call; each slot holds a result or the item's error.

        >>> out = await kms.derive_batch("acme", "volumes", [DeriveRequest("a"), DeriveRequest("b")])
        """
        return await self._run(_api.derive_batch(tenant, key, items))

    async def datakey(
        self,
        tenant: str,
        key: str,
        *,
        length: int = 32,
        context: Mapping[str, str] | None = None,
        plaintext: bool = True,
    ) -> DataKey:
        """A fresh random data key, wrapped under the primary version (and in clear, unless
        ``plaintext=False``).

        >>> dk = await kms.datakey("acme", "secrets", context={"file": "app.env"})
        >>> store(dk.ciphertext)
        >>> use(dk.plaintext)
        """
        return await self._run(_api.datakey(tenant, key, length, context, plaintext))

    async def datakey_batch(
        self, tenant: str, key: str, items: Iterable[DatakeyRequest]
    ) -> list[DataKey | KmsError]:
        return await self._run(_api.datakey_batch(tenant, key, items))

    async def encrypt(
        self, tenant: str, key: str, plaintext: bytes, *, context: Mapping[str, str] | None = None
    ) -> Encrypted:
        """Encrypt up to 64 KiB under the primary version.

        >>> ct = await kms.encrypt("acme", "volumes", b"db-password", context={"app": "billing"})
        >>> ct.ciphertext
        'kms:v1:...'
        """
        return await self._run(_api.encrypt(tenant, key, plaintext, context))

    async def encrypt_batch(
        self, tenant: str, key: str, items: Iterable[EncryptRequest]
    ) -> list[Encrypted | KmsError]:
        return await self._run(_api.encrypt_batch(tenant, key, items))

    async def decrypt(
        self, tenant: str, key: str, ciphertext: str, *, context: Mapping[str, str] | None = None
    ) -> Decrypted:
        """Decrypt a ciphertext with the context it was encrypted with (else
        :class:`~kms_client.errors.DecryptionFailed`).

        >>> (await kms.decrypt("acme", "volumes", ct.ciphertext, context={"app": "billing"})).plaintext
        b'db-password'
        """
        return await self._run(_api.decrypt(tenant, key, ciphertext, context))

    async def decrypt_batch(
        self, tenant: str, key: str, items: Iterable[CiphertextRequest]
    ) -> list[Decrypted | KmsError]:
        return await self._run(_api.decrypt_batch(tenant, key, items))

    async def rewrap(
        self, tenant: str, key: str, ciphertext: str, *, context: Mapping[str, str] | None = None
    ) -> Encrypted:
        """Re-encrypt under the primary version without the plaintext leaving the service."""
        return await self._run(_api.rewrap(tenant, key, ciphertext, context))

    async def rewrap_batch(
        self, tenant: str, key: str, items: Iterable[CiphertextRequest]
    ) -> list[Encrypted | KmsError]:
        return await self._run(_api.rewrap_batch(tenant, key, items))

    # -- tenants and keys ------------------------------------------------------------------

    async def create_tenant(self, id: str, name: str) -> Tenant:
        """A tenant: ``await kms.create_tenant("acme", "Acme Corp")``."""
        return await self._run(_api.create_tenant(id, name))

    async def list_tenants(self) -> list[Tenant]:
        return await self._run(_api.list_tenants())

    async def get_tenant(self, id: str) -> Tenant:
        return await self._run(_api.get_tenant(id))

    async def create_key(
        self,
        tenant: str,
        name: str,
        *,
        provider: Mapping[str, Any] | None = None,
        rotation_period_days: int | None = None,
    ) -> Key:
        """A key protected by ``provider`` (default ``{"type": "local"}``).

        >>> await kms.create_key("acme", "volumes", rotation_period_days=90)
        """
        return await self._run(_api.create_key(tenant, name, provider, rotation_period_days))

    async def list_keys(self, tenant: str) -> list[Key]:
        return await self._run(_api.list_keys(tenant))

    async def get_key(self, tenant: str, key: str) -> Key:
        return await self._run(_api.get_key(tenant, key))

    async def update_key(
        self,
        tenant: str,
        key: str,
        *,
        min_decryption_version: int | Unset = UNSET,
        rotation_period_days: int | Unset | None = UNSET,
        force: bool = False,
    ) -> Key:
        """Change only the fields given (``rotation_period_days=None`` turns rotation off)."""
        return await self._run(
            _api.update_key(tenant, key, min_decryption_version, rotation_period_days, force)
        )

    async def rotate_key(self, tenant: str, key: str, *, reason: str | None = None) -> Key:
        """Create version v+1 and make it primary.

        >>> (await kms.rotate_key("acme", "volumes", reason="quarterly")).primary_version
        2
        """
        return await self._run(_api.rotate_key(tenant, key, reason))

    async def transition_version(
        self,
        tenant: str,
        key: str,
        version: int,
        action: VersionAction,
        *,
        reason: str | None = None,
        waiting_period_days: int | None = None,
    ) -> Key:
        return await self._run(
            _api.transition_version(tenant, key, version, action, reason, waiting_period_days)
        )

    async def disable_version(self, tenant: str, key: str, version: int, *, reason: str | None = None) -> Key:
        return await self.transition_version(tenant, key, version, "disable", reason=reason)

    async def enable_version(self, tenant: str, key: str, version: int, *, reason: str | None = None) -> Key:
        return await self.transition_version(tenant, key, version, "enable", reason=reason)

    async def schedule_version_destruction(
        self,
        tenant: str,
        key: str,
        version: int,
        *,
        reason: str | None = None,
        waiting_period_days: int | None = None,
    ) -> Key:
        return await self.transition_version(
            tenant,
            key,
            version,
            "schedule-destruction",
            reason=reason,
            waiting_period_days=waiting_period_days,
        )

    async def restore_version(self, tenant: str, key: str, version: int, *, reason: str | None = None) -> Key:
        return await self.transition_version(tenant, key, version, "restore", reason=reason)

    # -- tokens, audit, system -------------------------------------------------------------

    async def create_token(
        self,
        role: Role,
        description: str,
        *,
        tenant: str | None = None,
        keys: Sequence[str] | None = None,
        operations: Sequence[Operation] | None = None,
        ttl_seconds: int | None = None,
    ) -> CreatedToken:
        """A new token; its secret (``.token``) is shown this once.

        >>> agent = await kms.create_token("agent", "node-1", tenant="acme", keys=["volumes"],
        ...                          operations=["derive"])
        """
        return await self._run(_api.create_token(role, description, tenant, keys, operations, ttl_seconds))

    async def list_tokens(self) -> list[TokenInfo]:
        return await self._run(_api.list_tokens())

    async def revoke_token(self, token_id: str) -> TokenInfo:
        return await self._run(_api.revoke_token(token_id))

    async def list_audit(
        self,
        *,
        tenant: str | None = None,
        action: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> AuditPage:
        """One page of audit events after ``after_seq``."""
        return await self._run(_api.list_audit(tenant, action, after_seq, limit))

    async def iter_audit(
        self,
        *,
        tenant: str | None = None,
        action: str | None = None,
        after_seq: int = 0,
        page_size: int = 500,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every audit event after ``after_seq``, page by page.

        >>> [e["action"] async for e in kms.iter_audit(tenant="acme")]
        """
        while True:
            page = await self.list_audit(tenant=tenant, action=action, after_seq=after_seq, limit=page_size)
            for event in page.events:
                yield event
            if page.next_after_seq is None or not page.events:
                return
            after_seq = page.next_after_seq

    async def verify_audit(self) -> AuditVerification:
        return await self._run(_api.verify_audit())

    async def health(self) -> Health:
        """The service's health report (no authentication; a 503 report is returned, not raised)."""
        return await self._run(_api.health())

    async def identity(self) -> Identity:
        return await self._run(_api.identity())
