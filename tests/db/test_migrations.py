"""Migrations on both databases: upgrade from empty, downgrade to base, no drift; the service
refuses to start on an unmigrated or a newer schema, saying what to run."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from kms_service.app import StartupError, build_services
from kms_service.db.migrate import SchemaMismatch, check_schema, downgrade, head_revision, upgrade
from kms_service.db.models import Base
from kms_service.settings import Settings


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(ctx, Base.metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


async def test_upgrade_downgrade_and_no_drift(db_url: str) -> None:
    engine = create_async_engine(db_url)
    try:
        await upgrade(db_url)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == [], "models and migrations differ: add a revision"
            tables = await conn.run_sync(_tables)
        assert set(Base.metadata.tables) <= tables
        await check_schema(engine)  # at head: accepted

        await downgrade(db_url, "base")
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) <= {"alembic_version"}

        await upgrade(db_url)  # and back up again, cleanly
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_refuses_unmigrated_database(settings: Settings) -> None:
    with pytest.raises(SchemaMismatch, match="kms migrate"):
        await build_services(settings)


async def test_refuses_newer_schema(db_url: str) -> None:
    await upgrade(db_url)
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        with pytest.raises(SchemaMismatch, match="newer than this build"):
            await check_schema(engine)
    finally:
        await engine.dispose()


async def test_refuses_older_schema(db_url: str) -> None:
    await upgrade(db_url)
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM alembic_version"))
        with pytest.raises(SchemaMismatch, match="kms migrate"):
            await check_schema(engine)
    finally:
        await engine.dispose()
    assert head_revision()


async def test_refuses_migrated_but_uninitialised(settings: Settings) -> None:
    await upgrade(settings.resolved_database_url)
    with pytest.raises(StartupError, match="kms init"):
        await build_services(settings)
