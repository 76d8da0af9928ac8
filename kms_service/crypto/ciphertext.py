"""The ciphertext format `kms:v<version>:<base64url(r || nonce || ct || tag)>` (DESIGN §2, normative)."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_service.crypto.encoding import enc
from kms_service.crypto.kdf import DOMAIN, message_key

CIPHERTEXT_PREFIX = "kms:v"
R_LEN = 16
NONCE_LEN = 12
TAG_LEN = 16
_TEXT_RE = re.compile(r"kms:v([1-9][0-9]{0,9}):([A-Za-z0-9_-]+)")


class DecryptionFailed(Exception):
    """A ciphertext could not be opened. Deliberately says nothing about why."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


@dataclass(frozen=True, slots=True)
class ParsedCiphertext:
    version: int
    r: bytes
    nonce: bytes
    sealed: bytes  # ct || tag


def canonical_context(context: Mapping[str, str] | None) -> str:
    """The caller's encryption context as bound into the AAD: sorted keys, `,` `:`, UTF-8.

    ``None`` and ``{}`` are the same context (``"{}"``).
    """
    return json.dumps(dict(context or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _aad(*, tenant: str, key: str, version: int, context: Mapping[str, str] | None) -> bytes:
    return enc(DOMAIN, "aad", tenant, key, version, canonical_context(context))


def seal(
    *,
    kek_secret: bytes,
    tenant: str,
    key: str,
    version: int,
    plaintext: bytes,
    context: Mapping[str, str] | None = None,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> str:
    """Encrypt ``plaintext`` under version ``version``'s secret; returns the text form."""
    r = randbytes(R_LEN)
    nonce = randbytes(NONCE_LEN)
    aead = AESGCM(message_key(kek_secret=kek_secret, r=r))
    sealed = aead.encrypt(nonce, plaintext, _aad(tenant=tenant, key=key, version=version, context=context))
    body = base64.urlsafe_b64encode(r + nonce + sealed).rstrip(b"=").decode("ascii")
    return f"{CIPHERTEXT_PREFIX}{version}:{body}"


def parse_ciphertext(text: str) -> ParsedCiphertext:
    """Split the text form; raises :class:`DecryptionFailed` for anything malformed."""
    match = _TEXT_RE.fullmatch(text)
    if match is None:
        raise DecryptionFailed()
    body = match.group(2)
    if len(body) % 4 == 1:
        raise DecryptionFailed()
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise DecryptionFailed() from None
    if len(raw) < R_LEN + NONCE_LEN + TAG_LEN:
        raise DecryptionFailed()
    # One ciphertext, one text form: refuse non-canonical encodings (stray bits in the last char).
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != body:
        raise DecryptionFailed()
    return ParsedCiphertext(
        version=int(match.group(1)),
        r=raw[:R_LEN],
        nonce=raw[R_LEN : R_LEN + NONCE_LEN],
        sealed=raw[R_LEN + NONCE_LEN :],
    )


def open_ciphertext(
    *,
    kek_secret: bytes,
    tenant: str,
    key: str,
    parsed: ParsedCiphertext,
    context: Mapping[str, str] | None = None,
) -> bytes:
    """Authenticate and decrypt; raises :class:`DecryptionFailed` on any mismatch."""
    aead = AESGCM(message_key(kek_secret=kek_secret, r=parsed.r))
    aad = _aad(tenant=tenant, key=key, version=parsed.version, context=context)
    try:
        return aead.decrypt(parsed.nonce, parsed.sealed, aad)
    except InvalidTag:
        raise DecryptionFailed() from None
