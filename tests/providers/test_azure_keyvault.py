"""`azure-keyvault` beyond the conformance suite, against the HTTPS fake of the Key Vault REST API.

The point of this provider is that the *vault* wraps and unwraps: the SDK's CryptographyClient
would wrap RSA locally with the public key and oct keys under a random local key. So every round
trip here unwraps with a fresh client, checks the fake's request log, and checks that the vault's
own key material (not some local key) undoes the wrap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from providers import (
    KeyProvider,
    ProviderAccessDenied,
    ProviderConfigError,
    ProviderCryptoError,
    ProviderError,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderUnavailable,
    parse_provider_config,
)
from providers.azure_keyvault import AzureKeyVaultConfig, _decode_blob
from tests.providers.fakes.azure_keyvault import FakeKeyVault, LoggedRequest, make_ca
from tests.providers.peers.azure_keyvault import azure_keyvault_config

CTX = {"tenant": "acme", "key": "volumes", "version": "1"}
ALGORITHMS = [("RSA", "RSA-OAEP-256"), ("oct-HSM", "A256KW")]
BOUND = 15.0  # seconds after which a call counts as hung (the provider's own deadline is 6 s)


@contextlib.asynccontextmanager
async def connected(config: AzureKeyVaultConfig) -> AsyncIterator[KeyProvider]:
    provider = await config.connect()
    try:
        yield provider
    finally:
        await provider.close()


def crypto_calls(fake: FakeKeyVault, key_name: str) -> list[LoggedRequest]:
    return [r for r in fake.requests_for(key_name) if r.path.endswith(("/wrapkey", "/unwrapkey"))]


@pytest.mark.parametrize(("kty", "algorithm"), ALGORITHMS)
async def test_round_trip_is_performed_by_the_vault(
    azure_keyvault_fake: FakeKeyVault, kty: str, algorithm: str
) -> None:
    fake = azure_keyvault_fake
    name = fake.create_key(kty=kty)
    version = fake.current_version(name)
    config = azure_keyvault_config(fake, name, algorithm=algorithm)
    secret = os.urandom(32)

    async with connected(config) as provider:
        blob = await provider.wrap(secret, context=CTX)
    assert secret not in blob
    # The vault's own key material undoes the wrap (a wrap under a random local oct key would not);
    # the request log below shows the vault performed it (a local RSA wrap would leave no request).
    blob_algorithm, blob_version, wrapped = _decode_blob(blob)
    assert (blob_algorithm, blob_version) == (algorithm, version)
    assert fake.unwrap_as_vault(name, version, wrapped)[:32] == secret

    async with connected(config) as fresh:  # another replica: no state shared with the first client
        assert await fresh.unwrap(blob, context=CTX) == secret
        with pytest.raises(ProviderCryptoError):
            await fresh.unwrap(blob, context={**CTX, "version": "2"})
        tampered = bytearray(blob)
        tampered[-1] ^= 0x01
        with pytest.raises(ProviderCryptoError):
            await fresh.unwrap(bytes(tampered), context=CTX)

    calls = crypto_calls(fake, name)
    assert [(r.method, r.path.rsplit("/", 1)[-1], r.status) for r in calls] == [
        ("POST", "wrapkey", 200),
        ("POST", "unwrapkey", 200),
        ("POST", "unwrapkey", 200),  # right secret, wrong context: caught by the binding tag
        ("POST", "unwrapkey", 400),  # tampered ciphertext: refused by the vault
    ]
    assert all(r.path.startswith(f"/keys/{name}/{version}/") for r in calls)
    assert all(r.client_id == fake.principal.client_id for r in calls)


@pytest.mark.parametrize(("kty", "algorithm"), ALGORITHMS)
async def test_a_blob_of_one_key_does_not_unwrap_with_another(
    azure_keyvault_fake: FakeKeyVault, kty: str, algorithm: str
) -> None:
    fake = azure_keyvault_fake
    first, second = fake.create_key(kty=kty), fake.create_key(kty=kty)
    async with connected(azure_keyvault_config(fake, first, algorithm=algorithm)) as provider:
        blob = await provider.wrap(os.urandom(32), context=CTX)
    async with connected(azure_keyvault_config(fake, second, algorithm=algorithm)) as other:
        with pytest.raises(ProviderCryptoError):
            await other.unwrap(blob, context=CTX)
    # And a key that does not exist at all is reported as such, not as a crypto error.
    async with connected(azure_keyvault_config(fake, "gone-" + first, algorithm=algorithm)) as missing:
        with pytest.raises(ProviderKeyNotFound):
            await missing.unwrap(blob, context=CTX)


async def test_rotation_in_key_vault_keeps_old_blobs_and_pinning_holds(
    azure_keyvault_fake: FakeKeyVault,
) -> None:
    fake = azure_keyvault_fake
    name = fake.create_key()
    v1 = fake.current_version(name)
    old_secret = os.urandom(32)
    async with connected(azure_keyvault_config(fake, name)) as provider:
        old_blob = await provider.wrap(old_secret, context=CTX)
        v2 = fake.rotate_key(name)
        new_blob = await provider.wrap(os.urandom(32), context=CTX)
        assert await provider.unwrap(old_blob, context=CTX) == old_secret
    assert _decode_blob(old_blob)[1] == v1
    assert _decode_blob(new_blob)[1] == v2
    async with connected(azure_keyvault_config(fake, name, key_version=v1)) as pinned:
        assert _decode_blob(await pinned.wrap(os.urandom(32), context=CTX))[1] == v1
        info = await pinned.describe()
        assert info.key_ref.endswith(f"/keys/{name}/{v1}")


async def test_disabled_key_refuses_wrap_and_unwrap(azure_keyvault_fake: FakeKeyVault) -> None:
    fake = azure_keyvault_fake
    name = fake.create_key()
    secret = os.urandom(32)
    async with connected(azure_keyvault_config(fake, name)) as provider:
        blob = await provider.wrap(secret, context=CTX)
        fake.set_enabled(name, False)
        before = len(crypto_calls(fake, name))
        with pytest.raises(ProviderKeyDisabled):
            await provider.unwrap(blob, context=CTX)  # refused by the vault (403 KeyDisabled)
        with pytest.raises(ProviderKeyDisabled):
            await provider.wrap(os.urandom(32), context=CTX)  # refused by us: the vault would still wrap
        assert [r.path.rsplit("/", 1)[-1] for r in crypto_calls(fake, name)[before:]] == ["unwrapkey"]
        health = await provider.health()
        assert not health.ok
        assert "disabled" in health.detail
        assert (await provider.describe()).details["enabled"] is False
        fake.set_enabled(name, True)
        assert await provider.unwrap(blob, context=CTX) == secret
        # A vault that refuses even the read of a disabled key (403 KeyDisabled on GET).
        with (
            fake.injected(
                403, "Forbidden", "Operation get is not allowed on a disabled key.", inner="KeyDisabled"
            ),
            pytest.raises(ProviderKeyDisabled),
        ):
            await provider.describe()


async def test_principal_without_permission_is_denied_with_the_fix(azure_keyvault_fake: FakeKeyVault) -> None:
    fake = azure_keyvault_fake
    name = fake.create_key()
    wrap_only = fake.add_principal(frozenset({"get", "wrapKey"}))
    async with connected(azure_keyvault_config(fake, name, principal=wrap_only)) as provider:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        with pytest.raises(ProviderAccessDenied) as denied:
            await provider.unwrap(blob, context=CTX)
    message = str(denied.value)
    assert "unwrapKey" in message
    assert "Key Vault Crypto Service Encryption User" in message
    assert wrap_only.client_id in message

    nothing = fake.add_principal(frozenset())
    async with connected(azure_keyvault_config(fake, name, principal=nothing)) as provider:
        with pytest.raises(ProviderAccessDenied, match="may not get"):
            await provider.wrap(os.urandom(32), context=CTX)
        health = await provider.health()
        assert not health.ok
        assert "Key Vault Crypto Service Encryption User" in health.detail


@pytest.mark.parametrize("broken", ["client_secret", "client_id", "tenant_id"])
async def test_bad_service_principal_is_access_denied(
    azure_keyvault_fake: FakeKeyVault, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = azure_keyvault_fake
    name = fake.create_key()
    wrong: dict[str, Any] = {
        "client_secret": "wrong~" + os.urandom(12).hex(),
        "client_id": "00000000-0000-4000-8000-000000000000",
        "tenant_id": "other-tenant",
    }
    config = azure_keyvault_config(fake, name, **{broken: wrong[broken]})
    async with connected(config) as provider:
        with pytest.raises(ProviderAccessDenied) as denied:
            await provider.wrap(os.urandom(32), context=CTX)
    assert crypto_calls(fake, name) == []
    assert config.client_secret is not None
    for text in (str(denied.value), repr(denied.value), caplog.text):
        assert config.client_secret.get_secret_value() not in text


async def test_untrusted_tls_certificate_is_refused(
    azure_keyvault_fake: FakeKeyVault, tmp_path: Path
) -> None:
    """A vault whose certificate does not chain to ca_bundle_path (or to the system's CAs) is never
    sent a request. This is ProviderUnavailable, not ProviderAccessDenied: no authenticated vault
    answered, so nothing says the customer's permissions are wrong (AccessDenied would send them
    to fix role assignments); like an unreachable vault, a corrected CA bundle or network path heals
    it, and the message names ca_bundle_path."""
    fake = azure_keyvault_fake
    name = fake.create_key()
    other_ca, _, _ = make_ca(tmp_path, "some-other-ca")
    before = len(fake.requests)
    for ca_bundle_path in (str(other_ca), None):
        async with connected(azure_keyvault_config(fake, name, ca_bundle_path=ca_bundle_path)) as provider:
            with pytest.raises(ProviderUnavailable, match="ca_bundle_path"):
                await asyncio.wait_for(provider.wrap(os.urandom(32), context=CTX), BOUND)
            if ca_bundle_path is not None:
                assert not (await asyncio.wait_for(provider.health(), BOUND)).ok
    assert len(fake.requests) == before  # nothing got past the TLS handshake


async def test_token_endpoint_outage_is_unavailable_not_denied(azure_keyvault_fake: FakeKeyVault) -> None:
    """Entra ID answering 5xx says nothing about the customer's permissions: retry later."""
    fake = azure_keyvault_fake
    name = fake.create_key()
    async with connected(azure_keyvault_config(fake, name)) as provider:  # fresh: no token yet
        with (
            fake.injected(503, "ServiceUnavailable", "down", path_prefix=f"/{fake.tenant_id}/"),
            pytest.raises(ProviderUnavailable, match="Entra ID"),
        ):
            await asyncio.wait_for(provider.wrap(os.urandom(32), context=CTX), BOUND)
        assert await provider.describe()  # and it heals once the endpoint is back


@pytest.mark.parametrize(
    ("status", "code", "inner", "expected"),
    [
        (429, "Throttled", None, ProviderUnavailable),
        (503, "ServiceUnavailable", None, ProviderUnavailable),
        (403, "Forbidden", "ForbiddenByFirewall", ProviderAccessDenied),
        (403, "Forbidden", "ForbiddenByRbac", ProviderAccessDenied),
        (404, "KeyNotFound", None, ProviderKeyNotFound),
        (409, "Conflict", None, ProviderError),
    ],
)
async def test_vault_errors_are_translated(
    azure_keyvault_fake: FakeKeyVault,
    status: int,
    code: str,
    inner: str | None,
    expected: type[ProviderError],
) -> None:
    fake = azure_keyvault_fake
    name = fake.create_key()
    async with connected(azure_keyvault_config(fake, name)) as provider:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        with fake.injected(status, code, f"injected {code}", inner=inner, path_prefix=f"/keys/{name}"):
            for call in (provider.unwrap(blob, context=CTX), provider.describe()):
                with pytest.raises(expected) as raised:
                    await asyncio.wait_for(call, BOUND)
                if expected is ProviderError:  # not some more specific (and wrong) class
                    assert type(raised.value) is ProviderError
                assert str(raised.value)


async def test_a_long_retry_after_is_cut_at_the_deadline(azure_keyvault_fake: FakeKeyVault) -> None:
    fake = azure_keyvault_fake
    name = fake.create_key()
    config = azure_keyvault_config(fake, name, timeout_seconds=0.5)
    async with connected(config) as provider:
        await provider.describe()  # token and challenge in place
        with (
            fake.injected(429, "Throttled", "slow down", headers={"Retry-After": "60"}),
            pytest.raises(ProviderUnavailable, match="within"),
        ):
            await asyncio.wait_for(provider.describe(), BOUND)


@pytest.mark.parametrize(("kty", "hsm"), [("RSA", False), ("RSA-HSM", True)])
async def test_describe_reports_the_key(azure_keyvault_fake: FakeKeyVault, kty: str, hsm: bool) -> None:
    fake = azure_keyvault_fake
    name = fake.create_key(kty=kty)
    async with connected(azure_keyvault_config(fake, name)) as provider:
        info = await provider.describe()
    assert info.type == "azure-keyvault"
    assert info.key_ref == f"{fake.url}/keys/{name}/{fake.current_version(name)}"
    assert info.hsm_backed is hsm
    assert info.details == {
        "kty": kty,
        "key_ops": ["wrapKey", "unwrapKey", "encrypt", "decrypt"],
        "enabled": True,
    }


async def test_algorithm_must_fit_the_key_type(azure_keyvault_fake: FakeKeyVault) -> None:
    fake = azure_keyvault_fake
    name = fake.create_key(kty="RSA")
    async with connected(azure_keyvault_config(fake, name, algorithm="A256KW")) as provider:
        with pytest.raises(ProviderError, match="RSA-OAEP-256 with RSA keys"):
            await provider.wrap(os.urandom(32), context=CTX)
        with pytest.raises(ProviderCryptoError, match="multiple of 8"):
            await provider.wrap(os.urandom(31), context=CTX)
    assert crypto_calls(fake, name) == []


def _raw(fake: FakeKeyVault, **overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "type": "azure-keyvault",
        "vault_url": "https://contoso-kms.vault.azure.net",
        "key_name": "tenant-kek",
        "tenant_id": fake.tenant_id,
        "client_id": fake.principal.client_id,
        "client_secret": fake.principal.client_secret,
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None}


def test_config_accepts_plain_json_strings_and_hides_the_secret(
    azure_keyvault_fake: FakeKeyVault, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = azure_keyvault_fake
    secret = fake.principal.client_secret
    raw = _raw(fake, timeout_seconds=3)

    from_json = AzureKeyVaultConfig.model_validate_json(json.dumps(raw))
    from_api = parse_provider_config(raw)  # what the API does with a parsed JSON body
    for config in (from_json, from_api):
        assert isinstance(config, AzureKeyVaultConfig)
        assert config.client_secret is not None
        assert config.client_secret.get_secret_value() == secret
        assert config.algorithm == "RSA-OAEP-256"
        view = config.public_view()
        assert "client_secret" not in view
        assert view["vault_url"] == raw["vault_url"]
        for text in (repr(config), str(config), str(view), config.model_dump_json(exclude={"client_secret"})):
            assert secret not in text
        logging.getLogger("test").info("config %s %r %s", config, config, view)
    assert from_json == from_api
    with pytest.raises(ValidationError) as invalid:  # secret first: pydantic shows inputs truncated
        AzureKeyVaultConfig.model_validate({"client_secret": secret, **raw, "tenant_id": None})
    assert "input_value" not in str(invalid.value)  # inputs are never echoed, not even truncated
    assert secret[:6] not in str(invalid.value)
    assert secret not in caplog.text


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vault_url": "http://contoso-kms.vault.azure.net"}, "vault_url"),
        ({"vault_url": "https://contoso-kms.vault.azure.net/keys/x"}, "vault_url"),
        ({"vault_url": "https://user:pw@contoso-kms.vault.azure.net"}, "vault_url"),
        ({"key_name": "bad/name"}, "key_name"),
        ({"key_version": "../x"}, "key_version"),
        ({"algorithm": "RSA1_5"}, "algorithm"),
        ({"authority_host": "http://login.example"}, "authority_host"),
        ({"client_secret": None}, "tenant_id, client_id and client_secret go together"),
        ({"client_secret": ""}, "client_secret"),
        (  # the service's own credential must never be sent to a tenant-chosen authority
            {
                "tenant_id": None,
                "client_id": None,
                "client_secret": None,
                "authority_host": "https://evil.example",
            },
            "authority_host applies only to a service principal",
        ),
        ({"unexpected": 1}, "unexpected"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
    ],
)
def test_config_rejects(azure_keyvault_fake: FakeKeyVault, overrides: dict[str, object], field: str) -> None:
    raw = _raw(azure_keyvault_fake)
    raw.update(overrides)
    with pytest.raises(ProviderConfigError, match=field) as rejected:
        parse_provider_config({k: v for k, v in raw.items() if v is not None})
    assert azure_keyvault_fake.principal.client_secret not in str(rejected.value)


async def test_without_a_service_principal_the_ambient_identity_is_used(
    azure_keyvault_fake: FakeKeyVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tenant_id/client_id/client_secret: DefaultAzureCredential's production chain, here its
    environment credential (AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET of the service)."""
    fake = azure_keyvault_fake
    name = fake.create_key()
    ambient = fake.add_principal()
    monkeypatch.setenv("AZURE_TENANT_ID", fake.tenant_id)
    monkeypatch.setenv("AZURE_CLIENT_ID", ambient.client_id)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", ambient.client_secret)
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", fake.url)  # the service's setting, not the tenant's
    config = azure_keyvault_config(
        fake, name, tenant_id=None, client_id=None, client_secret=None, authority_host=None
    )
    assert config.client_secret is None
    secret = os.urandom(32)
    async with connected(config) as provider:
        assert await provider.unwrap(await provider.wrap(secret, context=CTX), context=CTX) == secret
    assert {r.client_id for r in crypto_calls(fake, name)} == {ambient.client_id}


def test_managed_identity_config_needs_no_credentials() -> None:
    config = parse_provider_config(
        {
            "type": "azure-keyvault",
            "vault_url": "https://contoso.managedhsm.azure.net",
            "key_name": "k",
            "algorithm": "A256KW",
        }
    )
    assert isinstance(config, AzureKeyVaultConfig)
    assert config.client_secret is None
    assert config.public_view()["algorithm"] == "A256KW"


def test_module_imports_no_azure_sdk() -> None:
    """Configs validate where the azure extra is absent: the SDK is imported in connect() only."""
    code = (
        "import sys, providers.azure_keyvault; print(sorted(m for m in sys.modules if m.startswith('azure')))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
