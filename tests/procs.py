"""Running the real `kms` command and server in tests."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from kms_service.settings import Settings

KMS = str(Path(sys.executable).parent / "kms")


def kms_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env |= {"KMS_DATA_DIR": str(settings.data_dir), "KMS_DATABASE_URL": settings.resolved_database_url}
    return env | extra


def kms(
    settings: Settings, *args: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [KMS, *args], env=kms_env(settings), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kms {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(
    settings: Settings,
    *args: str,
    extra_env: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[str]:
    """`kms serve` on a free port until the block ends; yields its base URL. With ``tls`` (a client
    context trusting the server, with a client certificate if the server requires one) the
    server is expected to speak HTTPS (KMS_TLS_* in ``extra_env``) and the URL is https://."""
    port = free_port()
    env = kms_env(settings, KMS_LISTEN=f"127.0.0.1:{port}", **(extra_env or {}))
    proc = subprocess.Popen(
        [KMS, "serve", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/v1/sys/health", timeout=1, verify=tls or True).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(
                    f"kms serve did not come up:\n{proc.stdout.read() if proc.stdout else ''}"
                )
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
