"""TLS termination for `kms serve`: the server SSL context and the peer certificate in the scope.

The context is built here (not from uvicorn's ``ssl_*`` options) so that TLS 1.2 is the floor and
client certificates follow ``KMS_TLS_CLIENT_CERT``. uvicorn calls :func:`ssl_context_factory` from
``Config.load()``, which runs in every worker process, so each worker builds its own context from
the settings in its environment.

uvicorn (0.54) does not put the client certificate into the ASGI scope. :class:`TlsHttpToolsProtocol`
adds the ASGI TLS extension (``scope["extensions"]["tls"]``) with ``client_cert_chain`` holding the
verified leaf certificate (PEM), read from the connection's ``ssl_object``. The certificate is only
there when the handshake verified it against ``KMS_TLS_CLIENT_CA_FILE``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kms_service.settings import Settings, load_settings

_VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TlsConfigError(Exception):
    """The TLS files could not be loaded; the message names the variable, never file contents."""


def server_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The server context: TLS 1.2 or newer, the service certificate, client certs per settings."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise TlsConfigError("KMS_TLS_CERT_FILE and KMS_TLS_KEY_FILE are not set")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except FileNotFoundError as exc:
        raise TlsConfigError(f"KMS_TLS_CERT_FILE/KMS_TLS_KEY_FILE: no such file {exc.filename}") from None
    except OSError as exc:  # ssl.SSLError is an OSError
        raise TlsConfigError(
            "KMS_TLS_CERT_FILE/KMS_TLS_KEY_FILE: cannot load the certificate and key "
            f"({settings.tls_cert_file}, {settings.tls_key_file}): {_reason(exc)}"
        ) from None
    if settings.tls_client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=settings.tls_client_ca_file)
        except OSError as exc:
            raise TlsConfigError(
                f"KMS_TLS_CLIENT_CA_FILE: cannot load {settings.tls_client_ca_file}: {_reason(exc)}"
            ) from None
    ctx.verify_mode = _VERIFY_MODES[settings.tls_client_cert]
    return ctx


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or "invalid PEM")
    return exc.strerror or type(exc).__name__


def ssl_context_factory(config: Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's ``ssl_context_factory``: runs in each worker; settings come from the environment."""
    return server_ssl_context(load_settings())


TLS_EXTENSION = "tls"


class TlsHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the ASGI TLS extension (the verified client certificate)."""

    _tls_extension: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object: ssl.SSLObject | ssl.SSLSocket | None = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            self._tls_extension = None
            return
        der = ssl_object.getpeercert(binary_form=True)
        self._tls_extension = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": None,
            "cipher_suite": None,
        }

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls_extension is not None:
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[TLS_EXTENSION] = self._tls_extension


def peer_certificate_pem(scope: dict[str, Any] | Any) -> str | None:
    """The verified client certificate (PEM) of this request's connection, if any."""
    try:
        chain = scope.get("extensions", {}).get(TLS_EXTENSION, {}).get("client_cert_chain") or []
    except AttributeError:
        return None
    first = chain[0] if chain else None
    return first if isinstance(first, str) else None
