"""`kms-agent secret seal|unseal`: round trips and tampering, with a live service.

Most cases call kms_agent.sealed in-process (the same code the command runs) to keep the suite
fast; the command itself is run for a round trip and for a tampered file's exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kms_agent import sealed
from kms_client import DecryptionFailed, KmsClient, KmsError
from tests.clients.conftest import Live, agent_env
from tests.clients.luks_helpers import agent, ok

pytestmark = pytest.mark.slow

KEY = "secrets"
CHUNK = 64 * 1024
TAG = 16


@dataclass
class Env:
    live: Live
    tenant: str
    kms: KmsClient
    env: dict[str, str]
    dir: Path
    big: Path  # 5 MiB + 123 bytes of random data
    big_sealed: Path


@pytest.fixture(scope="module")
def env(live: Live, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("sealed")
    tenant = live.tenant("seal", KEY)
    token_file = live.agent_token_file(tenant, d, keys=[KEY], operations=["datakey", "decrypt"])
    big = d / "big.bin"
    big.write_bytes(os.urandom(5 * 1024 * 1024 + 123))
    with KmsClient(live.url, token_file=token_file) as kms:
        big_sealed = d / "big.bin.kms"
        sealed.seal(kms, big, big_sealed, tenant=tenant, key=KEY, chunk_size=CHUNK)
        yield Env(live, tenant, kms, agent_env(live, token_file, d / "locks"), d, big, big_sealed)


def header_len(data: bytes) -> int:
    (n,) = struct.unpack(">I", data[8:12])
    return 12 + int(n)


def body_chunks(data: bytes, chunk: int = CHUNK) -> tuple[bytes, list[bytes]]:
    h = header_len(data)
    body = data[h:]
    size = chunk + TAG
    return data[:h], [body[i : i + size] for i in range(0, len(body), size)]


def no_leftovers(directory: Path, dest: Path) -> None:
    assert not dest.exists(), "no plaintext at the final path"
    assert not [p for p in directory.iterdir() if p.name.endswith(".partial")], "no temp file left behind"


def test_multi_chunk_round_trip_through_the_command(env: Env) -> None:
    out = env.dir / "cli-out.bin"
    src = env.dir / "payload.bin"
    src.write_bytes(env.big.read_bytes()[: 5 * 1024 * 1024])  # exactly 80 full chunks
    ok(
        agent(
            env.env,
            "secret",
            "seal",
            str(src),
            "--tenant",
            env.tenant,
            "--key",
            KEY,
            "--chunk-size",
            str(CHUNK),
        )
    )
    sealed_file = env.dir / "payload.bin.kms"
    data = sealed_file.read_bytes()
    header, chunks = body_chunks(data)
    meta = json.loads(header[12:])
    assert meta["file"] == "payload.bin" and meta["chunk_size"] == CHUNK and meta["tenant"] == env.tenant
    assert meta["format"] == "kms-sealed-file/v1" and meta["ciphertext"].startswith("kms:v")
    assert len(chunks) == 80 and {len(c) for c in chunks} == {CHUNK + TAG}
    assert src.read_bytes()[:4096] not in data
    ok(agent(env.env, "secret", "unseal", str(sealed_file), "-o", str(out)))
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_mode & 0o777 == 0o600
    # An existing output is not overwritten without --force.
    again = agent(env.env, "secret", "unseal", str(sealed_file), "-o", str(out))
    assert again.returncode == 1 and b"exists" in again.stderr


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 5])
def test_round_trip_sizes(env: Env, size: int) -> None:
    src = env.dir / f"small-{size}"
    src.write_bytes(os.urandom(size))
    dest, out = env.dir / f"small-{size}.kms", env.dir / f"small-{size}.out"
    sealed.seal(env.kms, src, dest, tenant=env.tenant, key=KEY, chunk_size=CHUNK)
    sealed.unseal(env.kms, dest, out)
    assert out.read_bytes() == src.read_bytes()


def test_large_round_trip_streams(env: Env) -> None:
    """Sealing and unsealing a 5 MiB file never holds it in memory (peak far below its size)."""
    out = env.dir / "big.out"
    tracemalloc.start()
    try:
        sealed.unseal(env.kms, env.big_sealed, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.read_bytes() == env.big.read_bytes()
    assert peak < 1024 * 1024, f"peak {peak} bytes"
    out.unlink()


def _rewrite_header(data: bytes, **changes: object) -> bytes:
    h = header_len(data)
    meta = json.loads(data[12:h])
    meta.update(changes)
    new = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return data[:8] + struct.pack(">I", len(new)) + new + data[h:]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _swap(data: bytes, i: int, j: int) -> bytes:
    header, chunks = body_chunks(data)
    chunks[i], chunks[j] = chunks[j], chunks[i]
    return header + b"".join(chunks)


def _drop(data: bytes, i: int) -> bytes:
    header, chunks = body_chunks(data)
    del chunks[i]
    return header + b"".join(chunks)


def _truncate_at_chunk(data: bytes) -> bytes:
    header, chunks = body_chunks(data)
    return header + b"".join(chunks[:-1])


def _append_copy(data: bytes) -> bytes:
    header, chunks = body_chunks(data)
    return header + b"".join(chunks) + chunks[-1]


TAMPERING: dict[str, Callable[[bytes], bytes]] = {
    "flip a body byte": lambda d: _flip(d, header_len(d) + 3 * (CHUNK + TAG) + 100),
    "flip a tag byte": lambda d: _flip(d, len(d) - 1),
    "truncate mid-chunk": lambda d: d[: len(d) - 500],
    "truncate at a chunk boundary": _truncate_at_chunk,
    "truncate to the header": lambda d: d[: header_len(d)],
    "swap two chunks": lambda d: _swap(d, 1, 2),
    "drop a chunk": lambda d: _drop(d, 4),
    "append a chunk": _append_copy,
    "edit the header's file name": lambda d: _rewrite_header(d, file="other.bin"),
    "edit the header's nonce prefix": lambda d: _rewrite_header(d, nonce_prefix="AAAAAAAAAAA="),
    "edit the header's chunk size": lambda d: _rewrite_header(d, chunk_size=CHUNK // 2),
    "flip a byte of the magic": lambda d: _flip(d, 0),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampering_is_detected_and_no_plaintext_is_written(env: Env, how: str) -> None:
    slug = how.replace(" ", "-").replace("'", "")
    bad = env.dir / f"tampered-{slug}.kms"
    bad.write_bytes(TAMPERING[how](env.big_sealed.read_bytes()))
    dest = env.dir / f"tampered-{slug}.out"
    with pytest.raises((sealed.SealError, KmsError)):
        sealed.unseal(env.kms, bad, dest)
    no_leftovers(env.dir, dest)


def test_chunks_from_another_sealing_of_the_same_file_do_not_fit(env: Env) -> None:
    other = env.dir / "big-again.kms"
    sealed.seal(env.kms, env.big, other, tenant=env.tenant, key=KEY, chunk_size=CHUNK)
    header_a, chunks_a = body_chunks(env.big_sealed.read_bytes())
    _, chunks_b = body_chunks(other.read_bytes())
    chunks_a[2] = chunks_b[2]
    spliced = env.dir / "spliced.kms"
    spliced.write_bytes(header_a + b"".join(chunks_a))
    dest = env.dir / "spliced.out"
    with pytest.raises(sealed.SealError, match="chunk 2 failed authentication"):
        sealed.unseal(env.kms, spliced, dest)
    no_leftovers(env.dir, dest)


def test_the_file_name_is_the_encryption_context(env: Env) -> None:
    """A sealed file presented as another file (a wrong --name) does not open: the data key is
    bound to the name by the service (context {"file": name})."""
    dest = env.dir / "renamed.out"
    with pytest.raises(DecryptionFailed):
        sealed.unseal(env.kms, env.big_sealed, dest, name="other.bin")
    no_leftovers(env.dir, dest)
    proc = agent(env.env, "secret", "unseal", str(env.big_sealed), "-o", str(dest), "--name", "other.bin")
    assert proc.returncode == 1 and b"decryption_failed" in proc.stderr
    no_leftovers(env.dir, dest)
    # With the right name it opens.
    sealed.unseal(env.kms, env.big_sealed, dest, name="big.bin")
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(env.big.read_bytes()).digest()
    dest.unlink()


def test_a_tampered_file_fails_the_command_without_output(env: Env) -> None:
    bad = env.dir / "cli-tampered.kms"
    bad.write_bytes(_swap(env.big_sealed.read_bytes(), 5, 6))
    dest = env.dir / "cli-tampered.out"
    proc = agent(env.env, "secret", "unseal", str(bad), "-o", str(dest))
    assert proc.returncode == 1 and b"chunk 5 failed authentication" in proc.stderr
    assert b"Traceback" not in proc.stderr
    no_leftovers(env.dir, dest)


def test_the_data_key_is_never_stored_in_clear(env: Env) -> None:
    data = env.big_sealed.read_bytes()
    meta = json.loads(data[12 : header_len(data)])
    key = env.live.admin.decrypt(env.tenant, KEY, meta["ciphertext"], context={"file": "big.bin"}).plaintext
    assert len(key) == 32
    for path in env.dir.iterdir():
        if path.is_file():
            assert key not in path.read_bytes(), path
