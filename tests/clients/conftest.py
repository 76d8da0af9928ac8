"""One real `kms serve` (SQLite) for the whole tests/clients directory.

The server's storage is tested on both databases elsewhere; these tests exercise the SDK, the
agent and the plugin against the real HTTP API. Each test module makes its own tenant(s), so
modules do not see each other's keys.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kms_client import KmsClient
from kms_service.settings import Settings
from tests.procs import kms, running_server

KMS_AGENT = str(Path(sys.executable).parent / "kms-agent")
TEST_PBKDF = {"KMS_AGENT_PBKDF": "pbkdf2", "KMS_AGENT_PBKDF_FORCE_ITERATIONS": "1000"}


@dataclass
class Live:
    """The running service: its URL, the admin token and an admin client."""

    url: str
    admin_token: str
    admin: KmsClient
    root: Path

    def tenant(self, prefix: str, *keys: str) -> str:
        """A fresh tenant with local-provider keys ``keys``."""
        tenant = f"{prefix}-{secrets.token_hex(3)}"
        self.admin.create_tenant(tenant, prefix.title())
        for key in keys:
            self.admin.create_key(tenant, key)
        return tenant

    def agent_token_file(self, tenant: str, directory: Path, **scope: object) -> Path:
        """An agent token for ``tenant``, written to a 0600 file (as an agent would hold it)."""
        created = self.admin.create_token("agent", "test agent", tenant=tenant, **scope)  # type: ignore[arg-type]
        path = directory / f"agent-token-{created.id}"
        path.write_text(created.token)
        path.chmod(0o600)
        return path


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("kms")
    settings = Settings(data_dir=root / "data")
    token = kms(settings, "init").stdout.strip().splitlines()[-1]
    assert token.startswith("kms_")
    with running_server(settings) as base, KmsClient(base, token=token) as admin:
        yield Live(url=base, admin_token=token, admin=admin, root=root)


def agent_env(live: Live, token_file: Path, lock_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for `kms-agent` subprocesses: service URL, token file, test PBKDF."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMS_AGENT_", "KMS_"))}
    env |= {
        "KMS_AGENT_URL": live.url,
        "KMS_AGENT_TOKEN_FILE": str(token_file),
        "KMS_AGENT_LOCK_DIR": str(lock_dir),
        "KMS_AGENT_CONFIG": "/dev/null",
        **TEST_PBKDF,
    }
    return env | extra
