"""`kms init`: the master secret, the installation row and the first admin token. Idempotent."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from kms_service import crypto
from kms_service.app import StartupError
from kms_service.audit.chain import EventDraft
from kms_service.audit.writer import AuditBatcher, append_events, utcnow
from kms_service.auth.principal import SYSTEM_CLI, Role
from kms_service.auth.tokens import TokenCache, TokenService
from kms_service.db.engine import Database
from kms_service.db.migrate import upgrade
from kms_service.db.models import Cluster
from kms_service.master import Installation
from kms_service.request import CLI_REQUEST
from kms_service.seal import ensure_master
from kms_service.settings import Settings


@dataclass(frozen=True, slots=True)
class InitResult:
    created_master: bool
    created_cluster: bool
    cluster_id: str
    admin_token: str | None
    admin_token_file: Path | None


def write_private_file(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)


async def initialise(settings: Settings, *, seal_config: dict[str, Any] | None = None) -> InitResult:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    created_master, master = await ensure_master(settings, seal_config)
    await upgrade(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    try:
        async with db.write() as session:
            cluster = (await session.scalars(select(Cluster))).one_or_none()
            created_cluster = cluster is None
            if cluster is None:
                salt = secrets.token_bytes(32)
                cluster = Cluster(
                    id=1,
                    cluster_salt=salt,
                    cluster_id=crypto.cluster_id(master_secret=master.reveal(), cluster_salt=salt),
                    created_at=utcnow(),
                )
                session.add(cluster)
                await session.flush()
                inst = Installation.derive(master=master, cluster_salt=salt)
                await append_events(
                    session,
                    [
                        EventDraft(
                            action="cluster.initialised",
                            actor=SYSTEM_CLI,
                            source=CLI_REQUEST.source,
                            details={"cluster_id": cluster.cluster_id},
                        )
                    ],
                    audit_key=inst.audit_key.reveal(),
                )
        installation = Installation.derive(master=master, cluster_salt=cluster.cluster_salt)
        if installation.cluster_id != cluster.cluster_id:
            raise StartupError(
                "the master secret does not belong to the installation in this database "
                f"(cluster {cluster.cluster_id})"
            )
        token: str | None = None
        token_file: Path | None = None
        if created_cluster:
            tokens = TokenService(
                db, installation, AuditBatcher(db, audit_key=b""), TokenCache(max_entries=1, max_age=1)
            )
            _, token = await tokens.create(
                SYSTEM_CLI, CLI_REQUEST, role=Role.ADMIN, description="first admin token (kms init)"
            )
            token_file = settings.data_dir / "admin-token"
            if token_file.exists():
                token_file.unlink()
            write_private_file(token_file, token + "\n")
        return InitResult(created_master, created_cluster, installation.cluster_id, token, token_file)
    finally:
        await db.dispose()
