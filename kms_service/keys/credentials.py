"""Write-only provider credentials (KMIP client key, PKCS#11 PIN, cloud secrets).

A key's provider config is split at creation: the public part is stored as JSON and returned by
the API; the fields its config class lists in `secret_fields` are sealed with AES-256-GCM under
HKDF(M, cluster_salt, enc("kms/v1","config-secrets"), 32), bound (AAD) to the tenant and key, and
only ever opened in memory to connect to the provider.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretBytes, SecretStr

from kms_service import crypto
from providers import ProviderConfig, parse_provider_config

_FORMAT = b"\x01"
_NONCE_LEN = 12


class CredentialsError(Exception):
    """Stored credentials could not be opened (wrong master secret, or altered rows)."""


def _aad(tenant: str, key: str) -> bytes:
    return crypto.enc("kms/v1", "config-secrets", tenant, key)


def _reveal(value: Any) -> Any:
    if isinstance(value, (SecretStr, SecretBytes)):
        return value.get_secret_value()
    return value


def split_config(config: ProviderConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public part as stored and shown, secret part to seal). Unset secrets are omitted."""
    public = config.public_view()
    secret = {
        name: _reveal(getattr(config, name))
        for name in sorted(config.secret_fields)
        if getattr(config, name, None) is not None
    }
    return public, secret


def seal_credentials(secret: dict[str, Any], *, sealing_key: bytes, tenant: str, key: str) -> bytes | None:
    if not secret:
        return None
    nonce = os.urandom(_NONCE_LEN)
    body = json.dumps(secret, sort_keys=True, separators=(",", ":")).encode()
    return _FORMAT + nonce + AESGCM(sealing_key).encrypt(nonce, body, _aad(tenant, key))


def open_credentials(blob: bytes | None, *, sealing_key: bytes, tenant: str, key: str) -> dict[str, Any]:
    if blob is None:
        return {}
    if len(blob) < 1 + _NONCE_LEN + 16 or blob[:1] != _FORMAT:
        raise CredentialsError(f"stored credentials of {tenant}/{key} are malformed")
    try:
        body = AESGCM(sealing_key).decrypt(
            blob[1 : 1 + _NONCE_LEN], blob[1 + _NONCE_LEN :], _aad(tenant, key)
        )
    except InvalidTag:
        raise CredentialsError(f"stored credentials of {tenant}/{key} do not open") from None
    opened: dict[str, Any] = json.loads(body)
    return opened


def full_config(
    public: dict[str, Any], sealed: bytes | None, *, sealing_key: bytes, tenant: str, key: str
) -> ProviderConfig:
    """The connectable config: the stored public part plus the opened credentials."""
    secret = open_credentials(sealed, sealing_key=sealing_key, tenant=tenant, key=key)
    return parse_provider_config({**public, **secret})
