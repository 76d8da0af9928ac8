"""Pure functions of the chain: canonical event JSON and the HMAC link. No I/O."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = bytes(32)


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Actor:
    type: str  # admin | agent | system
    id: str


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event before it gets its place (seq, time, prev_hash) in the chain."""

    action: str
    actor: Actor
    outcome: str = "success"
    tenant: str | None = None
    key: str | None = None
    version: int | None = None
    request_id: str | None = None
    source: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


def event_document(
    *,
    seq: int,
    time: datetime,
    actor_type: str,
    actor_id: str,
    action: str,
    tenant: str | None,
    key: str | None,
    version: int | None,
    outcome: str,
    request_id: str | None,
    source: str | None,
    details: Mapping[str, Any],
    prev_hash: bytes,
) -> dict[str, Any]:
    """The event as hashed and as exported: everything but its own hash."""
    return {
        "seq": seq,
        "time": format_time(time),
        "actor": {"type": actor_type, "id": actor_id},
        "action": action,
        "tenant": tenant,
        "key": key,
        "version": version,
        "outcome": outcome,
        "request_id": request_id,
        "source": source,
        "details": dict(details),
        "prev_hash": prev_hash.hex(),
    }


def canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def link_hash(*, audit_key: bytes, prev_hash: bytes, document: Mapping[str, Any]) -> bytes:
    """hash = HMAC-SHA256(audit key, prev_hash || canonical JSON of the event without hash)."""
    return hmac.new(audit_key, prev_hash + canonical_json(document), hashlib.sha256).digest()
