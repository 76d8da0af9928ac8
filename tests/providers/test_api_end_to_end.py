"""A tenant key on every provider serves derive, datakey, encrypt/decrypt and rotation through the
API, with the provider called once per cache miss, not once per request (DESIGN §3)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from pydantic import SecretBytes, SecretStr

from providers import ProviderConfig
from tests.conftest import Api
from tests.providers.conftest import Peer


def as_request(config: ProviderConfig) -> dict[str, Any]:
    """The provider config as a client sends it: JSON, credentials included."""
    out = config.model_dump(mode="json")
    for name in config.secret_fields:
        value = getattr(config, name)
        if isinstance(value, (SecretStr, SecretBytes)):
            out[name] = value.get_secret_value()
    return out


async def test_tenant_key_on_each_provider(api: Api, peer: Peer) -> None:
    if peer.name == "local":
        provider: dict[str, Any] = {"type": "local"}
    else:
        provider = as_request(peer.config)
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    r = await api.post("/v1/tenants/acme/keys", {"name": "k", "provider": provider})
    assert r.status_code == 201, r.text
    shown = r.json()["provider"]
    for name in peer.config.secret_fields:
        assert name not in shown

    base = "/v1/tenants/acme/keys/k"
    d1 = await api.post(f"{base}/derive", {"id": "vol-1"})
    assert d1.status_code == 200, d1.text
    dk = await api.post(f"{base}/datakey", {"context": {"app": "x"}})
    assert dk.status_code == 200, dk.text
    ct = (await api.post(f"{base}/encrypt", {"plaintext": base64.b64encode(b"hello").decode()})).json()[
        "ciphertext"
    ]
    assert (await api.post(f"{base}/rotate", {})).status_code == 200
    # Fresh caches and connections: the version secrets are unwrapped by the provider again.
    api.services.kek_cache.clear()
    await api.services.pool.close()
    r = await api.post(f"{base}/decrypt", {"ciphertext": dk.json()["ciphertext"], "context": {"app": "x"}})
    assert r.status_code == 200, r.text
    assert r.json()["plaintext"] == dk.json()["plaintext"]
    r = await api.post(f"{base}/decrypt", {"ciphertext": ct})
    assert base64.b64decode(r.json()["plaintext"]) == b"hello"
    r = await api.post(f"{base}/derive", {"id": "vol-1", "version": 1})
    assert r.json()["key"] == d1.json()["key"]
    assert r.json()["latest_version"] == 2

    # Many requests, few provider calls: the KEK secret is cached per version.
    if peer.name != "local":
        provider_obj = api.services.pool.connected()[0]
        calls = 0
        inner = provider_obj.unwrap

        async def counting(blob: bytes, *, context: Any) -> bytes:
            nonlocal calls
            calls += 1
            return await inner(blob, context=context)

        provider_obj.unwrap = counting  # type: ignore[method-assign]
        for i in range(50):
            assert (await api.post(f"{base}/derive", {"id": f"vol-{i}"})).status_code == 200
        assert calls == 1  # v2 is unwrapped once, then served from the KEK cache

    health = (await api.http.get("/v1/sys/health")).json()
    assert any(p["type"] == peer.config.type and p["ok"] for p in health["providers"]), health


async def test_revocation_at_the_backend_stops_deks_within_the_cache_ttl(api: Api, peer: Peer) -> None:
    """Hold-your-own-key: the service never persists an unwrapped secret, so once the cached copy
    expires (TTL shortened here to 0.5 s) a key revoked at the backend stops DEK issuance."""
    if peer.disable is None:
        pytest.skip(f"{peer.name}: {peer.notes or 'the peer does not enforce key state'}")
    api.services.kek_cache.ttl = 0.5
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    r = await api.post("/v1/tenants/acme/keys", {"name": "k", "provider": as_request(peer.config)})
    assert r.status_code == 201, r.text
    base = "/v1/tenants/acme/keys/k"
    assert (await api.post(f"{base}/derive", {"id": "vol-1"})).status_code == 200
    await peer.disable()
    # Within the TTL the cached secret still serves (bounded staleness, by design).
    assert (await api.post(f"{base}/derive", {"id": "vol-1"})).status_code == 200
    await asyncio.sleep(0.6)
    r = await api.post(f"{base}/derive", {"id": "vol-1"})
    assert r.status_code == 409, r.text
    assert r.json()["code"] in {"provider_key_disabled", "provider_access_denied", "provider_key_not_found"}


async def test_pkcs11_modules_are_limited_to_the_operators_allowlist(api: Api) -> None:
    """Loading a PKCS#11 module runs its code in the service: a key may only name a listed one."""
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    provider = {
        "type": "pkcs11",
        "module_path": "/tmp/evil.so",
        "token_label": "t",
        "key_label": "k",
        "pin": "1234",
    }
    r = await api.post("/v1/tenants/acme/keys", {"name": "hsm", "provider": provider})
    assert r.status_code == 400
    assert r.json()["code"] == "unsupported_provider"
    assert "KMS_PKCS11_ALLOWED_MODULES" in r.json()["detail"]
    assert "1234" not in r.text
