"""The core flow through the HTTP API, on both databases."""

from __future__ import annotations

import base64

from tests.conftest import Api


async def test_tenant_key_derive_encrypt_rotate(api: Api) -> None:
    await api.tenant_and_key()
    agent = await api.agent_token()
    r = await api.post("/v1/tenants/acme/keys/volumes/derive", {"id": "pg-data-0"}, token=agent)
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["version"] == 1 and first["latest_version"] == 1
    assert len(base64.b64decode(first["key"])) == 32

    r = await api.post(
        "/v1/tenants/acme/keys/volumes/encrypt",
        {"plaintext": base64.b64encode(b"s3cret").decode()},
        token=agent,
    )
    assert r.status_code == 200, r.text
    ct = r.json()["ciphertext"]
    assert ct.startswith("kms:v1:")

    r = await api.post("/v1/tenants/acme/keys/volumes/rotate", {"reason": "test"})
    assert r.status_code == 200, r.text
    assert r.json()["primary_version"] == 2

    r = await api.post("/v1/tenants/acme/keys/volumes/decrypt", {"ciphertext": ct}, token=agent)
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["plaintext"]) == b"s3cret"

    r = await api.post("/v1/tenants/acme/keys/volumes/derive", {"id": "pg-data-0"}, token=agent)
    assert r.json()["version"] == 2 and r.json()["latest_version"] == 2
    r = await api.post("/v1/tenants/acme/keys/volumes/derive", {"id": "pg-data-0", "version": 1}, token=agent)
    assert r.json() == first | {"latest_version": 2}

    r = await api.get("/v1/audit/verify")
    assert r.status_code == 200 and r.json()["valid"] is True, r.text
