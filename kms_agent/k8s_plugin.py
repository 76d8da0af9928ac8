"""Kubernetes KMS v2 plugin: kube-apiserver's ``v2.KeyManagementService`` on a Unix socket,
backed by one tenant key of kms-service.

- ``Encrypt(plaintext)`` (the DEK seed the API server generated) → ``POST encrypt`` with the
  fixed context :data:`CONTEXT`; the ciphertext is the service's text form as bytes.
- ``Decrypt(ciphertext)`` → ``POST decrypt`` with the same context. The ciphertext carries its
  key version, so data written before a rotation still decrypts.
- ``key_id`` = ``"<cluster_id>/<tenant>/<key>/v<version>"``: the key's primary version, stable
  while it is primary, changing exactly when a rotation makes a new version primary, and never
  reused (versions only grow; ``cluster_id`` from ``GET /v1/sys/identity`` tells installations
  apart). kube-apiserver compares it with the key_id stored beside each object to find data to
  re-encrypt after a rotation.
- ``Status`` → ``healthz`` "ok" when the service encrypts, ``version`` "v2" and the current
  ``key_id``. The primary version comes from an encrypt probe (agent tokens cannot read key
  metadata; a probe also proves the whole path works), cached for ``status_cache_seconds``;
  every Encrypt refreshes the cache too.

Run it as ``kms-agent k8s-plugin --socket /var/run/kmsplugin/socket.sock --tenant T --key K
--url https://kms:8400 --token-file /var/run/secrets/kms/token`` and point the API server's
EncryptionConfiguration at it (``kms: {apiVersion: v2, name: kms-service, endpoint:
unix:///var/run/kmsplugin/socket.sock}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]

from kms_agent.proto import kms_v2_pb2, kms_v2_pb2_grpc
from kms_client import (
    AsyncKmsClient,
    Conflict,
    DecryptionFailed,
    Forbidden,
    InvalidRequest,
    KmsError,
    KmsTransportError,
    NotFound,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("kms_agent.k8s_plugin")

API_VERSION = "v2"
CONTEXT = {"kms-plugin": "kubernetes-kms-v2"}
PROBE = b""
MAX_KEY_ID = 1024


def grpc_code(exc: KmsError) -> Any:
    if isinstance(exc, InvalidRequest | DecryptionFailed):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, Forbidden):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, Conflict):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, Unavailable | RateLimited | KmsTransportError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class KmsV2Plugin:
    """The servicer; methods have the names and signatures of the gRPC service."""

    def __init__(
        self,
        kms: AsyncKmsClient,
        tenant: str,
        key: str,
        *,
        status_cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kms = kms
        self._tenant = tenant
        self._key = key
        self._ttl = status_cache_seconds
        self._clock = clock
        self._cluster_id: str | None = None
        self._current: tuple[float, int] | None = None  # (when seen, primary version)
        self._probe_lock = asyncio.Lock()

    async def key_id(self, version: int) -> str:
        if self._cluster_id is None:
            self._cluster_id = (await self._kms.identity()).cluster_id
        key_id = f"{self._cluster_id}/{self._tenant}/{self._key}/v{version}"
        if not key_id or len(key_id.encode()) >= MAX_KEY_ID:
            raise ValueError("key_id too long")
        return key_id

    def _saw(self, version: int) -> None:
        self._current = (self._clock(), version)

    async def primary_version(self) -> int:
        """The key's primary version, from the cache when fresh, else an encrypt probe."""
        async with self._probe_lock:
            if self._current is not None and self._clock() - self._current[0] < self._ttl:
                return self._current[1]
            probe = await self._kms.encrypt(self._tenant, self._key, PROBE, context=CONTEXT)
            self._saw(probe.version)
            return probe.version

    # -- the gRPC methods ------------------------------------------------------------------

    async def Status(self, request: kms_v2_pb2.StatusRequest, context: Any) -> kms_v2_pb2.StatusResponse:  # noqa: N802
        try:
            key_id = await self.key_id(await self.primary_version())
        except KmsError as exc:
            log.warning("status: %s", exc)
            last = self._current[1] if self._current else None
            fallback = await self._key_id_or_unknown(last)
            return kms_v2_pb2.StatusResponse(
                version=API_VERSION, healthz=f"kms-service: {exc.code}: {exc.detail}"[:512], key_id=fallback
            )
        return kms_v2_pb2.StatusResponse(version=API_VERSION, healthz="ok", key_id=key_id)

    async def _key_id_or_unknown(self, version: int | None) -> str:
        if version is None or self._cluster_id is None:
            return "unknown"
        return await self.key_id(version)

    async def Encrypt(self, request: kms_v2_pb2.EncryptRequest, context: Any) -> kms_v2_pb2.EncryptResponse:  # noqa: N802
        try:
            result = await self._kms.encrypt(self._tenant, self._key, request.plaintext, context=CONTEXT)
            key_id = await self.key_id(result.version)
        except KmsError as exc:
            log.warning("encrypt uid=%s: %s", request.uid, exc)
            await context.abort(grpc_code(exc), f"{exc.code}: {exc.detail}")
            raise  # abort raises; unreachable
        self._saw(result.version)
        return kms_v2_pb2.EncryptResponse(ciphertext=result.ciphertext.encode("ascii"), key_id=key_id)

    async def Decrypt(self, request: kms_v2_pb2.DecryptRequest, context: Any) -> kms_v2_pb2.DecryptResponse:  # noqa: N802
        try:
            ciphertext = request.ciphertext.decode("ascii")
        except UnicodeDecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "ciphertext is not a kms-service ciphertext"
            )
            raise
        try:
            result = await self._kms.decrypt(self._tenant, self._key, ciphertext, context=CONTEXT)
        except KmsError as exc:
            log.warning("decrypt uid=%s key_id=%s: %s", request.uid, request.key_id, exc)
            await context.abort(grpc_code(exc), f"{exc.code}: {exc.detail}")
            raise
        return kms_v2_pb2.DecryptResponse(plaintext=result.plaintext)


def _prepare_socket(socket_path: Path) -> Path:
    """The absolute path, with a stale socket of a previous run removed (anything else there
    is an error)."""
    socket_path = socket_path.absolute()
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(socket_path.lstat().st_mode):
            raise FileExistsError(f"{socket_path} exists and is not a socket")
        socket_path.unlink()
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    return socket_path


async def serve(
    socket_path: Path,
    plugin: KmsV2Plugin,
    *,
    stop: asyncio.Event | None = None,
    grace_seconds: float = 5.0,
) -> None:
    """Serve ``plugin`` on ``socket_path`` (mode 0600) until ``stop`` is set or SIGTERM/SIGINT."""
    socket_path = _prepare_socket(socket_path)
    server = grpc.aio.server()
    kms_v2_pb2_grpc.add_KeyManagementServiceServicer_to_server(plugin, server)
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
    finally:
        os.umask(old_umask)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log.info("KMS v2 plugin for %s/%s listening on %s", plugin._tenant, plugin._key, socket_path)
    try:
        await stop.wait()
    finally:
        await server.stop(grace_seconds)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
