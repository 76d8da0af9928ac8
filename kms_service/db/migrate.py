"""Schema migrations (Alembic) and the start-up check that the schema is exactly at head."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


class SchemaMismatch(Exception):
    """The database schema is not the one this build expects; the message says what to run."""


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url)
    cfg.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s")
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None
    return head


def _upgrade_sync(connection: Connection, url: str, target: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, target)


def _downgrade_sync(connection: Connection, url: str, target: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, target)


async def upgrade(url: str, target: str = "head") -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade_sync, url, target)
    finally:
        await engine.dispose()


async def downgrade(url: str, target: str = "base") -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade_sync, url, target)
    finally:
        await engine.dispose()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def check_schema(engine: AsyncEngine) -> None:
    """Refuse to run on an unmigrated, older or newer schema."""
    current = await current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaMismatch("the database has no kms schema yet: run `kms migrate` (or `kms init`)")
    script = ScriptDirectory.from_config(alembic_config(""))
    try:
        known = script.get_revision(current) is not None
    except CommandError:
        known = False
    if not known:
        raise SchemaMismatch(
            f"the database schema ({current}) is newer than this build knows (head {head}): "
            "upgrade kms-service, or run the version that migrated it"
        )
    raise SchemaMismatch(f"the database schema is at {current}, this build needs {head}: run `kms migrate`")
