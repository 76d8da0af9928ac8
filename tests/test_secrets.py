"""Secrets stay secret: key material, tokens and the master secret never reach logs, error
bodies, audit details, reprs or metrics."""

from __future__ import annotations

import base64
import logging

import pytest

from kms_service.master import SecretBytes
from tests.conftest import Api


async def test_no_secret_in_logs_errors_audit_or_metrics(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await api.tenant_and_key()
    agent = await api.agent_token()
    secrets: list[str] = [api.admin_token, agent]
    master_b64 = api.settings.resolved_master_secret_file.read_text().strip()
    master = base64.b64decode(master_b64)
    secrets += [master_b64, master.hex()]
    bodies: list[str] = []

    base = "/v1/tenants/acme/keys/volumes"
    r = await api.post(f"{base}/derive", {"id": "pg-data-0"}, token=agent)
    secrets.append(r.json()["key"])
    r = await api.post(f"{base}/datakey", {}, token=agent)
    secrets.append(r.json()["plaintext"])
    plaintext = base64.b64encode(b"hunter2-very-secret").decode()
    secrets.append(plaintext)
    r = await api.post(f"{base}/encrypt", {"plaintext": plaintext, "context": {"a": "b"}}, token=agent)
    ct = r.json()["ciphertext"]
    # Failures of every kind, whose bodies and logs must stay clean too.
    for body in (
        {"ciphertext": ct, "context": {"a": "c"}},
        {"ciphertext": ct[:-4]},
        {"ciphertext": "kms:v9:" + ct.split(":", 2)[2]},
        {"ciphertext": ct, "bogus": plaintext},
    ):
        bodies.append((await api.post(f"{base}/decrypt", body, token=agent)).text)
    bodies.append(
        (await api.post(f"{base}/encrypt", {"plaintext": plaintext, "length": "x"}, token=agent)).text
    )
    bodies.append((await api.post(f"{base}/encrypt", {"plaintext": plaintext + "!"}, token=agent)).text)
    bodies.append(
        (
            await api.http.post(
                f"{base}/derive", json={"id": "x"}, headers={"Authorization": f"Bearer {agent[:-2]}xx"}
            )
        ).text
    )
    r = await api.post("/v1/tokens", {"role": "auditor", "description": "leak check"})
    secrets.append(r.json()["token"])
    await api.http.delete(f"/v1/tokens/{r.json()['id']}", headers=api.auth())
    bodies.append((await api.get("/v1/tokens")).text)
    audit = (await api.get("/v1/audit?limit=1000")).text
    metrics = (await api.http.get("/metrics")).text

    haystacks = {"logs": caplog.text, "error bodies": "\n".join(bodies), "audit": audit, "metrics": metrics}
    for where, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"


async def test_reprs_hide_key_material(api: Api) -> None:
    await api.tenant_and_key()
    services = api.services
    master = services.installation.master.reveal()
    meta = await services.keys.get("acme", "volumes")
    salt = meta.versions[1].version_salt
    assert salt is not None
    secret = await services.dataplane._material.secret(meta, meta.versions[1])
    for obj in (
        services.installation,
        services.installation.master,
        services.installation.audit_key,
        services.kek_cache,
        meta,
        meta.versions[1],
        services.token_cache,
    ):
        text = repr(obj) + str(obj)
        for value in (master, salt, secret):
            assert value.hex() not in text
            assert base64.b64encode(value).decode() not in text
            assert repr(value) not in text
    assert "redacted" in repr(SecretBytes(b"x" * 32))
