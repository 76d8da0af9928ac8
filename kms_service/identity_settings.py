"""Cross-field checks of the TLS, client-certificate and workload-identity (JWT) settings.

Kept out of settings.py so that file stays a list of fields; called from its model validator.
Each message names the variables involved (never a file's contents).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from kms_service.settings import Settings

_LOOPBACK_NAMES = {"localhost"}


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_identity_settings(s: Settings) -> None:
    """Raise ValueError (one message per problem, joined) if the combination is unusable."""
    problems: list[str] = []
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        problems.append("KMS_TLS_CERT_FILE and KMS_TLS_KEY_FILE: set both (HTTPS) or neither (HTTP)")
    tls = s.tls_cert_file is not None and s.tls_key_file is not None
    if s.tls_client_ca_file is not None and not tls:
        problems.append("KMS_TLS_CLIENT_CA_FILE needs KMS_TLS_CERT_FILE and KMS_TLS_KEY_FILE")
    if s.tls_client_cert != "none" and s.tls_client_ca_file is None:
        problems.append(
            f"KMS_TLS_CLIENT_CERT={s.tls_client_cert} needs KMS_TLS_CLIENT_CA_FILE "
            "(the CA that issues client certificates)"
        )
    if s.cert_principals_file is not None and s.tls_client_cert == "none":
        problems.append("KMS_CERT_PRINCIPALS_FILE needs KMS_TLS_CLIENT_CERT=optional or required")

    jwt_fields = {
        "KMS_JWT_ISSUER": s.jwt_issuer,
        "KMS_JWT_AUDIENCE": s.jwt_audience,
        "KMS_JWT_SUBJECTS_FILE": s.jwt_subjects_file,
    }
    any_jwt = any(v is not None for v in jwt_fields.values()) or (
        s.jwt_jwks_url is not None or s.jwt_jwks_file is not None
    )
    if any_jwt:
        missing = [name for name, value in jwt_fields.items() if not value]
        if missing:
            problems.append(f"workload identity (KMS_JWT_*) also needs {', '.join(missing)}")
        if (s.jwt_jwks_url is None) == (s.jwt_jwks_file is None):
            problems.append("set exactly one of KMS_JWT_JWKS_URL and KMS_JWT_JWKS_FILE")
        if s.jwt_jwks_url is not None:
            url = urlsplit(s.jwt_jwks_url)
            if not url.hostname or not (
                url.scheme == "https" or (url.scheme == "http" and _is_loopback(url.hostname))
            ):
                problems.append(
                    "KMS_JWT_JWKS_URL must be an https:// URL (plain http only on the loopback interface)"
                )
    if problems:
        raise ValueError("; ".join(problems))
