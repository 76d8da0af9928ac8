"""`kms audit verify` as operators run it: the real console script in its own process, pointed at
the test's data dir and database (SQLite and PostgreSQL) through KMS_DATA_DIR/KMS_DATABASE_URL."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest

from tests.audit.test_chain import build_chain, tamper, verify_both
from tests.conftest import Api
from tests.procs import kms

pytestmark = pytest.mark.slow


async def kms_audit_verify(api: Api) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = await asyncio.to_thread(kms, api.settings, "audit", "verify", check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return proc, dict(json.loads(lines[0]))


async def test_cli_verify_accepts_an_untouched_chain(api: Api) -> None:
    chain = await build_chain(api)
    proc, result = await kms_audit_verify(api)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert result["valid"] is True
    assert result["checked"] == result["head_seq"] == chain.head_seq
    assert result["first_invalid_seq"] is None
    assert result == await verify_both(api)


@pytest.mark.parametrize("kind", ["edit_details", "truncate_tail"])
async def test_cli_verify_names_the_first_bad_seq(api: Api, kind: str) -> None:
    chain = await build_chain(api)
    expected = await tamper(api, kind)
    proc, result = await kms_audit_verify(api)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert result["valid"] is False
    assert result["first_invalid_seq"] == expected
    assert result["head_seq"] == chain.head_seq
    assert result["reason"]
    assert result == await verify_both(api)
