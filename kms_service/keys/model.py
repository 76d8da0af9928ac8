"""Immutable snapshots of a key and its versions, as the data plane sees them (cached)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class VersionState(StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    SCHEDULED_FOR_DESTRUCTION = "scheduled_for_destruction"
    DESTROYED = "destroyed"


class KeyState(StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True, repr=False)
class VersionMeta:
    version: int
    state: VersionState
    version_salt: bytes | None
    wrapped_secret: bytes | None
    created_at: datetime
    destroy_at: datetime | None

    def __repr__(self) -> str:
        return f"VersionMeta(version={self.version}, state={self.state.value})"


@dataclass(frozen=True, slots=True)
class KeyMeta:
    tenant: str
    name: str
    provider_type: str
    provider_config: dict[str, Any]
    provider_secrets: bytes | None = field(repr=False)
    state: KeyState
    min_decryption_version: int
    rotation_period_days: int | None
    next_rotation_at: datetime | None
    created_at: datetime
    versions: dict[int, VersionMeta]

    @property
    def primary_version(self) -> int | None:
        """The newest enabled version at or above min_decryption_version."""
        enabled = [
            v.version
            for v in self.versions.values()
            if v.state is VersionState.ENABLED and v.version >= self.min_decryption_version
        ]
        return max(enabled) if enabled else None

    @property
    def latest_version(self) -> int:
        return max(self.versions) if self.versions else 0
