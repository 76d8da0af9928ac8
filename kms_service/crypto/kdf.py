"""HKDF-SHA256 derivations of the key hierarchy (DESIGN §2, normative)."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kms_service.crypto.encoding import enc

DOMAIN = "kms/v1"
SECRET_LEN = 32
SALT_LEN = 32
MIN_DEK_LEN = 16
MAX_DEK_LEN = 64


def hkdf_sha256(*, ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA256. ``salt=None`` (or empty) means 32 zero bytes, the RFC default."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


def cluster_id(*, master_secret: bytes, cluster_salt: bytes) -> str:
    """The installation's public identifier: 16 bytes of HKDF output, lowercase hex."""
    return hkdf_sha256(ikm=master_secret, salt=cluster_salt, info=enc(DOMAIN, "cluster-id"), length=16).hex()


def audit_key(*, master_secret: bytes, cluster_salt: bytes) -> bytes:
    """The HMAC key of the audit chain."""
    return purpose_key(master_secret=master_secret, cluster_salt=cluster_salt, purpose="audit-hmac")


def purpose_key(*, master_secret: bytes, cluster_salt: bytes, purpose: str) -> bytes:
    """A 32-byte installation-wide key for one named purpose, e.g. ``audit-hmac``."""
    return hkdf_sha256(ikm=master_secret, salt=cluster_salt, info=enc(DOMAIN, purpose), length=SECRET_LEN)


def derive_local_kek(
    *, master_secret: bytes, version_salt: bytes, tenant: str, key: str, version: int
) -> bytes:
    """S(t, k, v) of a key version protected by the ``local`` provider."""
    if len(version_salt) != SALT_LEN:
        raise ValueError("version salt must be 32 bytes")
    return hkdf_sha256(
        ikm=master_secret,
        salt=version_salt,
        info=enc(DOMAIN, "kek", tenant, key, version),
        length=SECRET_LEN,
    )


def derive_dek(*, kek_secret: bytes, purpose: str, dek_id: str, length: int) -> bytes:
    """The deterministic DEK for (purpose, id) under one key version's secret S."""
    if not MIN_DEK_LEN <= length <= MAX_DEK_LEN:
        raise ValueError("DEK length must be 16..64 bytes")
    return hkdf_sha256(ikm=kek_secret, salt=None, info=enc(DOMAIN, "dek", purpose, dek_id), length=length)


def message_key(*, kek_secret: bytes, r: bytes) -> bytes:
    """The per-ciphertext AES-256-GCM key, salted with the ciphertext's random ``r``."""
    return hkdf_sha256(ikm=kek_secret, salt=r, info=enc(DOMAIN, "msg"), length=SECRET_LEN)
