"""Verification of the chain: every link, gapless seqs from 1, and the head row."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from kms_service.audit.chain import GENESIS_HASH, link_hash
from kms_service.audit.checkpoints import Checkpoint, CheckpointError, DirectorySink, latest_checkpoint
from kms_service.audit.query import row_document
from kms_service.db.engine import Database
from kms_service.db.models import AuditEvent, AuditHead

CHUNK = 5000


@dataclass(frozen=True, slots=True)
class VerifyResult:
    valid: bool
    checked: int
    head_seq: int
    head_hash: str
    first_invalid_seq: int | None
    reason: str | None = None
    checkpoint_seq: int | None = None


async def _read_head(db: Database) -> tuple[int, bytes]:
    async with db.read() as session:
        head = (
            await session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1))
        ).one_or_none()
    return (head.seq, head.hash) if head is not None else (0, GENESIS_HASH)


async def verify_with_checkpoint(
    db: Database, *, audit_key: bytes, sink: DirectorySink, public_key: Ed25519PublicKey, cluster_id: str
) -> VerifyResult:
    """Verify the chain against the latest signed checkpoint in ``sink`` (if any)."""
    try:
        checkpoint = latest_checkpoint(sink, public_key, cluster_id)
    except CheckpointError as exc:
        head_seq, head_hash = await _read_head(db)
        return VerifyResult(False, 0, head_seq, head_hash.hex(), None, f"checkpoint: {exc}")
    result = await verify_chain(db, audit_key=audit_key, checkpoint=checkpoint)
    return replace(result, checkpoint_seq=checkpoint.seq if checkpoint else None)


async def verify_chain(
    db: Database, *, audit_key: bytes, checkpoint: Checkpoint | None = None
) -> VerifyResult:
    """Walk the whole chain in seq order. The first bad seq is the first one whose row is
    missing, altered, out of place, or beyond the recorded head. With a (signature-checked)
    ``checkpoint``, the chain must also reach the checkpoint's seq with the checkpoint's hash:
    that detects a cut tail even when the head row was rolled back with it."""
    head_seq, head_hash = await _read_head(db)
    checkpoint_hash = bytes.fromhex(checkpoint.hash) if checkpoint is not None else None

    expected_seq = 1
    prev = GENESIS_HASH
    checked = 0

    def fail(seq: int, reason: str) -> VerifyResult:
        return VerifyResult(False, checked, head_seq, head_hash.hex(), seq, reason)

    after = 0
    while True:
        async with db.read() as session:
            rows = (
                await session.scalars(
                    select(AuditEvent).where(AuditEvent.seq > after).order_by(AuditEvent.seq).limit(CHUNK)
                )
            ).all()
        if not rows:
            break
        for row in rows:
            if row.seq != expected_seq:
                return fail(expected_seq, "missing event")
            if row.seq > head_seq:
                # The service may have appended since the head was read: re-read it once.
                head_seq, head_hash = await _read_head(db)
                if row.seq > head_seq:
                    return fail(row.seq, "event beyond the recorded head")
            if not hmac.compare_digest(row.prev_hash, prev):
                return fail(row.seq, "prev_hash does not link to the previous event")
            digest = link_hash(audit_key=audit_key, prev_hash=prev, document=row_document(row))
            if not hmac.compare_digest(digest, row.hash):
                return fail(row.seq, "hash does not match the event")
            if checkpoint is not None and row.seq == checkpoint.seq and checkpoint_hash != row.hash:
                return fail(row.seq, "the event differs from the signed checkpoint")
            prev = row.hash
            checked += 1
            expected_seq += 1
        after = rows[-1].seq
    if checked < head_seq:
        return fail(expected_seq, "events missing at the tail (truncated)")
    if checkpoint is not None and checked < checkpoint.seq:
        return fail(
            expected_seq, f"events missing at the tail: the signed checkpoint is at seq {checkpoint.seq}"
        )
    if not hmac.compare_digest(prev, head_hash):
        return fail(head_seq, "head hash does not match the last event")
    return VerifyResult(True, checked, head_seq, head_hash.hex(), None)
