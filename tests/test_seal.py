"""The sealed master secret: M wrapped by a provider, unsealed at start, never on disk in clear."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import providers.registry
from kms_service.app import StartupError, build_services
from kms_service.install import initialise
from kms_service.seal import sealed_path
from kms_service.settings import Settings
from tests.credential_provider import EXPECTED_TOKEN, Switch

SEAL = {"type": "test-credential", "account": "seal", "api_token": EXPECTED_TOKEN}


@pytest.fixture(autouse=True)
def test_providers() -> Iterator[None]:
    providers.registry._CONFIGS["test-credential"] = "tests.credential_provider:CredentialProviderConfig"
    providers.registry._CONFIGS["test-flaky"] = "tests.credential_provider:FlakyProviderConfig"
    Switch.down = False
    yield
    Switch.down = False
    del providers.registry._CONFIGS["test-credential"]
    del providers.registry._CONFIGS["test-flaky"]


async def test_init_seals_and_serve_unseals(settings: Settings) -> None:
    result = await initialise(settings, seal_config=SEAL)
    assert result.created_master
    assert not settings.resolved_master_secret_file.exists()
    path = sealed_path(settings)
    assert path.stat().st_mode & 0o777 == 0o600
    services = await build_services(settings)
    try:
        assert services.installation.cluster_id == result.cluster_id
        m = services.installation.master.reveal()
        assert m.hex() not in path.read_text()
    finally:
        await services.db.dispose()
    again = await initialise(settings, seal_config=SEAL)  # idempotent: never replaces M
    assert not again.created_master
    assert again.cluster_id == result.cluster_id


async def test_secrets_of_the_seal_config_may_come_from_the_environment(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMS_SEAL_SECRETS", json.dumps({"api_token": EXPECTED_TOKEN}))
    public = {k: v for k, v in SEAL.items() if k != "api_token"}
    await initialise(settings, seal_config=public)
    assert EXPECTED_TOKEN not in sealed_path(settings).read_text()
    services = await build_services(settings)
    await services.db.dispose()
    monkeypatch.delenv("KMS_SEAL_SECRETS")
    with pytest.raises(StartupError, match="api_token"):
        await build_services(settings)


async def test_unreachable_seal_provider_is_a_clear_start_error(settings: Settings) -> None:
    await initialise(settings, seal_config={"type": "test-flaky", "timeout_seconds": 1})
    Switch.down = True
    with pytest.raises(StartupError, match="seal provider 'test-flaky'"):
        await build_services(settings)


async def test_refusing_seal_provider_is_a_clear_init_error(settings: Settings) -> None:
    with pytest.raises(Exception, match="refused"):
        await initialise(settings, seal_config={**SEAL, "api_token": "wrong"})
    assert not sealed_path(settings).exists()


async def test_local_provider_cannot_seal(settings: Settings) -> None:
    with pytest.raises(Exception, match="cannot seal"):
        await initialise(settings, seal_config={"type": "local"})


async def test_seal_secrets_from_a_file(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets_file = tmp_path / "seal-secrets.json"
    secrets_file.write_text(json.dumps({"api_token": EXPECTED_TOKEN}))
    monkeypatch.setenv("KMS_SEAL_SECRETS_FILE", str(secrets_file))
    await initialise(settings, seal_config={k: v for k, v in SEAL.items() if k != "api_token"})
    services = await build_services(settings)
    await services.db.dispose()
    monkeypatch.setenv("KMS_SEAL_SECRETS_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(StartupError, match="KMS_SEAL_SECRETS_FILE"):
        await build_services(settings)
