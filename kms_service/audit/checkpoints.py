"""Signed checkpoints of the chain head, kept outside the database (DESIGN §6).

Someone who can rewrite the database but does not hold M cannot forge the chain — but they could
cut its tail and roll the head row back to match. Checkpoints close that gap: every
`every_events` events or `interval` seconds, whichever comes first, each replica signs
{cluster_id, seq, hash, time} with an Ed25519 key derived from M and writes it to a sink outside
the database (a directory by default: put it on storage the database's operators cannot rewrite).
Verification then requires the chain to reach the latest checkpoint with the same hash.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from kms_service import crypto
from kms_service.audit.chain import canonical_json, format_time
from kms_service.audit.writer import Clock, utcnow
from kms_service.db.engine import Database
from kms_service.db.models import AuditHead
from kms_service.master import SecretBytes
from kms_service.periodic import PeriodicTask

log = logging.getLogger(__name__)

FORMAT = "kms-audit-checkpoint/v1"


def signing_key(master: SecretBytes, cluster_salt: bytes) -> Ed25519PrivateKey:
    seed = crypto.purpose_key(
        master_secret=master.reveal(), cluster_salt=cluster_salt, purpose="audit-checkpoint"
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    cluster_id: str
    seq: int
    hash: str
    time: str

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "cluster_id": self.cluster_id,
            "seq": self.seq,
            "hash": self.hash,
            "time": self.time,
        }


def sign(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> dict[str, Any]:
    body = checkpoint.body()
    return body | {"signature": base64.b64encode(key.sign(canonical_json(body))).decode()}


class CheckpointError(Exception):
    """A checkpoint file is malformed, foreign, or its signature does not verify."""


def verify_document(doc: dict[str, Any], public_key: Ed25519PublicKey, cluster_id: str) -> Checkpoint:
    try:
        cp = Checkpoint(
            cluster_id=doc["cluster_id"], seq=int(doc["seq"]), hash=str(doc["hash"]), time=str(doc["time"])
        )
        signature = base64.b64decode(doc["signature"], validate=True)
        if doc.get("format") != FORMAT:
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise CheckpointError("malformed checkpoint") from None
    if cp.cluster_id != cluster_id:
        raise CheckpointError("checkpoint of another cluster")
    try:
        public_key.verify(signature, canonical_json(cp.body()))
    except InvalidSignature:
        raise CheckpointError(f"checkpoint at seq {cp.seq} has an invalid signature") from None
    return cp


class DirectorySink:
    """One JSON file per checkpoint, written atomically; the highest seq is the latest."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, doc: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"checkpoint-{int(doc['seq']):020d}.json"
        if path.exists():
            return path
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".checkpoint-")
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def latest(self) -> dict[str, Any] | None:
        if not self.directory.is_dir():
            return None
        files = sorted(self.directory.glob("checkpoint-*.json"))
        if not files:
            return None
        try:
            doc: dict[str, Any] = json.loads(files[-1].read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"unreadable checkpoint {files[-1].name}") from None
        return doc


class Checkpointer:
    """Writes a checkpoint when `every_events` events or `interval` seconds have passed."""

    def __init__(
        self,
        db: Database,
        sink: DirectorySink,
        key: Ed25519PrivateKey,
        cluster_id: str,
        *,
        every_events: int = 1000,
        interval: float = 60.0,
        poll: float = 1.0,
        clock: Clock = utcnow,
        monotonic: Any = time.monotonic,
    ) -> None:
        self._db = db
        self._sink = sink
        self._key = key
        self._cluster_id = cluster_id
        self._every = every_events
        self._interval = interval
        self._poll = poll
        self._clock = clock
        self._monotonic = monotonic
        self._last_seq = 0
        self._last_at = monotonic()
        self._periodic = PeriodicTask("audit-checkpointer", poll, self.maybe_checkpoint)

    def start(self) -> None:
        latest = self._sink.latest()
        if latest is not None:
            self._last_seq = int(latest.get("seq", 0))
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()

    async def checkpoint_now(self) -> dict[str, Any] | None:
        async with self._db.read() as session:
            head = (
                await session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1))
            ).one_or_none()
        if head is None or head.seq <= 0:
            return None
        cp = Checkpoint(self._cluster_id, int(head.seq), head.hash.hex(), format_time(self._clock()))
        doc = sign(cp, self._key)
        await asyncio.to_thread(self._sink.write, doc)
        self._last_seq, self._last_at = cp.seq, self._monotonic()
        return doc

    async def maybe_checkpoint(self) -> dict[str, Any] | None:
        async with self._db.read() as session:
            seq = await session.scalar(select(AuditHead.seq).where(AuditHead.id == 1))
        if seq is None or seq <= self._last_seq:
            return None
        due = seq - self._last_seq >= self._every or self._monotonic() - self._last_at >= self._interval
        return await self.checkpoint_now() if due else None


def latest_checkpoint(
    sink: DirectorySink, public_key: Ed25519PublicKey, cluster_id: str
) -> Checkpoint | None:
    """The newest checkpoint in the sink, its signature verified (CheckpointError if it fails)."""
    doc = sink.latest()
    return None if doc is None else verify_document(doc, public_key, cluster_id)
