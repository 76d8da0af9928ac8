"""The README's walk-through works when pasted: run it verbatim against a live `kms serve`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kms_service.settings import Settings
from tests.conftest import peer_missing
from tests.procs import kms, kms_env, running_server

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def walkthrough() -> str:
    text = README.read_text()
    match = re.search(r"<!-- walkthrough:start -->\s*```sh\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert match, "README lost its walk-through block"
    return match.group(1)


def test_readme_walkthrough(settings: Settings) -> None:
    for tool in ("curl", "jq", "bash"):
        if shutil.which(tool) is None:
            peer_missing(f"{tool} is not installed (the walk-through uses it)")
    kms(settings, "init")
    with running_server(settings) as base:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walkthrough()],
            env=kms_env(settings, KMS=base),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0, f"walk-through failed:\n{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    assert "db-password" in out  # decrypt gave the secret back
    assert '"valid": true' in out  # the chain verifies
    assert '"latest_version": 2' in out  # the agent learns of the rotation
