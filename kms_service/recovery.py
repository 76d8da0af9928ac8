"""The recovery bundle and offline DEK derivation — the disaster-recovery path.

The bundle holds everything but secrets: cluster salt, key metadata, version salts and wrapped
secrets. With it and M alone (no server, no database) `kms recovery derive` recomputes any DEK of
a local key. The bundle carries an HMAC under a key derived from M, so a bundle altered in
transit is refused rather than silently yielding a wrong key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from kms_service import crypto
from kms_service.db.engine import Database
from kms_service.db.models import Cluster, Key, KeyVersion
from kms_service.master import SecretBytes

BUNDLE_FORMAT = "kms-recovery/v1"


class RecoveryError(Exception):
    """The bundle or the request cannot produce a key; the message says why (never key bytes)."""


def _mac_key(master: SecretBytes, cluster_salt: bytes) -> bytes:
    return crypto.purpose_key(
        master_secret=master.reveal(), cluster_salt=cluster_salt, purpose="recovery-bundle"
    )


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


async def build_bundle(db: Database, master: SecretBytes) -> dict[str, Any]:
    async with db.read() as session:
        cluster = (await session.scalars(select(Cluster))).one()
        keys = (await session.scalars(select(Key).order_by(Key.tenant_id, Key.name))).all()
        versions = (
            await session.scalars(select(KeyVersion).order_by(KeyVersion.key_id, KeyVersion.version))
        ).all()
    by_key: dict[int, list[KeyVersion]] = {}
    for v in versions:
        by_key.setdefault(v.key_id, []).append(v)
    doc: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "cluster_id": cluster.cluster_id,
        "cluster_salt": cluster.cluster_salt.hex(),
        "keys": [
            {
                "tenant": k.tenant_id,
                "name": k.name,
                "provider": k.provider_config,
                "min_decryption_version": k.min_decryption_version,
                "versions": [
                    {
                        "version": v.version,
                        "state": v.state,
                        "version_salt": v.version_salt.hex() if v.version_salt is not None else None,
                        "wrapped_secret": base64.b64encode(v.wrapped_secret).decode()
                        if v.wrapped_secret is not None
                        else None,
                    }
                    for v in by_key.get(k.id, [])
                ],
            }
            for k in keys
        ],
    }
    doc["mac"] = hmac.new(_mac_key(master, cluster.cluster_salt), _canonical(doc), hashlib.sha256).hexdigest()
    return doc


def derive_from_bundle(
    bundle: dict[str, Any],
    master: SecretBytes,
    *,
    tenant: str,
    key: str,
    version: int,
    purpose: str,
    dek_id: str,
    length: int,
) -> tuple[bytes, str]:
    """The DEK, and the version's state (a warning for anything but enabled)."""
    if bundle.get("format") != BUNDLE_FORMAT:
        raise RecoveryError(f"not a {BUNDLE_FORMAT} bundle")
    try:
        cluster_salt = bytes.fromhex(bundle["cluster_salt"])
        claimed_mac = bytes.fromhex(bundle["mac"])
    except (KeyError, ValueError, TypeError):
        raise RecoveryError("the bundle is malformed (cluster_salt/mac)") from None
    if crypto.cluster_id(master_secret=master.reveal(), cluster_salt=cluster_salt) != bundle.get(
        "cluster_id"
    ):
        raise RecoveryError("this master secret does not belong to the bundle's cluster")
    body = {k: v for k, v in bundle.items() if k != "mac"}
    expected = hmac.new(_mac_key(master, cluster_salt), _canonical(body), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, claimed_mac):
        raise RecoveryError("the bundle's MAC does not verify: it was altered or is incomplete")
    entry = next((k for k in bundle["keys"] if k["tenant"] == tenant and k["name"] == key), None)
    if entry is None:
        raise RecoveryError(f"key {key!r} of tenant {tenant!r} is not in the bundle")
    ver = next((v for v in entry["versions"] if v["version"] == version), None)
    if ver is None:
        raise RecoveryError(f"version {version} of key {key!r} is not in the bundle")
    if ver["version_salt"] is not None:
        secret = crypto.derive_local_kek(
            master_secret=master.reveal(),
            version_salt=bytes.fromhex(ver["version_salt"]),
            tenant=tenant,
            key=key,
            version=version,
        )
    elif ver["wrapped_secret"] is not None:
        raise RecoveryError(
            f"version {version} is protected by provider {entry['provider'].get('type')!r}: "
            "unwrap it with that provider; offline derivation covers local keys"
        )
    else:
        raise RecoveryError(f"version {version} was destroyed: its key material no longer exists")
    return crypto.derive_dek(kek_secret=secret, purpose=purpose, dek_id=dek_id, length=length), ver["state"]
