"""Envelope-encrypted files: ``kms-agent secret seal|unseal``.

Sealing asks the service for a fresh data key (``POST datakey`` with context
``{"file": <basename>}``) and encrypts the file with it in chunks; only the wrapped data key is
stored. Unsealing unwraps it (``POST decrypt``, same context) and checks every chunk.

File format (``kms-sealed-file/v1``)::

    magic      8 bytes   b"KMSSEAL1"
    hlen       4 bytes   big-endian length of the header
    header     hlen      JSON, UTF-8: {"format", "tenant", "key", "key_version", "ciphertext"
                         (the wrapped data key), "file", "chunk_size", "nonce_prefix" (base64, 8 bytes)}
    chunk 0..n           AES-256-GCM(plaintext chunk) ‖ tag; every chunk holds chunk_size
                         plaintext bytes except the last, which holds 1..chunk_size (0 only
                         for an empty file, which is one empty final chunk)

For chunk ``i`` (``final`` = 1 for the last chunk, else 0)::

    nonce = nonce_prefix ‖ uint32_be(i)
    AAD   = b"kms-sealed-file/v1" ‖ SHA-256(magic ‖ hlen ‖ header) ‖ uint64_be(i) ‖ uint8(final)

so a modified header (its hash), a flipped byte, reordered or swapped chunks (index), chunks from
another file (header hash, key), a truncation at a chunk boundary or an appended chunk (final
flag) all fail authentication. The data key is fresh per file and the nonce prefix random, so
(key, nonce) pairs never repeat.

Both directions stream (one chunk in memory) and write a temporary file next to the output,
renamed into place only when everything verified: a failed unseal leaves no plaintext behind.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_client import KmsClient

MAGIC = b"KMSSEAL1"
FORMAT = "kms-sealed-file/v1"
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_HEADER = 64 * 1024
TAG = 16
NONCE_PREFIX = 8
MAX_CHUNKS = 2**32


class SealError(Exception):
    """The sealed file is malformed or failed authentication (or the output cannot be written)."""


@dataclass(frozen=True, slots=True)
class Header:
    tenant: str
    key: str
    key_version: int
    ciphertext: str
    file: str
    chunk_size: int
    nonce_prefix: bytes

    def encode(self) -> bytes:
        body = {
            "format": FORMAT,
            "tenant": self.tenant,
            "key": self.key,
            "key_version": self.key_version,
            "ciphertext": self.ciphertext,
            "file": self.file,
            "chunk_size": self.chunk_size,
            "nonce_prefix": base64.b64encode(self.nonce_prefix).decode("ascii"),
        }
        data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        return MAGIC + struct.pack(">I", len(data)) + data

    @classmethod
    def read(cls, f: IO[bytes]) -> tuple[Header, bytes]:
        """The header and SHA-256 of its encoded bytes."""
        prefix = f.read(len(MAGIC) + 4)
        if len(prefix) != len(MAGIC) + 4 or prefix[: len(MAGIC)] != MAGIC:
            raise SealError("not a kms sealed file")
        (length,) = struct.unpack(">I", prefix[len(MAGIC) :])
        if length > MAX_HEADER:
            raise SealError("sealed file header too large")
        data = f.read(length)
        if len(data) != length:
            raise SealError("sealed file truncated in its header")
        try:
            raw = json.loads(data)
        except ValueError:
            raise SealError("sealed file header is not JSON") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise SealError(
                f"unsupported sealed file format {raw.get('format') if isinstance(raw, dict) else None!r}"
            )
        try:
            header = cls(
                tenant=_str(raw, "tenant"),
                key=_str(raw, "key"),
                key_version=_int(raw, "key_version"),
                ciphertext=_str(raw, "ciphertext"),
                file=_str(raw, "file"),
                chunk_size=_int(raw, "chunk_size"),
                nonce_prefix=base64.b64decode(_str(raw, "nonce_prefix"), validate=True),
            )
        except (binascii.Error, ValueError):
            raise SealError("sealed file header: nonce_prefix is not base64") from None
        if not 1 <= header.chunk_size <= MAX_CHUNK_SIZE or len(header.nonce_prefix) != NONCE_PREFIX:
            raise SealError("sealed file header: bad chunk_size or nonce_prefix")
        return header, hashlib.sha256(prefix + data).digest()


def _str(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise SealError(f"sealed file header: {name!r} missing")
    return value


def _int(raw: dict[str, Any], name: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SealError(f"sealed file header: {name!r} missing")
    return value


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _aad(header_hash: bytes, index: int, final: bool) -> bytes:
    return FORMAT.encode() + header_hash + struct.pack(">QB", index, 1 if final else 0)


def _chunks(f: IO[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """(chunk, is_last) with one chunk of look-ahead; always yields at least one chunk."""
    current = _read_full(f, size)
    while True:
        following = _read_full(f, size) if len(current) == size else b""
        last = not following
        yield current, last
        if last:
            return
        current = following


def _read_full(f: IO[bytes], size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        block = f.read(size - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _write_atomically(dest: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file (0600) in ``dest``'s directory, fsync, rename; on any
    failure remove the temporary file and leave ``dest`` untouched."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def seal(
    kms: KmsClient,
    src: Path,
    dest: Path,
    *,
    tenant: str,
    key: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
) -> Header:
    """Seal ``src`` into ``dest`` under a fresh data key of ``tenant``/``key``."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise SealError(f"chunk size must be 1..{MAX_CHUNK_SIZE}")
    if dest.exists() and not overwrite:
        raise SealError(f"{dest} exists (use --force to replace it)")
    name = src.name
    with open(src, "rb") as f:
        dk = kms.datakey(tenant, key, length=32, context={"file": name}, plaintext=True)
        if dk.plaintext is None or len(dk.plaintext) != 32:
            raise SealError("the service returned no usable data key")
        header = Header(
            tenant=tenant,
            key=key,
            key_version=dk.version,
            ciphertext=dk.ciphertext,
            file=name,
            chunk_size=chunk_size,
            nonce_prefix=os.urandom(NONCE_PREFIX),
        )
        encoded = header.encode()
        header_hash = hashlib.sha256(encoded).digest()
        aead = AESGCM(dk.plaintext)

        def write(out: IO[bytes]) -> None:
            out.write(encoded)
            for index, (chunk, last) in enumerate(_chunks(f, chunk_size)):
                if index >= MAX_CHUNKS:
                    raise SealError("file too large for its chunk size")
                nonce = _nonce(header.nonce_prefix, index)
                out.write(aead.encrypt(nonce, chunk, _aad(header_hash, index, last)))

        _write_atomically(dest, write)
    return header


def unseal(
    kms: KmsClient,
    src: Path,
    dest: Path,
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> Header:
    """Open ``src`` into ``dest``. ``name``: the file name the caller expects (the encryption
    context); default the one in the header. Nothing is written to ``dest`` unless every chunk
    verified."""
    if dest.exists() and not overwrite:
        raise SealError(f"{dest} exists (use --force to replace it)")
    with open(src, "rb") as f:
        header, header_hash = Header.read(f)
        opened = kms.decrypt(
            header.tenant, header.key, header.ciphertext, context={"file": name or header.file}
        )
        if len(opened.plaintext) != 32:
            raise SealError("the wrapped data key has the wrong length")
        aead = AESGCM(opened.plaintext)
        record = header.chunk_size + TAG

        def write(out: IO[bytes]) -> None:
            for index, (chunk, last) in enumerate(_chunks(f, record)):
                if len(chunk) < TAG or index >= MAX_CHUNKS:
                    raise SealError(f"sealed file truncated (chunk {index})")
                try:
                    plain = aead.decrypt(
                        _nonce(header.nonce_prefix, index), chunk, _aad(header_hash, index, last)
                    )
                except InvalidTag:
                    raise SealError(
                        f"chunk {index} failed authentication (tampered or truncated file)"
                    ) from None
                out.write(plain)

        _write_atomically(dest, write)
    return header
