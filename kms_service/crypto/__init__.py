"""Pure key-hierarchy primitives of DESIGN §2 (normative). No I/O, no framework, no state.

Everything here is bytes in, bytes out; randomness is injectable so known-answer tests work.
"""

from kms_service.crypto.ciphertext import (
    CIPHERTEXT_PREFIX,
    DecryptionFailed,
    ParsedCiphertext,
    canonical_context,
    open_ciphertext,
    parse_ciphertext,
    seal,
)
from kms_service.crypto.encoding import enc
from kms_service.crypto.kdf import (
    audit_key,
    cluster_id,
    derive_dek,
    derive_local_kek,
    hkdf_sha256,
    message_key,
    purpose_key,
)

__all__ = [
    "CIPHERTEXT_PREFIX",
    "DecryptionFailed",
    "ParsedCiphertext",
    "audit_key",
    "canonical_context",
    "cluster_id",
    "derive_dek",
    "derive_local_kek",
    "enc",
    "hkdf_sha256",
    "message_key",
    "open_ciphertext",
    "parse_ciphertext",
    "purpose_key",
    "seal",
]
