"""Agent configuration: command-line options over an optional TOML file.

``--config FILE`` (or ``$KMS_AGENT_CONFIG``; default ``/etc/kms-agent/config.toml`` when it
exists)::

    url = "https://kms.internal:8400"
    token_file = "/var/run/secrets/kms-agent/token"   # or token = "..." (prefer the file)
    ca_bundle = "/etc/kms-agent/ca.pem"
    client_cert = "/etc/kms-agent/client.pem"          # mutual TLS
    client_key = "/etc/kms-agent/client.key"
    volumes = ["/dev/disk/by-partlabel/pgdata", "/srv/images/es-0.img"]   # for `status`
    pbkdf = "argon2id"                                   # optional keyslot PBKDF overrides
    pbkdf_force_iterations = 4
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kms_agent.cryptsetup import Pbkdf
from kms_client import KmsClient

DEFAULT_CONFIG = Path("/etc/kms-agent/config.toml")


class ConfigError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class AgentConfig:
    url: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    insecure: bool = False
    timeout: float = 10.0
    volumes: tuple[str, ...] = ()
    pbkdf: str | None = None
    pbkdf_force_iterations: int | None = None

    @classmethod
    def load(cls, path: Path | None) -> AgentConfig:
        """The file at ``path`` (must exist), else the default file if present, else defaults."""
        if path is None:
            env = os.environ.get("KMS_AGENT_CONFIG")
            path = Path(env) if env else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        if path is None:
            return cls()
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: {exc}") from None
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], *, source: str = "config") -> AgentConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = set(raw) - set(known)
        if unknown:
            raise ConfigError(f"{source}: unknown settings {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name == "volumes":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{source}: volumes must be a list of paths")
                values[name] = tuple(value)
            elif name == "insecure":
                if not isinstance(value, bool):
                    raise ConfigError(f"{source}: insecure must be true or false")
                values[name] = value
            elif name == "timeout":
                if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{source}: timeout must be a positive number")
                values[name] = float(value)
            elif name == "pbkdf_force_iterations":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(f"{source}: pbkdf_force_iterations must be a positive integer")
                values[name] = value
            else:
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"{source}: {name} must be a non-empty string")
                values[name] = value
        return cls(**values)

    def override(self, **values: Any) -> AgentConfig:
        """Command-line values (those not None) win over the file."""
        given = {k: v for k, v in values.items() if v is not None and v is not False}
        if "token" in given:
            given.setdefault("token_file", None)
        elif "token_file" in given:
            given["token"] = None
        return replace(self, **given)

    def pbkdf_options(self) -> Pbkdf:
        return Pbkdf(self.pbkdf, self.pbkdf_force_iterations)

    def client(self, url: str | None = None) -> KmsClient:
        """A client of ``url`` (default the configured one) with the configured auth and TLS."""
        base = url or self.url
        if not base:
            raise ConfigError("no service URL: give --url (or KMS_AGENT_URL, or url in the config file)")
        if self.token is None and self.token_file is None:
            raise ConfigError("no credentials: give --token-file (or KMS_AGENT_TOKEN_FILE) or --token")
        try:
            return KmsClient(
                base,
                token=self.token,
                token_file=self.token_file,
                ca_bundle=self.ca_bundle,
                client_cert=self.client_cert,
                client_key=self.client_key,
                verify=not self.insecure,
                timeout=self.timeout,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot set up the client: {exc}") from None
