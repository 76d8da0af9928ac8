"""The sealed master secret: M wrapped by a key provider, never in plaintext on disk.

`kms init --seal CONFIG.json` wraps a new M with the provider described in CONFIG (any provider
type: an HSM via pkcs11, a cloud KMS, KMIP) and writes `<data dir>/master.sealed.json` (0600).
At start the service unseals it; an unreachable or refusing seal provider stops the start with a
message naming it. Secret fields of the seal config (a PIN, a client key) may be left out of the
file and given in `KMS_SEAL_SECRETS` (a JSON object), or in the file `KMS_SEAL_SECRETS_FILE` names,
instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from kms_service.master import (
    MASTER_SECRET_LEN,
    MasterSecretError,
    SecretBytes,
    create_master_secret_file,
    load_master_secret,
)
from kms_service.settings import Settings
from providers import KeyProvider, ProviderConfig, ProviderConfigError, ProviderError, parse_provider_config

SEALED_FORMAT = "kms-sealed-master/v1"
SEAL_CONTEXT = {"purpose": "kms-master-secret"}


def sealed_path(settings: Settings) -> Path:
    return settings.data_dir / "master.sealed.json"


def _seal_secrets() -> str | None:
    """Secret fields of the seal config: KMS_SEAL_SECRETS, or the file KMS_SEAL_SECRETS_FILE names."""
    path = os.environ.get("KMS_SEAL_SECRETS_FILE")
    if path:
        try:
            return Path(path).read_text()
        except OSError as exc:
            raise MasterSecretError(f"cannot read KMS_SEAL_SECRETS_FILE {path}: {exc.strerror}") from None
    return os.environ.get("KMS_SEAL_SECRETS")


def parse_seal_config(raw: dict[str, Any]) -> ProviderConfig:
    extra = _seal_secrets()
    if extra:
        try:
            more = json.loads(extra)
        except json.JSONDecodeError:
            raise MasterSecretError("KMS_SEAL_SECRETS is not a JSON object") from None
        if not isinstance(more, dict):
            raise MasterSecretError("KMS_SEAL_SECRETS is not a JSON object")
        raw = {**raw, **more}
    if raw.get("type") == "local":
        raise MasterSecretError("the local provider cannot seal the master secret it is derived from")
    try:
        return parse_provider_config(raw)
    except ProviderConfigError as exc:
        raise MasterSecretError(f"invalid seal provider config: {exc}") from None


async def _connect(config: ProviderConfig) -> KeyProvider:
    try:
        return await asyncio.wait_for(config.connect(), timeout=config.timeout_seconds * 3 + 5)
    except (ProviderError, TimeoutError) as exc:
        raise MasterSecretError(
            f"cannot connect to the seal provider {config.type!r}: {exc or 'timed out'}"
        ) from None


async def seal_new_master(settings: Settings, raw_config: dict[str, Any]) -> bool:
    """Create M and store it sealed. Returns False (nothing done) if an M already exists."""
    path = sealed_path(settings)
    if path.exists() or settings.resolved_master_secret_file.exists():
        return False
    config = parse_seal_config(raw_config)
    provider = await _connect(config)
    try:
        master = secrets.token_bytes(MASTER_SECRET_LEN)
        try:
            blob = await provider.wrap(master, context=SEAL_CONTEXT)
            check = await provider.unwrap(blob, context=SEAL_CONTEXT)
        except ProviderError as exc:
            raise MasterSecretError(f"the seal provider {config.type!r} refused: {exc}") from None
        if not hmac.compare_digest(check, master):
            raise MasterSecretError(f"the seal provider {config.type!r} failed the wrap/unwrap check")
    finally:
        await provider.close()
    # The file holds the provider config as given (secrets may come from KMS_SEAL_SECRETS instead).
    doc = {"format": SEALED_FORMAT, "provider": raw_config, "blob": base64.b64encode(blob).decode()}
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    return True


def _read_sealed(path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != SEALED_FORMAT:
            raise ValueError
        blob = base64.b64decode(doc["blob"], validate=True)
        raw = doc["provider"]
        if not isinstance(raw, dict):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, binascii.Error):
        raise MasterSecretError(f"{path} is not a sealed master secret") from None
    if path.stat().st_mode & 0o077:
        raise MasterSecretError(f"{path} is accessible by group/others: chmod 600 it")
    return raw, blob


async def unseal(path: Path) -> SecretBytes:
    raw, blob = _read_sealed(path)
    config = parse_seal_config(raw)
    provider = await _connect(config)
    try:
        master = await asyncio.wait_for(
            provider.unwrap(blob, context=SEAL_CONTEXT), timeout=config.timeout_seconds * 3 + 5
        )
    except (ProviderError, TimeoutError) as exc:
        raise MasterSecretError(
            f"cannot unseal the master secret with the seal provider {config.type!r}: {exc or 'timed out'}"
        ) from None
    finally:
        await provider.close()
    if len(master) != MASTER_SECRET_LEN:
        raise MasterSecretError("the unsealed master secret has the wrong length")
    return SecretBytes(master)


async def load_master(settings: Settings) -> SecretBytes:
    """M from the sealed file if there is one, else from the plain key file (dev default)."""
    path = sealed_path(settings)
    if path.exists():
        return await unseal(path)
    return load_master_secret(settings.resolved_master_secret_file)


async def ensure_master(settings: Settings, seal_config: dict[str, Any] | None) -> tuple[bool, SecretBytes]:
    """`kms init`: create M (sealed if asked) unless one exists; never replace it."""
    if seal_config is not None:
        created = await seal_new_master(settings, seal_config)
    elif sealed_path(settings).exists():
        created = False
    else:
        created = create_master_secret_file(settings.resolved_master_secret_file)
    return created, await load_master(settings)
