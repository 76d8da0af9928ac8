"""Process settings from `KMS_*` environment variables (and an optional env file).

Validated once at start: a bad value stops the process with a message naming the variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(Exception):
    """Settings could not be loaded; the message names every bad variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KMS_", extra="ignore", frozen=True)

    data_dir: Path = Path(".kms")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; default SQLite at <data_dir>/kms.db. "
        "PostgreSQL: postgresql+asyncpg://user@host/db",
    )
    database_url_file: Path | None = Field(
        default=None,
        description="A file holding KMS_DATABASE_URL (keeps the password out of the environment)",
    )
    listen: str = "127.0.0.1:8400"
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    log_level: str = "info"
    master_secret_file: Path | None = Field(default=None, description="Default <data_dir>/master.key")

    # Caches on the data plane (bounded staleness; see docs/ARCHITECTURE.md).
    kek_cache_ttl_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0
    kek_cache_max_entries: Annotated[int, Field(ge=1)] = 100_000
    metadata_cache_max_age_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    change_poll_interval_seconds: Annotated[float, Field(gt=0, le=2)] = 0.5
    token_cache_max_entries: Annotated[int, Field(ge=1)] = 100_000

    # Calls to key providers (after the provider's own connect/read timeout).
    provider_retry_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    provider_deadline_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0
    provider_breaker_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    provider_breaker_reset_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0

    # PKCS#11 modules a key's provider config may load (absolute paths). Loading a module runs its
    # code in this process, so only modules the operator installed and listed here are accepted.
    pkcs11_allowed_modules: list[str] = Field(default_factory=list)

    # Customer onboarding: the ARN of the IAM role or user this service calls AWS as. Customers
    # allow it to assume their role (with the tenant's ExternalId).
    aws_service_principal_arn: str | None = None

    # Request limits.
    max_body_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 1024 * 1024
    max_batch_items: Annotated[int, Field(ge=1, le=10_000)] = 1000

    # Audit group commit.
    audit_batch_max_events: Annotated[int, Field(ge=1, le=10_000)] = 500

    # Signed checkpoints of the audit chain head, outside the database.
    audit_checkpoint_dir: Path | None = Field(
        default=None, description="Default <data_dir>/audit-checkpoints"
    )
    audit_checkpoint_every_events: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    audit_checkpoint_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0

    # Background jobs: automatic rotation and due destructions (every replica; rows are claimed
    # with SKIP LOCKED), and the re-key tracker's batched upserts of DEK usage.
    scheduler_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0
    usage_flush_interval_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    usage_flush_max_items: Annotated[int, Field(ge=1, le=100_000)] = 1000

    # TLS on `kms serve` (both files or neither; TLS 1.2 minimum) and optional client certificates.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    tls_client_cert: Literal["none", "optional", "required"] = "none"
    # Agents bound to a client certificate instead of a bearer token (JSON or TOML list).
    cert_principals_file: Path | None = None
    # Agents presenting a Kubernetes projected service-account token (a JWT) as the bearer.
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_jwks_url: str | None = None
    jwt_jwks_file: Path | None = None
    jwt_subjects_file: Path | None = None

    db_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    db_timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8400")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "must start with sqlite+aiosqlite:// or postgresql+asyncpg:// "
                "(e.g. postgresql+asyncpg://kms@db:5432/kms)"
            )
        return value

    @model_validator(mode="after")
    def _read_database_url_file(self) -> Settings:
        if self.database_url_file is not None:
            if self.database_url is not None:
                raise ValueError("set KMS_DATABASE_URL or KMS_DATABASE_URL_FILE, not both")
            try:
                url = self.database_url_file.read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"KMS_DATABASE_URL_FILE: cannot read {self.database_url_file}: {exc.strerror}"
                ) from None
            try:
                checked = self._check_database_url(url)
            except ValueError as exc:
                raise ValueError(f"KMS_DATABASE_URL_FILE: {exc}") from None
            object.__setattr__(self, "database_url", checked)
        return self

    @model_validator(mode="after")
    def _check_tls_and_identities(self) -> Settings:
        from kms_service.identity_settings import check_identity_settings

        check_identity_settings(self)
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{(self.data_dir / 'kms.db').resolve()}"

    @property
    def resolved_master_secret_file(self) -> Path:
        return self.master_secret_file or self.data_dir / "master.key"

    @property
    def resolved_audit_checkpoint_dir(self) -> Path:
        return self.audit_checkpoint_dir or self.data_dir / "audit-checkpoints"

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def load_settings(**overrides: Any) -> Settings:
    """Load settings from the environment (and ``KMS_ENV_FILE`` if set), or raise SettingsError."""
    env_file = os.environ.get("KMS_ENV_FILE")
    try:
        return Settings(_env_file=env_file, **overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if err["loc"]:
                lines.append(f"  KMS_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}")
            else:
                lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
