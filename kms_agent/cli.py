"""The ``kms-agent`` command: LUKS volumes, sealed files and the Kubernetes KMS v2 plugin.

Exit codes: 0 success; 1 the operation failed (service error, volume or file problem,
tampering); 2 bad usage or configuration; ``status --check``: 3 when a volume needs a re-key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from kms_agent import luks, sealed
from kms_agent.config import AgentConfig, ConfigError
from kms_agent.cryptsetup import CryptsetupError
from kms_client import KmsClient, KmsError

app = typer.Typer(
    help="kms-service storage agent: LUKS volumes keyed by kms-service, sealed secrets, "
    "and the Kubernetes KMS v2 plugin.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
luks_app = typer.Typer(help="LUKS2 volumes whose key is a kms-service DEK.", no_args_is_help=True)
secret_app = typer.Typer(help="Envelope-encrypted files.", no_args_is_help=True)
app.add_typer(luks_app, name="luks")
app.add_typer(secret_app, name="secret")

T = TypeVar("T")

# -- shared options ------------------------------------------------------------------------------

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", envvar="KMS_AGENT_CONFIG", help="TOML config (default /etc/kms-agent/config.toml)."
    ),
]
UrlOpt = Annotated[str | None, typer.Option("--url", envvar="KMS_AGENT_URL", help="Service base URL.")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="KMS_AGENT_TOKEN", help="Bearer token (prefer --token-file).", show_default=False
    ),
]
TokenFileOpt = Annotated[
    str | None,
    typer.Option(
        "--token-file",
        envvar="KMS_AGENT_TOKEN_FILE",
        help="File holding the bearer token; re-read on change.",
    ),
]
CaOpt = Annotated[
    str | None, typer.Option("--ca-bundle", envvar="KMS_AGENT_CA_BUNDLE", help="CA bundle (PEM).")
]
CertOpt = Annotated[
    str | None,
    typer.Option("--client-cert", envvar="KMS_AGENT_CLIENT_CERT", help="Client certificate (mTLS)."),
]
KeyFileOpt = Annotated[
    str | None, typer.Option("--client-key", envvar="KMS_AGENT_CLIENT_KEY", help="Client key (mTLS).")
]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="Do not verify the server certificate.")]
PbkdfOpt = Annotated[
    str | None,
    typer.Option(
        "--pbkdf", envvar="KMS_AGENT_PBKDF", help="Keyslot PBKDF (default: cryptsetup's, argon2id)."
    ),
]
IterOpt = Annotated[
    int | None,
    typer.Option(
        "--pbkdf-force-iterations",
        envvar="KMS_AGENT_PBKDF_FORCE_ITERATIONS",
        min=1,
        help="Fixed PBKDF iterations instead of benchmarking "
        "(tests: --pbkdf pbkdf2 --pbkdf-force-iterations 1000).",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Say what is being done (on stderr).")]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"kms-agent: error: {message}", err=True)
    return typer.Exit(code)


def say(message: str) -> None:
    typer.echo(message, err=True)


@contextmanager
def errors() -> Iterator[None]:
    """Every expected failure as one line on stderr and an exit code; never a traceback."""
    try:
        yield
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    except KmsError as exc:
        raise fail(f"kms-service: {exc}") from None
    except (luks.LuksError, sealed.SealError, CryptsetupError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None


def _config(
    config: Path | None,
    *,
    url: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
    ca_bundle: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    insecure: bool = False,
    pbkdf: str | None = None,
    iterations: int | None = None,
) -> AgentConfig:
    return AgentConfig.load(config).override(
        url=url,
        token=token,
        token_file=token_file,
        ca_bundle=ca_bundle,
        client_cert=client_cert,
        client_key=client_key,
        insecure=insecure,
        pbkdf=pbkdf,
        pbkdf_force_iterations=iterations,
    )


def _with_client(cfg: AgentConfig, url: str | None, fn: Callable[[KmsClient], T]) -> T:
    with cfg.client(url) as kms:
        return fn(kms)


def _volume(device: str, cfg: AgentConfig, verbose: bool) -> luks.Volume:
    return luks.Volume(device, pbkdf=cfg.pbkdf_options(), log=say if verbose else (lambda _m: None))


# -- luks ----------------------------------------------------------------------------------------


@luks_app.command("format")
def luks_format(
    device: Annotated[str, typer.Argument(help="Block device or image file.")],
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id.")],
    key: Annotated[str, typer.Option("--key", help="Tenant key name.")],
    id: Annotated[str, typer.Option("--id", help="DEK id of this volume (stable, unique per volume).")],
    force: Annotated[bool, typer.Option("--force", help="Destroy an existing LUKS volume.")] = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    ca_bundle: CaOpt = None,
    client_cert: CertOpt = None,
    client_key: KeyFileOpt = None,
    insecure: InsecureOpt = False,
    pbkdf: PbkdfOpt = None,
    pbkdf_force_iterations: IterOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Format DEVICE as LUKS2 with the volume DEK (derive, purpose "volume", 64 bytes) and record
    {url, tenant, key, id, version} in a kms-service LUKS2 token."""
    with errors():
        cfg = _config(
            config,
            url=url,
            token=token,
            token_file=token_file,
            ca_bundle=ca_bundle,
            client_cert=client_cert,
            client_key=client_key,
            insecure=insecure,
            pbkdf=pbkdf,
            iterations=pbkdf_force_iterations,
        )
        if not cfg.url:
            raise ConfigError("no service URL: give --url (or KMS_AGENT_URL, or url in the config file)")
        service_url = cfg.url
        vol = _volume(device, cfg, verbose)
        token_ = _with_client(
            cfg,
            None,
            lambda kms: vol.format(kms, url=service_url, tenant=tenant, key=key, id=id, force=force),
        )
        say(
            f"{device}: LUKS2, {token_.tenant}/{token_.key} id {token_.id} "
            f"version {token_.version}, keyslot {token_.keyslot}"
        )


@luks_app.command("key")
def luks_key(
    device: Annotated[str, typer.Argument(help="Block device or image file.")],
    fd: Annotated[
        int | None, typer.Option("--fd", min=0, help="Write the key to this file descriptor.")
    ] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    ca_bundle: CaOpt = None,
    client_cert: CertOpt = None,
    client_key: KeyFileOpt = None,
    insecure: InsecureOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write the volume's raw key (verified with cryptsetup --test-passphrase) to stdout or --fd,
    e.g. `kms-agent luks key /dev/sdb | cryptsetup open --key-file=- /dev/sdb data`."""
    with errors():
        cfg = _config(
            config,
            url=url,
            token=token,
            token_file=token_file,
            ca_bundle=ca_bundle,
            client_cert=client_cert,
            client_key=client_key,
            insecure=insecure,
        )
        vol = _volume(device, cfg, verbose)
        tok = vol.read_token()
        target = fd if fd is not None else sys.stdout.fileno()
        if fd is None and os.isatty(target):
            raise fail("refusing to write a raw key to a terminal; pipe it (or use --fd)", 2)
        # The explicit URL (flag, env) wins over the one the volume records, which wins over the file's.
        service_url = url or tok.url or cfg.url
        secret, version, slot = _with_client(cfg, service_url, lambda kms: vol.unlock_key(kms, tok))
        if verbose:
            say(f"{device}: key of version {version} opens keyslot {slot}")
        view = memoryview(secret)
        while view:
            view = view[os.write(target, view) :]


@luks_app.command("rekey")
def luks_rekey(
    device: Annotated[str, typer.Argument(help="Block device or image file.")],
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    ca_bundle: CaOpt = None,
    client_cert: CertOpt = None,
    client_key: KeyFileOpt = None,
    insecure: InsecureOpt = False,
    pbkdf: PbkdfOpt = None,
    pbkdf_force_iterations: IterOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Move the volume to the key's latest version: add a keyslot for the new DEK, verify it,
    update the token, remove the old keyslot. Safe to interrupt; re-run to finish."""
    with errors():
        cfg = _config(
            config,
            url=url,
            token=token,
            token_file=token_file,
            ca_bundle=ca_bundle,
            client_cert=client_cert,
            client_key=client_key,
            insecure=insecure,
            pbkdf=pbkdf,
            iterations=pbkdf_force_iterations,
        )
        vol = _volume(device, cfg, verbose)
        tok = vol.read_token()
        before, after = _with_client(cfg, url or tok.url or cfg.url, vol.rekey)
        if before == after:
            say(f"{device}: already on the latest version ({after})")
        else:
            say(f"{device}: re-keyed from version {before} to {after}")


# -- status --------------------------------------------------------------------------------------


@app.command("status")
def status(
    paths: Annotated[
        list[str] | None, typer.Argument(help="Devices or images (default: the config's volumes).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Exit 3 when a volume is not current.")] = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    ca_bundle: CaOpt = None,
    client_cert: CertOpt = None,
    client_key: KeyFileOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Which volumes are on an old key version (token version < latest_version)."""
    with errors():
        cfg = _config(
            config,
            url=url,
            token=token,
            token_file=token_file,
            ca_bundle=ca_bundle,
            client_cert=client_cert,
            client_key=client_key,
            insecure=insecure,
        )
        targets = list(paths or cfg.volumes)
        if not targets:
            raise fail("no volumes: give paths or list them as `volumes` in the config file", 2)
        rows: list[luks.VolumeStatus] = []
        clients: dict[str, KmsClient] = {}
        try:
            for path in targets:
                try:
                    tok = luks.Volume(path).read_token()
                except (luks.LuksError, CryptsetupError) as exc:
                    rows.append(luks.VolumeStatus(path=path, state="error", error=str(exc)))
                    continue
                service_url = url or tok.url or cfg.url or ""
                if service_url not in clients:
                    clients[service_url] = cfg.client(service_url or None)
                rows.append(luks.volume_status(path, tok, clients[service_url]))
        finally:
            for c in clients.values():
                c.close()
    if as_json:
        typer.echo(json.dumps({"volumes": [r.to_json() for r in rows]}, indent=2))
    else:
        for r in rows:
            where = f"{r.tenant}/{r.key} id {r.id}" if r.tenant else "-"
            versions = f"version {r.version} latest {r.latest_version}" if r.version is not None else ""
            extra = f" ({r.error})" if r.error else ""
            typer.echo(f"{r.path}\t{r.state}\t{where}\t{versions}{extra}")
    if any(r.state == "error" for r in rows):
        raise typer.Exit(1)
    if check and any(r.state != "current" for r in rows):
        raise typer.Exit(3)


# -- secrets -------------------------------------------------------------------------------------


@secret_app.command("seal")
def secret_seal(
    src: Annotated[Path, typer.Argument(help="File to seal.")],
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id.")],
    key: Annotated[str, typer.Option("--key", help="Tenant key name.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output (default SRC.kms).")] = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, max=sealed.MAX_CHUNK_SIZE, help="Plaintext bytes per chunk.")
    ] = sealed.DEFAULT_CHUNK_SIZE,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    ca_bundle: CaOpt = None,
    client_cert: CertOpt = None,
    client_key: KeyFileOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Envelope-encrypt SRC under a fresh data key (context {"file": <basename>})."""
    with errors():
        cfg = _config(
            config,
            url=url,
            token=token,
            token_file=token_file,
            ca_bundle=ca_bundle,
            client_cert=client_cert,
            client_key=client_key,
            insecure=insecure,
        )
        dest = out or src.with_name(src.name + ".kms")
        _with_client(
            cfg,
            None,
            lambda kms: sealed.seal(
                kms, src, dest, tenant=tenant, key=key, chunk_size=chunk_size, overwrite=force
            ),
        )
        say(f"sealed {src} -> {dest}")


@secret_app.command("unseal")
def secret_unseal(
    src: Annotated[Path, typer.Argument(help="Sealed file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the plaintext.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Expected original file name (default: the header's).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    ca_bundle: CaOpt = None,
    client_cert: CertOpt = None,
    client_key: KeyFileOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Decrypt SRC into OUT; nothing is written unless every chunk authenticates."""
    with errors():
        cfg = _config(
            config,
            url=url,
            token=token,
            token_file=token_file,
            ca_bundle=ca_bundle,
            client_cert=client_cert,
            client_key=client_key,
            insecure=insecure,
        )
        _with_client(cfg, None, lambda kms: sealed.unseal(kms, src, out, name=name, overwrite=force))
        say(f"unsealed {src} -> {out}")


# -- Kubernetes ----------------------------------------------------------------------------------


@app.command("k8s-plugin")
def k8s_plugin(
    socket: Annotated[Path, typer.Option("--socket", help="Unix socket to serve on.")],
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id.")],
    key: Annotated[str, typer.Option("--key", help="Tenant key name.")],
    status_cache_seconds: Annotated[
        float,
        typer.Option("--status-cache-seconds", min=0, help="How long Status reuses the primary version."),
    ] = 5.0,
    config: ConfigOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    ca_bundle: CaOpt = None,
    client_cert: CertOpt = None,
    client_key: KeyFileOpt = None,
    insecure: InsecureOpt = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Kubernetes KMS v2 plugin (v2.KeyManagementService) on a Unix socket, backed by TENANT/KEY."""
    from kms_agent.k8s_plugin import KmsV2Plugin, serve
    from kms_client import AsyncKmsClient

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_level.lower() != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per kube-apiserver call
    with errors():
        cfg = _config(
            config,
            url=url,
            token=token,
            token_file=token_file,
            ca_bundle=ca_bundle,
            client_cert=client_cert,
            client_key=client_key,
            insecure=insecure,
        )
        if not cfg.url:
            raise ConfigError("no service URL: give --url (or KMS_AGENT_URL, or url in the config file)")
        if cfg.token is None and cfg.token_file is None:
            raise ConfigError("no credentials: give --token-file (or KMS_AGENT_TOKEN_FILE) or --token")
        service_url = cfg.url

        async def run() -> None:
            async with AsyncKmsClient(
                service_url,
                token=cfg.token,
                token_file=cfg.token_file,
                ca_bundle=cfg.ca_bundle,
                client_cert=cfg.client_cert,
                client_key=cfg.client_key,
                verify=not cfg.insecure,
                timeout=cfg.timeout,
            ) as kms:
                plugin = KmsV2Plugin(kms, tenant, key, status_cache_seconds=status_cache_seconds)
                await serve(socket, plugin)

        asyncio.run(run())


def main(argv: list[str] | None = None, prog_name: str = "kms-agent") -> Any:
    """Console entry point; ``argv`` and ``prog_name`` let another CLI delegate to it
    (``kms k8s-plugin ...`` runs ``main(["k8s-plugin", ...], prog_name="kms")``)."""
    return app(args=argv, prog_name=prog_name)
