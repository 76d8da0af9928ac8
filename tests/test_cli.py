"""The `kms` command as operators run it: real processes, real server, both databases."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kms_service.settings import Settings
from tests.procs import KMS, kms, running_server

pytestmark = pytest.mark.slow


@pytest.fixture
def server(settings: Settings) -> Iterator[tuple[str, str]]:
    """`kms init` then `kms serve` on a free port: yields (base url, admin token)."""
    token = kms(settings, "init").stdout.strip().splitlines()[-1]
    assert token.startswith("kms_")
    with running_server(settings) as base:
        yield base, token


def test_init_is_idempotent_and_never_replaces_the_master_secret(settings: Settings) -> None:
    first = kms(settings, "init").stdout
    master = settings.resolved_master_secret_file
    before = master.read_bytes()
    assert master.stat().st_mode & 0o777 == 0o600
    token_file = settings.data_dir / "admin-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().strip() == first.strip().splitlines()[-1]
    second = kms(settings, "init").stdout
    assert "already initialised" in second and "kms_" not in second
    assert master.read_bytes() == before


def test_serve_refuses_a_foreign_master_secret(settings: Settings) -> None:
    kms(settings, "init")
    master = settings.resolved_master_secret_file
    master.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    proc = kms(settings, "serve", check=False)
    assert proc.returncode != 0
    assert "does not belong to this database" in proc.stderr


def test_serve_refuses_an_unmigrated_database(settings: Settings) -> None:
    proc = kms(settings, "serve", check=False)
    assert proc.returncode != 0
    assert "kms migrate" in proc.stderr or "kms init" in proc.stderr


def test_migrate_is_idempotent(settings: Settings) -> None:
    assert "database at revision" in kms(settings, "migrate").stdout
    assert "database at revision" in kms(settings, "migrate").stdout


def test_token_commands(settings: Settings) -> None:
    kms(settings, "init")
    created = kms(settings, "token", "create", "--role", "auditor", "--description", "ci auditor")
    token = created.stdout.strip()
    assert token.startswith("kms_")
    listing = kms(settings, "token", "list").stdout
    assert "auditor" in listing and "ci auditor" in listing and token not in listing
    token_id = next(line.split("\t")[0] for line in listing.splitlines() if "ci auditor" in line)
    kms(settings, "token", "revoke", token_id)
    assert "revoked" in kms(settings, "token", "list").stdout
    bad = kms(settings, "token", "create", "--role", "agent", "--description", "x", check=False)
    assert bad.returncode != 0 and "tenant" in bad.stderr


def test_recovery_derive_reproduces_served_deks_without_server_or_database(
    settings: Settings, server: tuple[str, str], tmp_path: Path
) -> None:
    base, token = server
    h = {"Authorization": f"Bearer {token}"}
    assert httpx.post(base + "/v1/tenants", json={"id": "acme", "name": "Acme"}, headers=h).status_code == 201
    assert httpx.post(base + "/v1/tenants/acme/keys", json={"name": "volumes"}, headers=h).status_code == 201
    served = {}
    for version_after_rotate in (1, 2):
        if version_after_rotate == 2:
            assert (
                httpx.post(base + "/v1/tenants/acme/keys/volumes/rotate", json={}, headers=h).status_code
                == 200
            )
        for dek_id, purpose, length in (("pg-data-0", "volume", 32), ("es/data@3", "secret", 64)):
            r = httpx.post(
                base + "/v1/tenants/acme/keys/volumes/derive",
                json={"id": dek_id, "purpose": purpose, "length": length},
                headers=h,
            )
            assert r.status_code == 200, r.text
            served[(r.json()["version"], dek_id, purpose, length)] = r.json()["key"]

    bundle = tmp_path / "bundle.json"
    kms(settings, "recovery", "export", "--out", str(bundle))
    assert bundle.stat().st_mode & 0o777 == 0o600
    text = bundle.read_text()
    master_b64 = settings.resolved_master_secret_file.read_text().strip()
    assert master_b64 not in text and base64.b64decode(master_b64).hex() not in text
    assert all(dek not in text for dek in served.values())

    # Disaster: no server, no database. Only M and the bundle.
    master_copy = tmp_path / "m.key"
    master_copy.write_text(master_b64 + "\n")
    master_copy.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env |= {
        "KMS_DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none",
        "KMS_DATA_DIR": str(tmp_path / "gone"),
    }
    for (version, dek_id, purpose, length), dek in served.items():
        proc = subprocess.run(
            [
                KMS,
                "recovery",
                "derive",
                "--bundle",
                str(bundle),
                "--master-secret-file",
                str(master_copy),
                "--tenant",
                "acme",
                "--key",
                "volumes",
                "--version",
                str(version),
                "--purpose",
                purpose,
                "--id",
                dek_id,
                "--length",
                str(length),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == dek

    # An altered bundle is refused, not silently used.
    doc = json.loads(text)
    doc["keys"][0]["versions"][0]["version_salt"] = "00" * 32
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(doc))
    proc = subprocess.run(
        [
            KMS,
            "recovery",
            "derive",
            "--bundle",
            str(altered),
            "--master-secret-file",
            str(master_copy),
            "--tenant",
            "acme",
            "--key",
            "volumes",
            "--version",
            "1",
            "--id",
            "pg-data-0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0 and "MAC" in proc.stderr and proc.stdout == ""


def test_audit_verify_cli(settings: Settings, server: tuple[str, str]) -> None:
    base, token = server
    assert (
        httpx.post(
            base + "/v1/tenants",
            json={"id": "acme", "name": "Acme"},
            headers={"Authorization": f"Bearer {token}"},
        ).status_code
        == 201
    )
    result = json.loads(kms(settings, "audit", "verify").stdout)
    assert result["valid"] is True and result["checked"] == result["head_seq"] >= 3
