"""The master secret sealed by a real HSM (SoftHSM2 over PKCS#11), through the real CLI:
`kms init --seal` writes no plaintext M, `kms serve` unseals it, and a wrong PIN stops the start
with a message naming the seal provider."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from kms_service.settings import Settings
from tests.procs import KMS, kms_env, running_server
from tests.providers.peers.pkcs11 import SoftHsm

pytestmark = pytest.mark.slow


def test_master_secret_sealed_by_an_hsm(softhsm: SoftHsm, settings: Settings, tmp_path: Path) -> None:
    label = softhsm.create_key()
    config = softhsm.config(label).model_dump(mode="json")
    config["pin"] = softhsm.config(label).pin.get_secret_value()
    seal = tmp_path / "seal.json"
    seal.write_text(json.dumps({k: v for k, v in config.items() if k != "pin"}))
    env = kms_env(
        settings,
        KMS_SEAL_SECRETS=json.dumps({"pin": config["pin"]}),
        SOFTHSM2_CONF=os.environ["SOFTHSM2_CONF"],
    )

    proc = subprocess.run(
        [KMS, "init", "--seal", str(seal)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "sealed by 'pkcs11'" in proc.stdout
    token = proc.stdout.strip().splitlines()[-1]
    assert not settings.resolved_master_secret_file.exists()
    sealed = settings.data_dir / "master.sealed.json"
    assert config["pin"] not in sealed.read_text()

    extra = {"KMS_SEAL_SECRETS": env["KMS_SEAL_SECRETS"], "SOFTHSM2_CONF": env["SOFTHSM2_CONF"]}
    with running_server(settings, extra_env=extra) as base:
        r = httpx.get(base + "/v1/sys/identity", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text

    bad = env | {"KMS_SEAL_SECRETS": json.dumps({"pin": "0000"})}
    proc = subprocess.run([KMS, "serve"], env=bad, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "seal provider 'pkcs11'" in proc.stderr
    assert "0000" not in proc.stderr
