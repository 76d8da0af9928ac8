"""`azure-keyvault` against an HTTPS fake speaking the Key Vault REST API (tests/providers/fakes).

One fake (vault + Entra ID token endpoint, own CA) per test session on https://127.0.0.1:<free
port>; each test gets a fresh RSA key in it and authenticates as a real service principal would,
with ClientSecretCredential against the fake's token endpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from providers.azure_keyvault import AzureKeyVaultConfig
from providers.base import ProviderKeyDisabled
from tests.conftest import peer_missing
from tests.providers.conftest import Peer

if TYPE_CHECKING:
    from tests.providers.fakes.azure_keyvault import FakeKeyVault, Principal

TIMEOUT_SECONDS = 2.0


@pytest.fixture(scope="session", name="azure_keyvault_fake")
def fixture_azure_keyvault_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKeyVault]:
    try:
        import azure.identity.aio
        import azure.keyvault.keys.aio  # noqa: F401
    except ImportError as exc:  # the azure extra is not installed
        peer_missing(f"azure-keyvault peer needs azure-keyvault-keys and azure-identity: {exc.name} missing")
    from tests.providers.fakes.azure_keyvault import FakeKeyVault

    directory: Path = tmp_path_factory.mktemp("azure-keyvault")
    with FakeKeyVault(directory) as fake:
        yield fake


def azure_keyvault_config(
    fake: FakeKeyVault, key_name: str, *, principal: Principal | None = None, **overrides: object
) -> AzureKeyVaultConfig:
    """A config for ``key_name`` in the fake, as the API would receive it (plain JSON values)."""
    principal = principal or fake.principal
    fields: dict[str, object] = {
        "type": "azure-keyvault",
        "vault_url": fake.url,
        "key_name": key_name,
        "tenant_id": fake.tenant_id,
        "client_id": principal.client_id,
        "client_secret": principal.client_secret,
        "authority_host": fake.url,
        "ca_bundle_path": str(fake.ca_path),
        "timeout_seconds": TIMEOUT_SECONDS,
        **overrides,
    }
    return AzureKeyVaultConfig.model_validate({k: v for k, v in fields.items() if v is not None})


@pytest.fixture
def peer_azure_keyvault(azure_keyvault_fake: FakeKeyVault) -> Peer:
    fake = azure_keyvault_fake
    key_name = fake.create_key(kty="RSA")

    async def disable() -> None:
        fake.set_enabled(key_name, False)

    @contextlib.asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        with fake.paused():
            yield

    return Peer(
        name="azure-keyvault",
        config=azure_keyvault_config(fake, key_name),
        unknown_key=azure_keyvault_config(fake, "missing-" + key_name),
        disable=disable,
        outage=outage,
        disabled_errors=(ProviderKeyDisabled,),
        notes="HTTPS fake of the Key Vault REST API with its own CA and token endpoint",
    )
