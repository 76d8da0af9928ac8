"""The Kubernetes KMS v2 plugin: a gRPC client built from the same proto plays kube-apiserver
over the Unix socket of a real `kms-agent k8s-plugin` process backed by a live service."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import typer
from typer.testing import CliRunner

from kms_agent import k8s_plugin
from kms_agent.k8s_plugin import KmsV2Plugin
from kms_agent.proto import _generate, kms_v2_pb2, kms_v2_pb2_grpc
from kms_client import AsyncKmsClient
from tests.clients.conftest import KMS_AGENT, Live, agent_env

pytestmark = pytest.mark.slow

KEY = "etcd"


@dataclass
class Plugin:
    live: Live
    tenant: str
    socket: Path
    proc: subprocess.Popen[bytes]
    stub: Any
    cluster_id: str

    def key_id(self, version: int) -> str:
        return f"{self.cluster_id}/{self.tenant}/{KEY}/v{version}"


def short_socket_dir() -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp paths can be longer.
    return Path(tempfile.mkdtemp(prefix="kmsp-", dir="/tmp"))


@pytest.fixture(scope="module")
def plugin(live: Live, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plugin]:
    d = tmp_path_factory.mktemp("k8s")
    tenant = live.tenant("k8s", KEY)
    token_file = live.agent_token_file(tenant, d, keys=[KEY], operations=["encrypt", "decrypt"])
    sock_dir = short_socket_dir()
    sock = sock_dir / "kms.sock"
    log = open(d / "plugin.log", "wb")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [
            KMS_AGENT, "k8s-plugin", "--socket", str(sock), "--tenant", tenant, "--key", KEY,
            "--url", live.url, "--token-file", str(token_file), "--status-cache-seconds", "0",
        ],
        env=agent_env(live, token_file, d),
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    channel = grpc.insecure_channel(f"unix:{sock}")
    stub = kms_v2_pb2_grpc.KeyManagementServiceStub(channel)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield Plugin(live, tenant, sock, proc, stub, live.admin.identity().cluster_id)
    finally:
        channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def status(p: Plugin) -> Any:
    return p.stub.Status(kms_v2_pb2.StatusRequest(), timeout=10)


def encrypt(p: Plugin, plaintext: bytes, uid: str = "uid-1") -> Any:
    return p.stub.Encrypt(kms_v2_pb2.EncryptRequest(plaintext=plaintext, uid=uid), timeout=10)


def decrypt(p: Plugin, resp: Any, uid: str = "uid-2") -> bytes:
    req = kms_v2_pb2.DecryptRequest(
        ciphertext=resp.ciphertext, uid=uid, key_id=resp.key_id, annotations=dict(resp.annotations)
    )
    out: bytes = p.stub.Decrypt(req, timeout=10).plaintext
    return out


def test_status_encrypt_decrypt_rotation(plugin: Plugin) -> None:
    p = plugin
    st = status(p)
    assert (st.version, st.healthz, st.key_id) == ("v2", "ok", p.key_id(1))
    assert status(p).key_id == st.key_id, "stable while the primary version does not change"

    seeds = [os.urandom(32) for _ in range(5)]
    written = [encrypt(p, seed, uid=f"enc-{i}") for i, seed in enumerate(seeds)]
    for seed, resp in zip(seeds, written, strict=True):
        assert resp.key_id == p.key_id(1)
        assert 0 < len(resp.ciphertext) < 1024 and seed not in resp.ciphertext
        assert decrypt(p, resp) == seed
    assert len({r.ciphertext for r in written}) == 5
    assert encrypt(p, seeds[0]).ciphertext != written[0].ciphertext, "fresh randomness per call"

    # Rotation through the API: Status reports a new key_id; new writes use it; old data decrypts.
    p.live.admin.rotate_key(p.tenant, KEY, reason="k8s rotation test")
    st2 = status(p)
    assert st2.healthz == "ok" and st2.key_id == p.key_id(2) != st.key_id
    fresh = encrypt(p, seeds[1])
    assert fresh.key_id == p.key_id(2)
    assert decrypt(p, fresh) == seeds[1]
    for seed, resp in zip(seeds, written, strict=True):
        assert decrypt(p, resp) == seed, "data written before the rotation still decrypts"

    # Another rotation: a new, never-used key_id.
    p.live.admin.rotate_key(p.tenant, KEY)
    assert status(p).key_id == p.key_id(3)
    assert len({st.key_id, st2.key_id, status(p).key_id}) == 3


def test_decrypt_rejects_foreign_or_tampered_ciphertexts(plugin: Plugin) -> None:
    p = plugin
    resp = encrypt(p, os.urandom(32))
    text = resp.ciphertext.decode()
    prefix, body = text.rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-1] ^= 1
    tampered = (prefix + ":" + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")).encode()
    # The same seed encrypted for a plain API caller (no plugin context) is not accepted either.
    other = p.live.admin.encrypt(p.tenant, KEY, b"x" * 32).ciphertext.encode()
    for bad in (tampered, other, b"\xff\xfe not ascii", b"kms:v1:short"):
        with pytest.raises(grpc.RpcError) as caught:
            p.stub.Decrypt(kms_v2_pb2.DecryptRequest(ciphertext=bad, uid="u", key_id=resp.key_id), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_socket_is_private_and_removed_on_sigterm(plugin: Plugin, live: Live, tmp_path: Path) -> None:
    mode = plugin.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    # A second instance on its own socket, stopped with SIGTERM: exits 0 and removes the socket.
    tenant = plugin.tenant
    token_file = live.agent_token_file(tenant, tmp_path, keys=[KEY], operations=["encrypt", "decrypt"])
    sock_dir = short_socket_dir()
    sock = sock_dir / "second.sock"
    sock.touch()  # a stale file that is not a socket: refused
    args = [KMS_AGENT, "k8s-plugin", "--socket", str(sock), "--tenant", tenant, "--key", KEY]
    env = agent_env(live, token_file, tmp_path)
    refused = subprocess.run(args, env=env, capture_output=True, timeout=60)
    assert refused.returncode == 1 and b"not a socket" in refused.stderr
    sock.unlink()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = kms_v2_pb2_grpc.KeyManagementServiceStub(channel)
            assert stub.Status(kms_v2_pb2.StatusRequest(), timeout=10).healthz == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


async def test_service_errors_become_grpc_errors_and_unhealthy_status(live: Live) -> None:
    """In-process server: with its token revoked, Status reports the failure in healthz (keeping
    the last key_id) and Encrypt fails with UNAUTHENTICATED."""
    tenant = live.tenant("k8s-err", KEY)
    created = live.admin.create_token("agent", "plugin", tenant=tenant)
    sock_dir = short_socket_dir()
    sock = sock_dir / "err.sock"
    stop = asyncio.Event()
    async with AsyncKmsClient(live.url, token=created.token) as kms:
        servicer = KmsV2Plugin(kms, tenant, KEY, status_cache_seconds=0)
        server = asyncio.create_task(k8s_plugin.serve(sock, servicer, stop=stop, grace_seconds=1))
        try:
            async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                stub = kms_v2_pb2_grpc.KeyManagementServiceStub(channel)
                ok = await stub.Status(kms_v2_pb2.StatusRequest(), timeout=10)
                assert ok.healthz == "ok"
                live.admin.revoke_token(created.id)
                bad = await stub.Status(kms_v2_pb2.StatusRequest(), timeout=10)
                assert bad.healthz != "ok" and "unauthenticated" in bad.healthz
                assert bad.key_id == ok.key_id and bad.version == "v2"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Encrypt(kms_v2_pb2.EncryptRequest(plaintext=b"s" * 32, uid="u"), timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            stop.set()
            await server
    assert not sock.exists()
    sock_dir.rmdir()


# -- without a service: caching of the primary version ----------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_status_caches_the_primary_version_and_encrypt_refreshes_it() -> None:
    versions = iter([1, 1, 2, 5])
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/sys/identity":
            return httpx.Response(200, json={"cluster_id": "c0ffee", "version": "x"})
        v = next(versions)
        return httpx.Response(200, json={"ciphertext": f"kms:v{v}:AAAA", "version": v})

    clock = FakeClock()
    async with AsyncKmsClient("http://kms.test", token="t", transport=httpx.MockTransport(handler)) as kms:
        servicer = KmsV2Plugin(kms, "acme", "etcd", status_cache_seconds=10, clock=clock)
        req = kms_v2_pb2.StatusRequest()
        assert (await servicer.Status(req, None)).key_id == "c0ffee/acme/etcd/v1"
        clock.now = 9.9
        assert (await servicer.Status(req, None)).key_id == "c0ffee/acme/etcd/v1"
        assert calls.count("/v1/tenants/acme/keys/etcd/encrypt") == 1, "served from the cache"
        clock.now = 10.0
        assert (await servicer.Status(req, None)).key_id == "c0ffee/acme/etcd/v1"
        assert calls.count("/v1/tenants/acme/keys/etcd/encrypt") == 2, "cache expired: probed again"
        # An Encrypt under a new primary version updates what Status reports, without a probe.
        resp = await servicer.Encrypt(kms_v2_pb2.EncryptRequest(plaintext=b"k" * 32, uid="u"), None)
        assert resp.key_id == "c0ffee/acme/etcd/v2" and resp.ciphertext == b"kms:v2:AAAA"
        assert (await servicer.Status(req, None)).key_id == "c0ffee/acme/etcd/v2"
        assert calls.count("/v1/tenants/acme/keys/etcd/encrypt") == 3
        assert calls.count("/v1/sys/identity") == 1, "cluster_id fetched once"


# -- the proto and the `kms k8s-plugin` delegation ---------------------------------------------


def test_generated_modules_match_the_proto_and_the_upstream_service_name(tmp_path: Path) -> None:
    _generate.generate(tmp_path)
    here = Path(_generate.__file__).parent
    for name in _generate.GENERATED:
        assert (tmp_path / name).read_text() == (here / name).read_text(), f"{name} is stale: regenerate"
    service = kms_v2_pb2.DESCRIPTOR.services_by_name["KeyManagementService"]
    assert service.full_name == "v2.KeyManagementService"
    assert [m.name for m in service.methods] == ["Status", "Decrypt", "Encrypt"]
    fields = {
        m: [f.name for f in kms_v2_pb2.DESCRIPTOR.message_types_by_name[m].fields]
        for m in ("StatusResponse", "EncryptRequest", "EncryptResponse", "DecryptRequest", "DecryptResponse")
    }
    assert fields == {
        "StatusResponse": ["version", "healthz", "key_id"],
        "EncryptRequest": ["plaintext", "uid"],
        "EncryptResponse": ["ciphertext", "key_id", "annotations"],
        "DecryptRequest": ["ciphertext", "uid", "key_id", "annotations"],
        "DecryptResponse": ["plaintext"],
    }


# The snippet proposed for kms_service/cli.py, verbatim (with `app` being the `kms` Typer app).
SNIPPET = '''
@app.command("k8s-plugin", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def k8s_plugin(ctx: typer.Context) -> None:
    """Kubernetes KMS v2 plugin on a Unix socket (options: kms k8s-plugin --help)."""
    from kms_agent.cli import main as agent_main

    agent_main(["k8s-plugin", *ctx.args], prog_name="kms")
'''


def test_kms_k8s_plugin_snippet_delegates_to_the_agent() -> None:
    app = typer.Typer()

    @app.command()
    def other() -> None:  # a second command, as in the real `kms` app
        pass

    exec(SNIPPET, {"app": app, "typer": typer})
    runner = CliRunner()
    helped = runner.invoke(app, ["k8s-plugin", "--help"])
    assert helped.exit_code == 0 and "Usage: kms k8s-plugin" in helped.output
    assert "--socket" in helped.output and "--token-file" in helped.output
    missing = runner.invoke(app, ["k8s-plugin", "--tenant", "t", "--key", "k"])
    assert missing.exit_code == 2 and "--socket" in missing.output
