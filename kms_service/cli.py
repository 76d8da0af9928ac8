"""The `kms` command. Operators script against these names; options may grow, names stay."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
from collections.abc import Coroutine
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from kms_service.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    help="kms-service: key management for envelope encryption.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit chain.", no_args_is_help=True)
recovery_app = typer.Typer(help="Disaster recovery.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
app.add_typer(recovery_app, name="recovery")

T = TypeVar("T")

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Overrides KMS_DATA_DIR.")]


class RoleOpt(StrEnum):
    admin = "admin"
    operator = "operator"
    auditor = "auditor"
    agent = "agent"


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def settings_of(data_dir: Path | None, **extra: Any) -> Settings:
    overrides: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        raise fail(str(exc), 2) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    from kms_service.app import StartupError
    from kms_service.db.migrate import SchemaMismatch
    from kms_service.errors import ServiceError
    from kms_service.master import MasterSecretError
    from kms_service.recovery import RecoveryError

    try:
        return asyncio.run(coro)
    except (StartupError, SchemaMismatch, MasterSecretError, RecoveryError) as exc:
        raise fail(str(exc)) from None
    except ServiceError as exc:
        raise fail(f"{exc.code}: {exc.detail}") from None
    except OSError as exc:
        raise fail(f"{type(exc).__name__}: {exc.strerror or exc}") from None


async def _with_services(settings: Settings, fn: Any) -> Any:
    from kms_service.app import build_services

    services = await build_services(settings)
    try:
        return await fn(services)
    finally:
        await services.db.dispose()


@app.command()
def init(
    data_dir: DataDir = None,
    seal: Annotated[
        Path | None,
        typer.Option(help="JSON provider config (e.g. pkcs11, aws-kms) that seals the master secret."),
    ] = None,
) -> None:
    """Create the master secret, the installation and the first admin token. Idempotent."""
    from kms_service.install import initialise
    from kms_service.seal import sealed_path

    settings = settings_of(data_dir)
    seal_config: dict[str, Any] | None = None
    if seal is not None:
        try:
            seal_config = json.loads(seal.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise fail(f"cannot read the seal config {seal}: {exc}") from None
        if not isinstance(seal_config, dict):
            raise fail(f"the seal config {seal} must be a JSON object")
    result = run(initialise(settings, seal_config=seal_config))
    if result.created_master and seal_config is not None:
        typer.echo(f"created master secret sealed by {seal_config.get('type')!r} in {sealed_path(settings)}")
    elif result.created_master:
        typer.echo(f"created master secret {settings.resolved_master_secret_file} (mode 0600)")
    if result.admin_token:
        typer.echo(f"cluster {result.cluster_id} initialised")
        typer.echo(f"admin token (shown once; also in {result.admin_token_file}, mode 0600):")
        typer.echo(result.admin_token)
    else:
        typer.echo(f"already initialised (cluster {result.cluster_id}); nothing changed")


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Apply database migrations up to this build's head."""
    from kms_service.db.migrate import head_revision, upgrade

    settings = settings_of(data_dir)
    run(upgrade(settings.resolved_database_url))
    typer.echo(f"database at revision {head_revision()}")


@app.command()
def serve(
    data_dir: DataDir = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (KMS_WORKERS).")] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT (KMS_LISTEN).")] = None,
) -> None:
    """Serve the API. Migrations must already be applied (`kms migrate`)."""
    import os

    import uvicorn

    from kms_service.app import build_services

    settings = settings_of(data_dir, workers=workers, listen=listen)

    async def preflight() -> None:  # fail here, with the reason, before forking workers
        services = await build_services(settings)
        await services.db.dispose()

    run(preflight())
    tls_options: dict[str, Any] = {}
    if settings.tls_cert_file is not None:
        from kms_service.tls import (
            TlsConfigError,
            TlsHttpToolsProtocol,
            server_ssl_context,
            ssl_context_factory,
        )

        try:
            server_ssl_context(settings)  # fail here, with the reason, before forking workers
        except TlsConfigError as exc:
            raise fail(str(exc), 2) from None
        # The factory runs again in each worker (uvicorn's Config.load()), from the environment.
        tls_options = {"ssl_context_factory": ssl_context_factory, "http": TlsHttpToolsProtocol}
    scheme = "https" if tls_options else "http"
    # Workers re-read settings from the environment: pass the CLI overrides on.
    os.environ["KMS_DATA_DIR"] = str(settings.data_dir)
    os.environ["KMS_LISTEN"] = settings.listen
    os.environ["KMS_WORKERS"] = str(settings.workers)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    base = f"{scheme}://{settings.listen}"
    typer.echo(f"kms-service on {base}  (API docs: {base}/docs)", err=True)
    uvicorn.run(
        "kms_service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=False,
        loop="uvloop",
        lifespan="on",
        **({"http": "httptools"} | tls_options),
    )


@app.command(
    "k8s-plugin",
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def k8s_plugin(ctx: typer.Context) -> None:
    """Kubernetes KMS v2 plugin on a Unix socket (options: kms k8s-plugin --help)."""
    from kms_agent.cli import main as agent_main

    agent_main(["k8s-plugin", *ctx.args], prog_name="kms")


@token_app.command("create")
def token_create(
    role: Annotated[RoleOpt, typer.Option(help="admin, operator, auditor or agent.")],
    description: Annotated[str, typer.Option(help="What the token is for.")],
    tenant: Annotated[str | None, typer.Option(help="Agent tokens: the tenant.")] = None,
    keys: Annotated[
        list[str] | None, typer.Option("--key", help="Agent tokens: allowed key (repeat).")
    ] = None,
    operations: Annotated[
        list[str] | None, typer.Option("--operation", help="Agent tokens: allowed op.")
    ] = None,
    ttl_seconds: Annotated[int | None, typer.Option(help="Expiry in seconds.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Mint a token and print it (shown once)."""
    from pydantic import ValidationError

    from kms_service.auth.principal import SYSTEM_CLI, Operation, Role
    from kms_service.auth.router import TokenCreate
    from kms_service.request import CLI_REQUEST

    try:
        body = TokenCreate.model_validate(
            {
                "role": role.value,
                "description": description,
                "tenant": tenant,
                "keys": keys,
                "operations": operations,
                "ttl_seconds": ttl_seconds,
            }
        )
    except ValidationError as exc:
        raise fail(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()), 2
        ) from None
    settings = settings_of(data_dir)

    async def go(services: Any) -> Any:
        return await services.tokens.create(
            SYSTEM_CLI,
            CLI_REQUEST,
            role=Role(body.role),
            description=body.description,
            tenant=body.tenant,
            keys=body.keys,
            operations=[Operation(o) for o in body.operations] if body.operations else None,
            ttl_seconds=body.ttl_seconds,
        )

    view, token = run(_with_services(settings, go))
    typer.echo(f"{view.id} ({view.role}) created; the token is shown once:", err=True)
    typer.echo(token)


@token_app.command("list")
def token_list(data_dir: DataDir = None) -> None:
    """List tokens (never the tokens themselves)."""
    settings = settings_of(data_dir)
    views = run(_with_services(settings, lambda s: s.tokens.list()))
    for v in views:
        state = (
            "revoked"
            if v.revoked_at
            else ("expires " + v.expires_at.isoformat() if v.expires_at else "active")
        )
        scope = f" tenant={v.tenant}" if v.tenant else ""
        typer.echo(f"{v.id}\t{v.role}\t{state}{scope}\t{v.description}")


@token_app.command("revoke")
def token_revoke(token_id: str, data_dir: DataDir = None) -> None:
    """Revoke a token by id."""
    from kms_service.auth.principal import SYSTEM_CLI
    from kms_service.request import CLI_REQUEST

    settings = settings_of(data_dir)
    run(_with_services(settings, lambda s: s.tokens.revoke(SYSTEM_CLI, CLI_REQUEST, token_id)))
    typer.echo(f"{token_id} revoked")


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None) -> None:
    """Verify the whole chain (and against the latest signed checkpoint). Exit 0 if valid, 1 if not."""
    from dataclasses import asdict

    from kms_service.audit.verify import verify_with_checkpoint

    settings = settings_of(data_dir)

    async def go(services: Any) -> Any:
        return await verify_with_checkpoint(
            services.db,
            audit_key=services.installation.audit_key.reveal(),
            sink=services.checkpoint_sink,
            public_key=services.checkpoint_key.public_key(),
            cluster_id=services.installation.cluster_id,
        )

    result = run(_with_services(settings, go))
    typer.echo(json.dumps(asdict(result)))
    if not result.valid:
        raise typer.Exit(1)


@recovery_app.command("export")
def recovery_export(
    out: Annotated[Path, typer.Option("--out", help="Where to write the bundle (created 0600).")],
    data_dir: DataDir = None,
) -> None:
    """Write the recovery bundle: salts, wrapped secrets, metadata. No secret material."""
    from kms_service.audit.chain import EventDraft
    from kms_service.audit.writer import append_events
    from kms_service.auth.principal import SYSTEM_CLI
    from kms_service.install import write_private_file
    from kms_service.recovery import build_bundle

    settings = settings_of(data_dir)

    async def go(services: Any) -> dict[str, Any]:
        bundle = await build_bundle(services.db, services.installation.master)
        async with services.db.write() as session:
            await append_events(
                session,
                [
                    EventDraft(
                        action="recovery.exported",
                        actor=SYSTEM_CLI,
                        source="cli",
                        details={"keys": len(bundle["keys"])},
                    )
                ],
                audit_key=services.installation.audit_key.reveal(),
            )
        return bundle

    bundle = run(_with_services(settings, go))
    if out.exists():
        raise fail(f"{out} exists; choose another path")
    write_private_file(out, json.dumps(bundle, indent=1, sort_keys=True) + "\n")
    typer.echo(f"wrote {out} ({len(bundle['keys'])} keys)")


@recovery_app.command("derive")
def recovery_derive(
    bundle: Annotated[Path, typer.Option("--bundle", help="A bundle from `kms recovery export`.")],
    tenant: Annotated[str, typer.Option()],
    key: Annotated[str, typer.Option()],
    version: Annotated[int, typer.Option()],
    dek_id: Annotated[str, typer.Option("--id")],
    purpose: Annotated[str, typer.Option()] = "volume",
    length: Annotated[int, typer.Option()] = 32,
    master_secret_file: Annotated[
        Path | None, typer.Option(help="Default: the data dir's master.key.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Print a DEK (standard base64) from M and the bundle alone: no server, no database."""
    from pydantic import TypeAdapter, ValidationError

    from kms_service.master import MasterSecretError, load_master_secret
    from kms_service.recovery import RecoveryError, derive_from_bundle
    from kms_service.validation import DekId, DekLength, KeyName, Purpose, TenantId

    try:
        for typ, value in (
            (TenantId, tenant),
            (KeyName, key),
            (DekId, dek_id),
            (Purpose, purpose),
            (DekLength, length),
        ):
            TypeAdapter(typ).validate_python(value, strict=True)
    except ValidationError as exc:
        raise fail(f"invalid argument: {exc.errors()[0]['msg']}", 2) from None
    path = master_secret_file or (data_dir or Path(load_settings_dir())) / "master.key"
    try:
        master = load_master_secret(path)
        doc = json.loads(bundle.read_text())
        dek, state = derive_from_bundle(
            doc,
            master,
            tenant=tenant,
            key=key,
            version=version,
            purpose=purpose,
            dek_id=dek_id,
            length=length,
        )
    except (MasterSecretError, RecoveryError) as exc:
        raise fail(str(exc)) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise fail(f"cannot read the bundle {bundle}: {exc}") from None
    if state != "enabled":
        typer.secho(f"warning: version {version} is {state}", fg=typer.colors.YELLOW, err=True)
    sys.stdout.write(base64.b64encode(dek).decode() + "\n")


def load_settings_dir() -> str:
    return str(settings_of(None).data_dir)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
