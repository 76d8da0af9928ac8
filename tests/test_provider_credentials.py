"""Provider credentials are write-only: stored sealed under the config-secrets key, bound to their
tenant and key, never returned by the API, the audit log or the recovery bundle."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from sqlalchemy import text

import providers.registry
from kms_service import crypto
from tests.conftest import Api
from tests.credential_provider import EXPECTED_TOKEN


@pytest.fixture(autouse=True)
def credential_provider() -> Iterator[None]:
    providers.registry._CONFIGS["test-credential"] = "tests.credential_provider:CredentialProviderConfig"
    yield
    del providers.registry._CONFIGS["test-credential"]


PROVIDER = {"type": "test-credential", "account": "acct-1", "api_token": EXPECTED_TOKEN}


async def test_credentials_are_sealed_and_never_returned(api: Api) -> None:
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    r = await api.post("/v1/tenants/acme/keys", {"name": "cloud", "provider": PROVIDER})
    assert r.status_code == 201, r.text
    assert r.json()["provider"] == {"type": "test-credential", "account": "acct-1", "timeout_seconds": 5.0}

    r = await api.post("/v1/tenants/acme/keys/cloud/encrypt", {"plaintext": base64.b64encode(b"x").decode()})
    assert r.status_code == 200, r.text
    ct = r.json()["ciphertext"]
    assert (await api.post("/v1/tenants/acme/keys/cloud/rotate", {})).status_code == 200
    # A fresh process (empty caches, new provider connection) reopens the credential.
    api.services.kek_cache.clear()
    await api.services.pool.close()
    r = await api.post("/v1/tenants/acme/keys/cloud/decrypt", {"ciphertext": ct})
    assert r.status_code == 200, r.text

    async with api.services.db.engine.connect() as conn:
        row = (await conn.execute(text("SELECT provider_config, provider_secrets FROM keys"))).one()
        audit = (await conn.execute(text("SELECT details FROM audit_events"))).all()
    stored_public, sealed = row
    assert EXPECTED_TOKEN not in str(stored_public)
    assert sealed is not None
    assert EXPECTED_TOKEN.encode() not in bytes(sealed)
    for where in (
        str(audit),
        (await api.get("/v1/tenants/acme/keys")).text,
        (await api.get("/v1/audit")).text,
    ):
        assert EXPECTED_TOKEN not in where

    # The seal is AES-256-GCM under HKDF(M, cluster_salt, enc("kms/v1","config-secrets"), 32).
    key = crypto.purpose_key(
        master_secret=api.services.installation.master.reveal(),
        cluster_salt=api.services.installation.cluster_salt,
        purpose="config-secrets",
    )
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    sealed = bytes(sealed)
    body = AESGCM(key).decrypt(
        sealed[1:13], sealed[13:], crypto.enc("kms/v1", "config-secrets", "acme", "cloud")
    )
    assert EXPECTED_TOKEN in body.decode()


async def test_wrong_credentials_are_refused_at_creation_and_nothing_is_stored(api: Api) -> None:
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    r = await api.post(
        "/v1/tenants/acme/keys", {"name": "cloud", "provider": {**PROVIDER, "api_token": "nope"}}
    )
    assert r.status_code == 409
    assert r.json()["code"] == "provider_access_denied"
    assert "nope" not in r.text
    assert (await api.get("/v1/tenants/acme/keys")).json()["keys"] == []


@pytest.mark.expect_5xx
async def test_altered_sealed_credentials_fail_cleanly(api: Api) -> None:
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    assert (await api.post("/v1/tenants/acme/keys", {"name": "a", "provider": PROVIDER})).status_code == 201
    assert (await api.post("/v1/tenants/acme/keys", {"name": "b", "provider": PROVIDER})).status_code == 201
    # Move b's sealed credentials onto a: they are bound to (tenant, key), so they must not open.
    async with api.services.db.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE keys SET provider_secrets = (SELECT provider_secrets FROM keys WHERE name = 'b') "
                "WHERE name = 'a'"
            )
        )
    api.services.meta_cache.clear()
    api.services.kek_cache.clear()
    r = await api.post("/v1/tenants/acme/keys/a/rotate", {})
    assert r.status_code == 500
    assert r.json()["code"] == "provider_config_error"
    assert "provider_secrets" not in r.text
