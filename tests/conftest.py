"""Shared fixtures. Every storage test runs on SQLite and on the real PostgreSQL.

PostgreSQL: `KMS_TEST_POSTGRES_URL` (default postgresql+asyncpg://postgres@127.0.0.1:5432/postgres) names a
server where each test creates and drops its own database. Unreachable: skipped with the reason, unless
`KMS_TEST_REQUIRE_PEERS=1` (CI sets it), where a missing peer fails the run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from kms_service.app import Services, build_services, create_app
from kms_service.install import InitResult, initialise
from kms_service.settings import Settings

SHARED = Path(__file__).resolve().parents[2] / "shared"
VECTORS = Path(os.environ.get("KMS_VECTORS_DIR", SHARED / "vectors"))
PG_URL = os.environ.get("KMS_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
REQUIRE_PEERS = os.environ.get("KMS_TEST_REQUIRE_PEERS") == "1"


def peer_missing(reason: str) -> None:
    """Skip locally, fail where peers are required (CI)."""
    if REQUIRE_PEERS:
        pytest.fail(f"required test peer missing: {reason}")
    pytest.skip(reason)


def _dsn(url: str, database: str | None = None) -> str:
    base = url.replace("postgresql+asyncpg://", "postgresql://")
    if database is None:
        return base
    return base.rsplit("/", 1)[0] + "/" + database


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database URL of each kind."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'kms.db'}"
        return
    name = "kms_test_" + secrets.token_hex(6)
    try:
        admin = await asyncpg.connect(_dsn(PG_URL), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        peer_missing(f"PostgreSQL at {PG_URL} unreachable: {type(exc).__name__}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield PG_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin = await asyncpg.connect(_dsn(PG_URL), timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        change_poll_interval_seconds=0.05,
        pkcs11_allowed_modules=["/usr/lib/softhsm/libsofthsm2.so"],
    )


@pytest.fixture
async def installed(settings: Settings) -> InitResult:
    """`kms init` done: master secret, migrated schema, cluster row, first admin token."""
    return await initialise(settings)


@dataclass
class Api:
    """An in-process client of the app, with the admin token and the live services."""

    http: httpx.AsyncClient
    services: Services
    admin_token: str
    settings: Settings

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin_token}"}

    async def post(self, path: str, body: Any = None, token: str | None = None, **kw: Any) -> httpx.Response:
        return await self.http.post(path, json=body, headers=self.auth(token), **kw)

    async def get(self, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        return await self.http.get(path, headers=self.auth(token), **kw)

    async def tenant_and_key(self, tenant: str = "acme", key: str = "volumes") -> None:
        r = await self.post("/v1/tenants", {"id": tenant, "name": tenant.title()})
        assert r.status_code == 201, r.text
        r = await self.post(f"/v1/tenants/{tenant}/keys", {"name": key, "provider": {"type": "local"}})
        assert r.status_code == 201, r.text

    async def agent_token(self, tenant: str = "acme", **scope: Any) -> str:
        r = await self.post(
            "/v1/tokens", {"role": "agent", "tenant": tenant, "description": "test agent", **scope}
        )
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token


@pytest.fixture
async def api(
    request: pytest.FixtureRequest, settings: Settings, installed: InitResult
) -> AsyncIterator[Api]:
    """The app in-process. Any 5xx answer fails the test, unless it is marked `expect_5xx`
    (fail-closed tests that make a dependency fail on purpose)."""
    services = await build_services(settings)
    app = create_app(services=services)
    server_errors: list[str] = []

    async def record_5xx(response: httpx.Response) -> None:
        if response.status_code >= 500:
            await response.aread()
            server_errors.append(
                f"{response.request.method} {response.request.url.path} -> "
                f"{response.status_code} {response.text[:300]}"
            )

    try:
        async with LifespanManager(app):
            transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://kms.test", event_hooks={"response": [record_5xx]}
            ) as http:
                assert installed.admin_token is not None
                yield Api(http=http, services=services, admin_token=installed.admin_token, settings=settings)
    finally:
        await services.pool.close()
        await services.db.dispose()
    if server_errors and request.node.get_closest_marker("expect_5xx") is None:
        pytest.fail("server errors (a 5xx on client input is a bug):\n" + "\n".join(server_errors))
