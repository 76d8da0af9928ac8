"""Data-plane operations. No database round trip on the hot path but the group-committed
audit append: tokens, key metadata and KEK secrets come from in-process caches.

Every call is audited, success or failure, and a result is only returned once its audit event is
durable (fail closed). A batch is one audit event.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kms_service import crypto
from kms_service.audit.chain import EventDraft
from kms_service.audit.writer import AuditBatcher
from kms_service.auth.principal import Operation, Principal
from kms_service.auth.tokens import TokenService
from kms_service.errors import (
    DecryptionFailedError,
    KeyDisabled,
    KeyVersionBelowMinimum,
    KeyVersionDisabled,
    NoPrimaryVersion,
    NotFound,
    ServiceError,
)
from kms_service.keys.material import KeyMaterial
from kms_service.keys.model import KeyMeta, KeyState, VersionMeta, VersionState
from kms_service.keys.service import KeyService
from kms_service.keys.usage import UsageRecorder
from kms_service.request import RequestMeta

log = logging.getLogger(__name__)

ACTIONS = {
    Operation.DERIVE: "key.dek.derived",
    Operation.DATAKEY: "key.datakey.generated",
    Operation.ENCRYPT: "key.encrypted",
    Operation.DECRYPT: "key.decrypted",
    Operation.REWRAP: "key.rewrapped",
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class DeriveItem:
    id: str
    purpose: str = "volume"
    length: int = 32
    version: int | None = None


@dataclass(frozen=True, slots=True)
class DatakeyItem:
    length: int = 32
    context: Mapping[str, str] | None = None
    plaintext: bool = True


@dataclass(frozen=True, slots=True)
class EncryptItem:
    plaintext: bytes
    context: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class CiphertextItem:
    ciphertext: str
    context: Mapping[str, str] | None = None


Item = DeriveItem | DatakeyItem | EncryptItem | CiphertextItem
Result = dict[str, Any]


class DataPlane:
    def __init__(
        self,
        keys: KeyService,
        material: KeyMaterial,
        batcher: AuditBatcher,
        tokens: TokenService,
        *,
        randbytes: Callable[[int], bytes] = os.urandom,
        usage: UsageRecorder | None = None,
    ) -> None:
        self._usage = usage
        self._keys = keys
        self._material = material
        self._batcher = batcher
        self._tokens = tokens
        self._rand = randbytes

    async def _resolve(
        self, principal: Principal, meta_: RequestMeta, tenant: str, key: str, op: Operation
    ) -> KeyMeta:
        """The key, if the caller may use it for ``op``; otherwise the same 404 as a missing key."""
        not_found = NotFound(f"key {key!r} of tenant {tenant!r} not found")
        if not principal.may_use(tenant, key, op):
            await self._tokens.record_denial(
                principal.actor, meta_, reason="out_of_scope", tenant=tenant, key=key, operation=op.value
            )
            raise not_found
        meta = await self._keys.get_meta(tenant, key)
        if meta is None:
            await self._audit(principal, meta_, op, tenant, key, None, "failure", {"code": not_found.code})
            raise not_found
        return meta

    @staticmethod
    def _usable(meta: KeyMeta, version: int, *, opaque: bool) -> VersionMeta:
        """The version if it may derive/decrypt now. ``opaque``: unknown versions look like a
        failed decryption (ciphertext paths) rather than a 404."""
        ver = meta.versions.get(version)
        if ver is None:
            if opaque:
                raise DecryptionFailedError()
            raise NotFound(f"version {version} of key {meta.name!r} not found")
        if meta.state is not KeyState.ENABLED:
            raise KeyDisabled(f"key {meta.name!r} is disabled")
        # A destroyed version answers like a disabled one (409 key_version_disabled, its state in
        # the detail): the client learns it is gone for good, not that its ciphertext is bad.
        if ver.state is not VersionState.ENABLED:
            raise KeyVersionDisabled(f"version {version} of key {meta.name!r} is {ver.state.value}")
        if version < meta.min_decryption_version:
            raise KeyVersionBelowMinimum(
                f"version {version} is below min_decryption_version {meta.min_decryption_version}"
            )
        return ver

    def _primary(self, meta: KeyMeta) -> VersionMeta:
        if meta.state is not KeyState.ENABLED:
            raise KeyDisabled(f"key {meta.name!r} is disabled")
        primary = meta.primary_version
        if primary is None:
            raise NoPrimaryVersion(f"key {meta.name!r} has no enabled version")
        return meta.versions[primary]

    async def _audit(
        self,
        principal: Principal,
        meta_: RequestMeta,
        op: Operation,
        tenant: str,
        key: str,
        version: int | None,
        outcome: str,
        details: dict[str, Any],
    ) -> None:
        await self._batcher.record(
            EventDraft(
                action=ACTIONS[op],
                actor=principal.actor,
                outcome=outcome,
                tenant=tenant,
                key=key,
                version=version,
                request_id=meta_.request_id,
                source=meta_.source,
                details=details,
            )
        )

    # -- single operations (pure given meta and S) ----------------------------------------------

    async def _derive(self, meta: KeyMeta, item: DeriveItem) -> Result:
        ver = (
            self._usable(meta, item.version, opaque=False)
            if item.version is not None
            else self._primary(meta)
        )
        secret = await self._material.secret(meta, ver)
        dek = crypto.derive_dek(kek_secret=secret, purpose=item.purpose, dek_id=item.id, length=item.length)
        return {"key": b64(dek), "version": ver.version, "latest_version": meta.primary_version}

    async def _datakey(self, meta: KeyMeta, item: DatakeyItem) -> Result:
        ver = self._primary(meta)
        secret = await self._material.secret(meta, ver)
        dek = self._rand(item.length)
        ct = crypto.seal(
            kek_secret=secret,
            tenant=meta.tenant,
            key=meta.name,
            version=ver.version,
            plaintext=dek,
            context=item.context,
            randbytes=self._rand,
        )
        out: Result = {"ciphertext": ct, "version": ver.version}
        if item.plaintext:
            out["plaintext"] = b64(dek)
        return out

    async def _encrypt(self, meta: KeyMeta, item: EncryptItem) -> Result:
        ver = self._primary(meta)
        secret = await self._material.secret(meta, ver)
        ct = crypto.seal(
            kek_secret=secret,
            tenant=meta.tenant,
            key=meta.name,
            version=ver.version,
            plaintext=item.plaintext,
            context=item.context,
            randbytes=self._rand,
        )
        return {"ciphertext": ct, "version": ver.version}

    async def _open(self, meta: KeyMeta, item: CiphertextItem) -> tuple[bytes, int]:
        try:
            parsed = crypto.parse_ciphertext(item.ciphertext)
        except crypto.DecryptionFailed:
            log.info("decrypt %s/%s: malformed ciphertext", meta.tenant, meta.name)
            raise DecryptionFailedError() from None
        ver = self._usable(meta, parsed.version, opaque=True)
        secret = await self._material.secret(meta, ver)
        try:
            plaintext = crypto.open_ciphertext(
                kek_secret=secret, tenant=meta.tenant, key=meta.name, parsed=parsed, context=item.context
            )
        except crypto.DecryptionFailed:
            log.info("decrypt %s/%s v%d: authentication failed", meta.tenant, meta.name, parsed.version)
            raise DecryptionFailedError() from None
        return plaintext, parsed.version

    async def _decrypt(self, meta: KeyMeta, item: CiphertextItem) -> Result:
        plaintext, version = await self._open(meta, item)
        return {"plaintext": b64(plaintext), "version": version}

    async def _rewrap(self, meta: KeyMeta, item: CiphertextItem) -> Result:
        plaintext, _ = await self._open(meta, item)
        return await self._encrypt(meta, EncryptItem(plaintext=plaintext, context=item.context))

    _HANDLERS: dict[Operation, Callable[[DataPlane, KeyMeta, Any], Awaitable[Result]]] = {
        Operation.DERIVE: _derive,
        Operation.DATAKEY: _datakey,
        Operation.ENCRYPT: _encrypt,
        Operation.DECRYPT: _decrypt,
        Operation.REWRAP: _rewrap,
    }

    # -- entry points ----------------------------------------------------------------------

    async def run(
        self, principal: Principal, meta_: RequestMeta, tenant: str, key: str, op: Operation, item: Item
    ) -> Result:
        meta = await self._resolve(principal, meta_, tenant, key, op)
        try:
            result = await self._HANDLERS[op](self, meta, item)
        except ServiceError as exc:
            await self._audit(
                principal,
                meta_,
                op,
                tenant,
                key,
                getattr(item, "version", None),
                "failure",
                {"code": exc.code, **_item_details(item)},
            )
            raise
        await self._audit(
            principal, meta_, op, tenant, key, result["version"], "success", _item_details(item)
        )
        if isinstance(item, DeriveItem):
            self._note_usage(meta, [(item, result)])
        return result

    def _note_usage(self, meta: KeyMeta, done: list[tuple[DeriveItem, Result]]) -> None:
        """Re-key tracking: buffered in memory, upserted in batches (kms_service.keys.usage)."""
        if self._usage is not None:
            for item, result in done:
                self._usage.record(meta.tenant, meta.name, item.purpose, item.id, result["version"])

    async def run_batch(
        self,
        principal: Principal,
        meta_: RequestMeta,
        tenant: str,
        key: str,
        op: Operation,
        items: list[Item | ServiceError],
    ) -> list[Result]:
        """Each item succeeds or fails on its own; results keep the order. One audit event."""
        meta = await self._resolve(principal, meta_, tenant, key, op)
        results: list[Result] = []
        failed = 0
        versions: set[int] = set()
        derived: list[tuple[DeriveItem, Result]] = []
        for item in items:
            try:
                if isinstance(item, ServiceError):
                    raise item
                result = await self._HANDLERS[op](self, meta, item)
                versions.add(result["version"])
                results.append(result)
                if isinstance(item, DeriveItem):
                    derived.append((item, result))
            except ServiceError as exc:
                failed += 1
                problem = exc.problem()
                results.append({"error": {k: problem[k] for k in ("status", "code", "detail")}})
        details: dict[str, Any] = {"batch": len(items), "failed": failed}
        if op is Operation.DERIVE:
            details["ids"] = [i.id for i in items if isinstance(i, DeriveItem)][:1000]
        version = versions.pop() if len(versions) == 1 else None
        await self._audit(
            principal, meta_, op, tenant, key, version, "success" if not failed else "partial", details
        )
        self._note_usage(meta, derived)
        return results


def _item_details(item: Item) -> dict[str, Any]:
    """What an audit event may say about an item: identifiers, never key material or plaintext."""
    if isinstance(item, DeriveItem):
        return {"id": item.id, "purpose": item.purpose, "length": item.length}
    if isinstance(item, DatakeyItem):
        return {"length": item.length, "context_keys": sorted(item.context or {})}
    if isinstance(item, EncryptItem):
        return {"bytes": len(item.plaintext), "context_keys": sorted(item.context or {})}
    return {"context_keys": sorted(item.context or {})}
