"""Settings are validated at start with a message naming each bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms_service.settings import SettingsError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KMS_DATA_DIR", "KMS_DATABASE_URL", "KMS_LISTEN", "KMS_ENV_FILE", "KMS_DATABASE_URL_FILE"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert s.listen == "127.0.0.1:8400"
    assert s.data_dir == Path(".kms")
    assert s.resolved_database_url.startswith("sqlite+aiosqlite:///")
    assert s.resolved_database_url.endswith("/.kms/kms.db")
    assert s.kek_cache_ttl_seconds == 300


def test_every_bad_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_LISTEN", "8400")
    monkeypatch.setenv("KMS_WORKERS", "0")
    monkeypatch.setenv("KMS_DATABASE_URL", "mysql://db")
    monkeypatch.setenv("KMS_KEK_CACHE_TTL_SECONDS", "-1")
    with pytest.raises(SettingsError) as err:
        load_settings()
    text = str(err.value)
    for name in ("KMS_LISTEN", "KMS_WORKERS", "KMS_DATABASE_URL", "KMS_KEK_CACHE_TTL_SECONDS"):
        assert name in text


def test_database_url_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KMS_DATABASE_URL", raising=False)
    f = tmp_path / "url"
    f.write_text("postgresql+asyncpg://kms:pw@db:5432/kms\n")
    monkeypatch.setenv("KMS_DATABASE_URL_FILE", str(f))
    assert load_settings().resolved_database_url == "postgresql+asyncpg://kms:pw@db:5432/kms"
    f.write_text("mysql://x")
    with pytest.raises(SettingsError, match="KMS_DATABASE_URL_FILE"):
        load_settings()
    monkeypatch.setenv("KMS_DATABASE_URL", "sqlite+aiosqlite:///x.db")
    with pytest.raises(SettingsError, match="not both"):
        load_settings()


def test_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = tmp_path / "kms.env"
    env.write_text("KMS_LISTEN=0.0.0.0:9000\n")
    monkeypatch.delenv("KMS_LISTEN", raising=False)
    monkeypatch.setenv("KMS_ENV_FILE", str(env))
    assert load_settings().port == 9000
