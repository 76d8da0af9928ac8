"""Independent checks of LUKS images (straight cryptsetup calls, not kms_agent's) and a runner
for the `kms-agent` command."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.clients.conftest import KMS_AGENT

CRYPTSETUP = shutil.which("cryptsetup") or "/usr/sbin/cryptsetup"


def require_cryptsetup() -> None:
    if not Path(CRYPTSETUP).exists():
        from tests.conftest import peer_missing

        peer_missing("cryptsetup not installed (apt-get install cryptsetup-bin)")


def new_image(path: Path, size: str = "32M") -> Path:
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    return path


def opens(image: Path, key: bytes) -> bool:
    proc = subprocess.run(
        [CRYPTSETUP, "open", "--test-passphrase", "--key-file=-", str(image)], input=key, capture_output=True
    )
    assert proc.returncode in (0, 2), proc.stderr
    return proc.returncode == 0


def metadata(image: Path) -> dict[str, Any]:
    out = subprocess.run(
        [CRYPTSETUP, "luksDump", "--dump-json-metadata", str(image)], capture_output=True, check=True
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def token(image: Path) -> dict[str, Any]:
    tokens = [t for t in metadata(image)["tokens"].values() if t["type"] == "kms-service"]
    assert len(tokens) == 1, tokens
    return tokens[0]


def keyslots(image: Path) -> set[int]:
    return {int(k) for k in metadata(image)["keyslots"]}


def agent(
    env: dict[str, str], *args: str, input: bytes | None = None, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [KMS_AGENT, *args], env=env, input=input, capture_output=True, pass_fds=pass_fds, timeout=120
    )


def ok(proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    if proc.returncode != 0:
        pytest.fail(f"kms-agent {proc.args[1:]} exited {proc.returncode}:\n{proc.stderr.decode()}")
    return proc
