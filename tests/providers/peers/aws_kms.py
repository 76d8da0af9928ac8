"""The `aws-kms` peer: moto in server mode (TESTING.md), reached through a pausable TCP proxy.

One in-process moto server per test session (``ThreadedMotoServer`` on a free loopback port);
each test gets a fresh symmetric key and its own proxy in front of moto. The provider's
``endpoint_url`` is the proxy, so an outage started *after* the provider connected (the proxy
stops forwarding and holds the connections, like a black-holed network) is seen by that provider.

moto does not enforce key state (a disabled or pending-deletion key still encrypts and decrypts),
so ``disable`` is None here: disabled-key handling is tested with botocore's Stubber in
tests/providers/test_aws_kms.py.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr

from providers.aws_kms import AwsKmsConfig
from tests.conftest import peer_missing
from tests.providers.conftest import Peer

REGION = "us-east-1"
# moto accepts any credentials unless IAM checks are on; these are the AWS documentation examples.
DUMMY_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
DUMMY_SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@dataclass(frozen=True)
class MotoEndpoint:
    url: str
    port: int

    def client(self, service: str, *, account: str | None = None, **kwargs: Any) -> Any:
        """A boto3 client on moto with dummy credentials; ``account`` selects a moto account."""
        import boto3

        kwargs.setdefault("aws_access_key_id", DUMMY_ACCESS_KEY_ID)
        kwargs.setdefault("aws_secret_access_key", DUMMY_SECRET_ACCESS_KEY)
        client = boto3.client(service, region_name=REGION, endpoint_url=self.url, **kwargs)
        if account is not None:

            def set_account(request: Any, **_: Any) -> None:
                request.headers["x-moto-account-id"] = account

            client.meta.events.register("before-sign", set_account)
        return client


@pytest.fixture(scope="session", name="aws_moto_endpoint")
def fixture_aws_moto_endpoint() -> Iterator[MotoEndpoint]:
    """moto on a free 127.0.0.1 port for the whole session (port 0: the OS picks, no race)."""
    try:
        import boto3  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # the aws extra or moto[server] is not installed
        peer_missing(f"aws-kms peer needs boto3 and moto[server]: {exc.name} missing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield MotoEndpoint(url=f"http://{host}:{port}", port=port)
    finally:
        server.stop()


class PausableProxy:
    """A TCP proxy on 127.0.0.1 to ``target_port``, with an outage switch.

    While paused it keeps accepting connections and reading requests but forwards nothing, so a
    client waits until its own read timeout, as behind a black-holed network. On resume every
    connection that carried data during the pause is closed (those requests are lost)."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not self._forwarding.is_set():
                    self._forwarding.wait()  # outage: hold the request, never deliver it
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv (close alone does not)
        sock.close()

    def pause(self) -> None:
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    def close(self) -> None:
        self._closed.set()
        self._forwarding.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            self._drop(sock)
        for thread in threads:
            thread.join(timeout=5)


@pytest.fixture(name="aws_kms_proxy")
def fixture_aws_kms_proxy(aws_moto_endpoint: MotoEndpoint) -> Iterator[PausableProxy]:
    """A fresh proxy in front of moto for each test (its outage switch is per test)."""
    proxy = PausableProxy(aws_moto_endpoint.port)
    try:
        yield proxy
    finally:
        proxy.close()


def kms_config(endpoint_url: str, key_arn: str, **overrides: Any) -> AwsKmsConfig:
    values: dict[str, Any] = {
        "region": REGION,
        "key_id": key_arn,
        "endpoint_url": endpoint_url,
        "timeout_seconds": 2,
        "access_key_id": SecretStr(DUMMY_ACCESS_KEY_ID),
        "secret_access_key": SecretStr(DUMMY_SECRET_ACCESS_KEY),
    }
    values.update(overrides)
    return AwsKmsConfig(**values)


@pytest.fixture
def peer_aws_kms(aws_moto_endpoint: MotoEndpoint, aws_kms_proxy: PausableProxy) -> Peer:
    metadata = aws_moto_endpoint.client("kms").create_key(
        KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT", Description="conformance"
    )["KeyMetadata"]
    account = metadata["AWSAccountId"]

    @asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        aws_kms_proxy.pause()
        try:
            yield
        finally:
            aws_kms_proxy.resume()

    return Peer(
        name="aws-kms",
        config=kms_config(aws_kms_proxy.url, metadata["Arn"]),
        unknown_key=kms_config(aws_kms_proxy.url, f"arn:aws:kms:{REGION}:{account}:key/{uuid.uuid4()}"),
        disable=None,
        outage=outage,
        notes=(
            "moto does not enforce key state (disabled keys still work, TESTING.md); "
            "disabled keys are covered with botocore's Stubber in test_aws_kms.py"
        ),
    )
