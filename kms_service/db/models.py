"""Database models. Every change here needs an Alembic revision (tests fail on drift)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on SQLite (naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), bytes: LargeBinary()}


class Cluster(Base):
    """The installation: one row. The cluster salt is public (it is in the recovery bundle)."""

    __tablename__ = "cluster"
    __table_args__ = (CheckConstraint("id = 1", name="singleton"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    cluster_salt: Mapped[bytes]
    cluster_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime]


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]


class Key(Base):
    __tablename__ = "keys"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", name="uq_keys_tenant_id_name"),
        CheckConstraint("min_decryption_version >= 1", name="min_decryption_version_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    provider_type: Mapped[str] = mapped_column(String(32))
    provider_config: Mapped[dict[str, Any]]
    provider_secrets: Mapped[bytes | None]
    state: Mapped[str] = mapped_column(String(16))
    min_decryption_version: Mapped[int] = mapped_column(Integer)
    rotation_period_days: Mapped[int | None] = mapped_column(Integer)
    next_rotation_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class KeyVersion(Base):
    """One version of a tenant key. Exactly one of version_salt (local) and wrapped_secret
    (other providers) is set until the version is destroyed; then both are NULL."""

    __tablename__ = "key_versions"
    __table_args__ = (CheckConstraint("version >= 1", name="version_positive"),)

    key_id: Mapped[int] = mapped_column(ForeignKey("keys.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(32))
    version_salt: Mapped[bytes | None]
    wrapped_secret: Mapped[bytes | None]
    created_at: Mapped[datetime]
    state_changed_at: Mapped[datetime]
    destroy_at: Mapped[datetime | None]
    destroyed_at: Mapped[datetime | None]


class Token(Base):
    """An API token. Only the SHA-256 of the token is stored; the token is shown once."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"))
    keys: Mapped[list[str] | None] = mapped_column(JSON)
    operations: Mapped[list[str] | None] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(String(200))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class AuditEvent(Base):
    """The tamper-evident chain (DESIGN §6). Append-only; seq is gapless from 1."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_tenant_seq", "tenant", "seq"),
        Index("ix_audit_events_action_seq", "action", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[datetime]
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str | None] = mapped_column(String(63))
    key: Mapped[str | None] = mapped_column(String(63))
    version: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]]
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditHead(Base):
    """The chain head: locked FOR UPDATE by every append, which serialises appends across
    replicas and makes `seq` commit-ordered."""

    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="singleton"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class ConfigChange(Base):
    """Change feed for cache invalidation across replicas. `seq` is the audit seq of the change,
    assigned under the audit head lock, so a reader that sees seq N has seen every seq < N."""

    __tablename__ = "config_changes"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str | None] = mapped_column(String(63))
    key: Mapped[str | None] = mapped_column(String(63))
    token_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime]
