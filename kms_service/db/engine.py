"""The async engine, sessions and write transactions.

Writes go through :meth:`Database.write`: one transaction, serialised within the process (SQLite
has one writer anyway; on PostgreSQL the audit head row lock serialises across replicas), begun
with ``BEGIN IMMEDIATE`` on SQLite so concurrent processes wait instead of failing on upgrade.
Connection-level failures surface as :class:`DatabaseUnavailable` (503, Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from kms_service.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (ConnectionError, OSError, asyncio.TimeoutError))


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, timeout: float = 10.0, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": not self.is_sqlite}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
            kwargs["pool_timeout"] = timeout
            kwargs["connect_args"] = {"timeout": timeout, "command_timeout": timeout}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            self._configure_sqlite()
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._write_lock = asyncio.Lock()

    def _configure_sqlite(self) -> None:
        sync_engine = self.engine.sync_engine

        @event.listens_for(sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
            # Let SQLAlchemy emit BEGIN itself (the driver's implicit BEGIN is deferred).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads; closing it ends (rolls back) its transaction, and loaded
        objects stay usable, detached."""
        try:
            async with self.sessions() as session:
                yield session
        except Exception as exc:
            if _is_outage(exc):
                log.warning("database unavailable: %s", type(exc).__name__)
                raise DatabaseUnavailable("the database is unavailable; retry shortly") from exc
            raise

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """One write transaction: committed if the block returns, rolled back if it raises."""
        async with self._write_lock:
            try:
                async with self.sessions() as session:
                    if self.is_sqlite:
                        conn = await session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})
                        del conn
                    try:
                        yield session
                        await session.commit()
                    except BaseException:
                        await session.rollback()
                        raise
            except Exception as exc:
                if _is_outage(exc):
                    log.warning("database unavailable during write: %s", type(exc).__name__)
                    raise DatabaseUnavailable("the database is unavailable; nothing was changed") from exc
                raise

    async def dispose(self) -> None:
        await self.engine.dispose()
