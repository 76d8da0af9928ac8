"""The master secret M and the installation keys derived from it.

The dev default keeps M as base64 in `<data dir>/master.key` (mode 0600). Nothing here ever puts
M, or a key derived from it, into a repr, a log line or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from kms_service import crypto

MASTER_SECRET_LEN = 32


class MasterSecretError(Exception):
    """M is missing, unreadable, malformed or too openly readable."""


class SecretBytes:
    """Holds key material; repr/str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"SecretBytes(<{len(self._value)} bytes redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretBytes) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(len(self._value))


def create_master_secret_file(path: Path) -> bool:
    """Create M at ``path`` (0600) unless a file is already there. Returns True if created."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = base64.b64encode(secrets.token_bytes(MASTER_SECRET_LEN)) + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def load_master_secret(path: Path) -> SecretBytes:
    """Read M from ``path``. Refuses a file readable by group or others."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MasterSecretError(f"no master secret at {path}: run `kms init`") from None
    except OSError as exc:
        raise MasterSecretError(f"cannot read the master secret file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterSecretError(f"the master secret file {path} is accessible by group/others: chmod 600 it")
    try:
        raw = base64.b64decode(path.read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MasterSecretError(f"the master secret file {path} is not base64") from None
    if len(raw) != MASTER_SECRET_LEN:
        raise MasterSecretError(f"the master secret in {path} must be {MASTER_SECRET_LEN} bytes")
    return SecretBytes(raw)


@dataclass(frozen=True, slots=True, repr=False)
class Installation:
    """M, the public cluster salt, and the installation-wide keys derived from them."""

    master: SecretBytes
    cluster_salt: bytes
    cluster_id: str
    audit_key: SecretBytes
    local_wrapping_key: SecretBytes
    config_secrets_key: SecretBytes

    @classmethod
    def derive(cls, *, master: SecretBytes, cluster_salt: bytes) -> Installation:
        m = master.reveal()
        return cls(
            master=master,
            cluster_salt=cluster_salt,
            cluster_id=crypto.cluster_id(master_secret=m, cluster_salt=cluster_salt),
            audit_key=SecretBytes(crypto.audit_key(master_secret=m, cluster_salt=cluster_salt)),
            local_wrapping_key=SecretBytes(
                crypto.purpose_key(master_secret=m, cluster_salt=cluster_salt, purpose="local-wrap")
            ),
            config_secrets_key=SecretBytes(
                crypto.purpose_key(master_secret=m, cluster_salt=cluster_salt, purpose="config-secrets")
            ),
        )

    def __repr__(self) -> str:
        return f"Installation(cluster_id={self.cluster_id!r})"
