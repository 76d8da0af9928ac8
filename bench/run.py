"""HTTP benchmark harness for the data plane (performance issue 6). Prints figures; asserts nothing.

    .venv/bin/python bench/run.py                      # default: 10 s per figure, ~6 min
    .venv/bin/python bench/run.py --duration 5 --warmup 1 --backends sqlite --workers 1
    .venv/bin/python bench/run.py --size --kmip         # + flat-with-size (~4 min more) and PyKMIP
    .venv/bin/python bench/run.py --profile-only --profile 3000   # cProfile + what-if, ~30 s

In one run on one machine it:

* measures raw single-core HKDF (derive_dek) in-process: the yardstick for batch derive;
* starts the ceiling (bench/ceiling.py: bare FastAPI + one HKDF) under uvicorn with the service's
  flags (uvloop, httptools, no access log) with 1 and 2 workers, and drives it with wrk;
* for each backend (PostgreSQL: a fresh database; SQLite) and each worker count: a fresh data dir,
  ``kms init``, ``kms serve --workers N``, a tenant, a local key and an agent token made through the
  API, then wrk (bench/post.lua, 64 connections, 2 threads, --latency) on derive (a new id per
  request), a batch derive of 100 ids, datakey, decrypt of one pre-made ciphertext and encrypt of
  4 KiB; RSS (VmRSS) and the CPU share of every uvicorn worker process are read from /proc;
* drives moto's KMS GenerateDataKey and our datakey (PostgreSQL, most workers) with the SAME Python
  client (asyncio + httpx, N tasks, fixed duration; the SigV4 signature for moto is made once with
  botocore and reused, so the client does the same work for both), and moto with wrk as well;
* optionally (--kmip) PyKMIP create+get pairs/s with PyKMIP's client, and (--size) derive across
  10,000 keys and after padding the audit table, against derive on one key of the same server;
* optionally (--profile) cProfiles derive requests in-process through the ASGI app (no uvicorn) and
  prints where the time goes by package.

wrk and the servers share the machine's cores: figures are relative, compare them only within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = Path(sys.executable).parent
KMS = str(BIN / "kms")
LUA = str(BENCH / "post.lua")
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ALL_OPS = ["derive", "datakey", "encrypt", "decrypt", "rewrap"]


# --- small helpers -------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pids(main_pid: int) -> list[int]:
    """uvicorn's worker processes: spawned children with --workers > 1, else the process itself."""
    spawned = [c for c in children(main_pid) if "spawn_main" in cmdline(c)]
    return spawned or [main_pid]


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return 0


def all_ticks() -> dict[int, tuple[str, int]]:
    """(comm, utime + stime) of every process."""
    out: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                raw = Path(f"/proc/{entry}/stat").read_text()
                comm = raw[raw.index("(") + 1 : raw.rindex(")")]
                fields = raw.rpartition(")")[2].split()
                out[int(entry)] = (comm, int(fields[11]) + int(fields[12]))
    return out


def others_share(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], mine: set[int]
) -> dict[str, float]:
    """Jiffies used during a run by groups of processes: wrk, postgres, this harness's servers, others."""
    groups = {"wrk": 0.0, "postgres": 0.0, "other": 0.0}
    for pid, (comm, ticks) in after.items():
        used = ticks - before.get(pid, (comm, 0))[1]
        if used <= 0 or pid in mine:
            continue
        if comm == "wrk":
            groups["wrk"] += used
        elif comm.startswith("postgres"):
            groups["postgres"] += used
        else:
            groups["other"] += used
    return groups


def machine_ticks() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up (exit {proc.poll()})")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(cmd: list[str], env: dict[str, str], logfile: Path) -> subprocess.Popen[bytes]:
    with logfile.open("ab") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )


# --- wrk ------------------------------------------------------------------------------------------


@dataclass
class Figure:
    scenario: str
    backend: str
    workers: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    unit: float = 1.0  # items per request (batch)
    ratio: str = ""
    rss: list[float] = field(default_factory=list)
    cpu_split: list[float] = field(default_factory=list)
    load: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class Wrk:
    duration: float
    warmup: float
    connections: int
    threads: int
    workdir: Path
    last_load: dict[str, float] = field(default_factory=dict)

    def _file(self, suffix: str, text: str) -> str:
        fd, name = tempfile.mkstemp(suffix=suffix, dir=self.workdir)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return name

    def run(
        self,
        url: str,
        *,
        token: str = "",
        body: str | None = None,
        derive: bool = False,
        keys: int = 0,
        headers: dict[str, str] | None = None,
        pids: list[int] | None = None,
    ) -> tuple[dict[str, Any], list[float]]:
        """(wrk's summary, CPU share per pid during the timed run)."""
        env = dict(os.environ)
        parts = url.split("/", 3)
        env["BENCH_PATH"] = "/" + (parts[3] if len(parts) > 3 else "")
        env["BENCH_TOKEN"] = token
        env["BENCH_DERIVE"] = "1" if derive else "0"
        env["BENCH_KEYS"] = str(keys)
        env["BENCH_BODY"] = ""
        env["BENCH_HEADERS"] = ""
        if body is not None:
            env["BENCH_BODY"] = self._file(".json", body)
        if headers:
            env["BENCH_HEADERS"] = self._file(".hdr", "".join(f"{k}: {v}\n" for k, v in headers.items()))
        base = ["wrk", f"-t{self.threads}", f"-c{self.connections}", "--timeout", "10s", "-s", LUA]
        origin = "/".join(parts[:3])
        if self.warmup > 0:
            subprocess.run(
                [*base, f"-d{max(1, round(self.warmup))}s", origin],
                env=env,
                capture_output=True,
                check=False,
                timeout=120,
            )
        before = {p: cpu_ticks(p) for p in pids or []}
        idle0, all0 = machine_ticks()
        procs0 = all_ticks()
        t0 = time.monotonic()
        proc = subprocess.run(
            [*base, f"-d{max(1, round(self.duration))}s", "--latency", origin],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=self.duration + 120,
        )
        elapsed = time.monotonic() - t0
        idle1, all1 = machine_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        mine = {os.getpid(), *(pids or [])}
        for p in list(mine):
            mine |= set(children(p))
        groups = others_share(procs0, all_ticks(), mine)
        self.last_load = {k: 100 * v / hz / elapsed for k, v in groups.items()}
        # per worker: % of one core during the timed run; last: the whole machine's busy %
        split = [100 * (cpu_ticks(p) - before[p]) / hz / elapsed for p in before]
        split.append(100 * (1 - (idle1 - idle0) / max(1, all1 - all0)))
        for line in proc.stdout.splitlines():
            if line.startswith("BENCH_JSON "):
                return json.loads(line[len("BENCH_JSON ") :]), split
        raise RuntimeError(f"wrk gave no summary: {proc.stdout}\n{proc.stderr}")


def figure_of(
    scenario: str, backend: str, workers: int, res: dict[str, Any], split: list[float], unit: float = 1
) -> Figure:
    errors = sum(v for k, v in res.items() if k.startswith("errors_"))
    return Figure(
        scenario=scenario,
        backend=backend,
        workers=workers,
        rps=res["requests"] / (res["duration_us"] / 1e6),
        p50_ms=res["p50_us"] / 1000,
        p99_ms=res["p99_us"] / 1000,
        errors=errors,
        unit=unit,
        cpu_split=split,
    )


# --- the service -----------------------------------------------------------------------------------


@dataclass
class Service:
    base: str
    proc: subprocess.Popen[bytes]
    admin: str
    agent: str
    ciphertext: str
    backend: str
    workers: int
    drop: Callable[[], None]

    def pids(self) -> list[int]:
        return worker_pids(self.proc.pid)


def pg_exec(sql: str, database: str = "postgres") -> None:
    import asyncpg  # the service's own driver

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


@contextlib.contextmanager
def service(backend: str, workers: int, workdir: Path) -> Iterator[Service]:
    data = workdir / f"{backend}-{workers}w"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env |= {"KMS_DATA_DIR": str(data), "KMS_LOG_LEVEL": "warning"}
    dbname = f"kms_bench_{os.getpid()}_{workers}"

    def drop() -> None:
        if backend == "postgresql":
            with contextlib.suppress(Exception):
                pg_exec(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    if backend == "postgresql":
        drop()
        pg_exec(f'CREATE DATABASE "{dbname}"')
        env["KMS_DATABASE_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{dbname}"
    init = subprocess.run([KMS, "init"], env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if init.returncode != 0:
        drop()
        raise RuntimeError(f"kms init failed: {init.stdout}{init.stderr}")
    admin = (data / "admin-token").read_text().strip()
    port = free_port()
    env["KMS_LISTEN"] = f"127.0.0.1:{port}"
    proc = start([KMS, "serve", "--workers", str(workers)], env, workdir / f"{backend}-{workers}w.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/v1/sys/health", proc, "kms serve")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as c:
            c.post("/v1/tenants", json={"id": "bench", "name": "Bench"}).raise_for_status()
            c.post(
                "/v1/tenants/bench/keys", json={"name": "k0", "provider": {"type": "local"}}
            ).raise_for_status()
            r = c.post(
                "/v1/tokens",
                json={"role": "agent", "tenant": "bench", "operations": ALL_OPS, "description": "bench"},
            )
            r.raise_for_status()
            agent = r.json()["token"]
            r = c.post(
                "/v1/tenants/bench/keys/k0/encrypt",
                json={"plaintext": base64.b64encode(os.urandom(32)).decode()},
                headers={"Authorization": f"Bearer {agent}"},
            )
            r.raise_for_status()
        # every worker's caches see the key and token before the timed runs (warm-up does the rest)
        yield Service(base, proc, admin, agent, r.json()["ciphertext"], backend, workers, drop)
    finally:
        stop(proc)
        drop()


def scenarios(svc: Service) -> list[tuple[str, str, str | None, bool, float]]:
    """(name, path, body, vary id, items per request)."""
    k = "/v1/tenants/bench/keys/k0"
    batch = json.dumps({"batch": [{"id": f"vol-{i}"} for i in range(100)]})
    big = base64.b64encode(os.urandom(4096)).decode()
    return [
        ("derive", k + "/derive", None, True, 1),
        ("derive batch 100", k + "/derive", batch, False, 100),
        ("datakey", k + "/datakey", "{}", False, 1),
        ("decrypt", k + "/decrypt", json.dumps({"ciphertext": svc.ciphertext}), False, 1),
        ("encrypt 4 KiB", k + "/encrypt", json.dumps({"plaintext": big}), False, 1),
    ]


def check_once(url: str, token: str, body: str | None) -> None:
    """One request before wrk: a scenario that fails is reported, not measured as fast 4xx."""
    r = httpx.post(
        url,
        content=body if body is not None else json.dumps({"id": "check"}),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=30,
    )
    if r.status_code != 200:
        raise RuntimeError(f"{url} -> {r.status_code} {r.text[:300]}")


# --- the ceiling -----------------------------------------------------------------------------------


@contextlib.contextmanager
def ceiling(workers: int, workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    cmd = [
        str(BIN / "uvicorn"),
        "bench.ceiling:app",
        "--app-dir",
        str(ROOT),
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    proc = start(cmd, dict(os.environ), workdir / f"ceiling-{workers}w.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, "ceiling")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


# --- raw HKDF --------------------------------------------------------------------------------------


def raw_hkdf_rate(seconds: float = 2.0) -> float:
    from kms_service import crypto

    s = os.urandom(32)
    runs = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while (now := time.perf_counter()) - t0 < seconds / 5:
            for i in range(200):
                crypto.derive_dek(kek_secret=s, purpose="volume", dek_id=f"vol-{i}", length=32)
            n += 200
        runs.append(n / (now - t0))
    runs.sort()
    return runs[2]


# --- the same Python client against moto and us ----------------------------------------------------


async def drive(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float
) -> tuple[float, float, float, int]:
    """(req/s, p50 ms, p99 ms, errors) of ``concurrency`` tasks POSTing for ``seconds``."""
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        stop_at = 0.0

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers=headers)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1

        stop_at = time.perf_counter() + min(2.0, seconds / 4)  # warm-up: connections, caches
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        lat.clear()
        errors = 0
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat.sort()
    if not lat:
        return 0.0, float("nan"), float("nan"), errors
    return len(lat) / elapsed, 1000 * lat[len(lat) // 2], 1000 * lat[int(len(lat) * 0.99)], errors


@contextlib.contextmanager
def moto_server(workdir: Path) -> Iterator[tuple[str, dict[str, str], bytes]]:
    """moto in its own process; yields (url, pre-signed GenerateDataKey headers, body)."""
    import botocore.session
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = start([sys.executable, "-m", "moto.server", "-p", str(port)], env, workdir / "moto.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", proc, "moto")
        session = botocore.session.get_session()
        kms = session.create_client(
            "kms",
            region_name="us-east-1",
            endpoint_url=url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        key_id = kms.create_key(Description="bench")["KeyMetadata"]["KeyId"]
        kms.generate_data_key(KeyId=key_id, NumberOfBytes=32)  # works through botocore
        body = json.dumps({"KeyId": key_id, "NumberOfBytes": 32}).encode()
        req = AWSRequest(
            method="POST",
            url=url + "/",
            data=body,
            headers={
                "Content-Type": "application/x-amz-json-1.1",
                "X-Amz-Target": "TrentService.GenerateDataKey",
            },
        )
        SigV4Auth(Credentials("testing", "testing"), "kms", "us-east-1").add_auth(req)
        yield url + "/", dict(req.headers.items()), body
    finally:
        stop(proc)


# --- PyKMIP ----------------------------------------------------------------------------------------


def kmip_pairs(workdir: Path, seconds: float, threads: int = 4) -> tuple[float, int]:
    """(create+get pairs/s, errors) against pykmip-server over mutual TLS, ``threads`` clients."""
    import warnings

    sys.path.insert(0, str(ROOT))
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from tests.providers.peers.kmip import _stop, _tls_ready, issue, make_ca, pykmip

    d = workdir / "kmip"
    (d / "policies").mkdir(parents=True)
    (d / "log").mkdir()
    ca = make_ca("bench-kmip-ca")
    scert, skey = issue(ca, "kmip-server", usages=[ExtendedKeyUsageOID.SERVER_AUTH], ip="127.0.0.1")
    ccert, ckey = issue(ca, "bench", usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {"ca": ca.pem, "server.pem": scert, "server.key": skey, "client.pem": ccert, "client.key": ckey}
    for name, text in files.items():
        (d / name).write_text(text)
    port = free_port()
    (d / "server.conf").write_text(
        f"[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={d / 'server.pem'}\n"
        f"key_path={d / 'server.key'}\nca_path={d / 'ca'}\nauth_suite=TLS1.2\n"
        f"enable_tls_client_auth=True\npolicy_path={d / 'policies'}\ndatabase_path={d / 'kmip.db'}\n"
    )
    proc = start(
        [str(BIN / "pykmip-server"), "-f", str(d / "server.conf"), "-l", str(d / "log" / "server.log")],
        dict(os.environ),
        d / "stdout.txt",
    )
    import ssl

    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.load_verify_locations(cadata=ca.pem)
    probe.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))
    try:
        deadline = time.monotonic() + 30
        while not _tls_ready(port, probe):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pykmip-server did not start")
            time.sleep(0.1)
        kmip = pykmip()
        counts = [0] * threads
        errors = [0] * threads
        stop_at = time.monotonic() + 1.0 + seconds
        t_start = time.monotonic() + 1.0

        def loop(i: int) -> None:
            client = kmip.ProxyKmipClient(
                hostname="127.0.0.1",
                port=port,
                cert=str(d / "client.pem"),
                key=str(d / "client.key"),
                ca=str(d / "ca"),
                ssl_version="PROTOCOL_TLSv1_2",
                config_file="/dev/null",
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                client.open()
            try:
                while (now := time.monotonic()) < stop_at:
                    try:
                        uid = client.create(kmip.enums.CryptographicAlgorithm.AES, 256)
                        client.get(uid)
                        if now >= t_start:
                            counts[i] += 1
                    except Exception:
                        errors[i] += 1
            finally:
                client.close()

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts) / seconds, sum(errors)
    finally:
        _stop(proc, port)


# --- flat with size --------------------------------------------------------------------------------


async def create_keys(base: str, admin: str, n: int, concurrency: int = 16) -> int:
    made = 0
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=60
    ) as client:
        queue = iter(range(1, n))

        async def worker() -> None:
            nonlocal made
            for i in queue:
                r = await client.post(
                    "/v1/tenants/bench/keys", json={"name": f"k{i}", "provider": {"type": "local"}}
                )
                made += r.status_code in (200, 201)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return made


def pad_audit(dbname: str, rows: int) -> None:
    """Copies of the first audit row under negative seqs: the table and its indexes grow; the chain
    head (what appends read) is untouched. A throwaway database only — verify would reject it."""
    pg_exec(
        "INSERT INTO audit_events (seq, time, actor_type, actor_id, action, tenant, key, version, outcome,"
        " request_id, source, details, prev_hash, hash)"
        " SELECT -g, e.time, e.actor_type, e.actor_id, e.action, e.tenant, e.key, e.version, e.outcome,"
        " e.request_id, e.source, e.details, e.prev_hash, e.hash"
        f" FROM generate_series(1, {rows}) g, (SELECT * FROM audit_events ORDER BY seq LIMIT 1) e;"
        " ANALYZE audit_events;",
        database=dbname,
    )


# --- profile ---------------------------------------------------------------------------------------


def profile_derive(workdir: Path, requests: int, backend: str, concurrency: int = 16) -> str:
    """cProfile of derive requests through the ASGI app in-process (no uvicorn, no sockets)."""
    data = workdir / "profile"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env["KMS_DATA_DIR"] = str(data)
    dbname = f"kms_bench_{os.getpid()}_profile"
    overrides: dict[str, Any] = {"data_dir": data}
    if backend == "postgresql":
        pg_exec(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        pg_exec(f'CREATE DATABASE "{dbname}"')
        env["KMS_DATABASE_URL"] = overrides["database_url"] = (
            f"postgresql+asyncpg://postgres@127.0.0.1:5432/{dbname}"
        )
    subprocess.run([KMS, "init"], env=env, capture_output=True, check=True, cwd=ROOT)
    admin = (data / "admin-token").read_text().strip()
    from kms_service.app import create_app
    from kms_service.settings import load_settings

    app = create_app(load_settings(**overrides))
    prof = cProfile.Profile()
    notes: list[str] = []

    async def go() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            c = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://kms", timeout=60)
            )
            h = {"Authorization": f"Bearer {admin}"}
            (await c.post("/v1/tenants", json={"id": "bench", "name": "B"}, headers=h)).raise_for_status()
            (
                await c.post(
                    "/v1/tenants/bench/keys", json={"name": "k0", "provider": {"type": "local"}}, headers=h
                )
            ).raise_for_status()
            r = await c.post(
                "/v1/tokens",
                json={"role": "agent", "tenant": "bench", "operations": ALL_OPS, "description": "p"},
                headers=h,
            )
            agent = {"Authorization": f"Bearer {r.json()['token']}"}
            url = "/v1/tenants/bench/keys/k0/derive"
            (await c.post(url, json={"id": "warm"}, headers=agent)).raise_for_status()
            batcher = app.state.services.batcher

            async def timed(profiled: bool) -> None:
                counter = iter(range(requests))

                failed = 0

                async def worker() -> None:
                    nonlocal failed
                    for i in counter:
                        r = await c.post(url, json={"id": f"vol-{i}"}, headers=agent)
                        failed += r.status_code != 200

                commits, events = batcher.commits, batcher.events
                cpu0 = time.process_time()
                if profiled:
                    prof.enable()
                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                elapsed = time.perf_counter() - t0
                if profiled:
                    prof.disable()
                cpu = time.process_time() - cpu0
                n_commits, n_events = batcher.commits - commits, batcher.events - events
                notes.append(
                    f"in-process derive ({backend}, {concurrency} concurrent, httpx ASGITransport, "
                    f"{'under cProfile' if profiled else 'no profiler'}): {requests / elapsed:,.0f} req/s, "
                    f"{1e6 * cpu / requests:,.0f} µs CPU/request (client included), "
                    f"audit: {n_events} events in {n_commits} commits "
                    f"({n_events / max(1, n_commits):.1f} per commit), {failed} non-200 answers"
                )

            await timed(False)
            await timed(True)
            # What if the sync dependencies of deps.py were `async def`? FastAPI runs a sync
            # dependency in the thread pool; an override with an async twin shows the saving
            # without touching the service.
            from kms_service import deps

            async def services_async(request: Request) -> Any:
                return request.app.state.services

            async def meta_async(request: Request) -> Any:
                return deps.get_meta(request)

            app.dependency_overrides[deps.get_services] = services_async
            app.dependency_overrides[deps.get_meta] = meta_async
            notes.append("what-if: get_services/get_meta as async dependencies (dependency_overrides):")
            await timed(False)
            app.dependency_overrides.clear()
            notes.append("again without the override:")
            await timed(False)

    try:
        asyncio.run(go())
    finally:
        if backend == "postgresql":
            with contextlib.suppress(Exception):
                pg_exec(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    stats = pstats.Stats(prof)
    groups: dict[str, float] = {}
    total = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        groups[package_of(filename)] = groups.get(package_of(filename), 0.0) + tottime
    lines = [*notes, "", f"{'package':40} {'self time %':>11} {'µs/request':>11}"]
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1])[:14]:
        lines.append(f"{name:40} {100 * t / total:11.1f} {1e6 * t / requests:11.1f}")
    lines.append(f"{'total (profiled)':40} {100.0:11.1f} {1e6 * total / requests:11.1f}")
    lines.append("")
    buf = io.StringIO()
    buf.write("top functions by self time:\n")
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    buf.write("top functions by cumulative time (coroutine resumptions count as calls):\n")
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    lines.append(buf.getvalue())
    return "\n".join(lines)


def package_of(filename: str) -> str:
    if "site-packages/" in filename:
        rest = filename.split("site-packages/", 1)[1]
        top = rest.split("/", 1)[0]
        if top == "httpx":
            return "httpx (the client, not the service)"
        if top in ("fastapi", "starlette") and "/" in rest:
            return f"{top}/{rest.split('/')[1].removesuffix('.py')}"
        return top
    if "/kms_service/" in filename:
        rest = filename.split("/kms_service/", 1)[1]
        return "kms_service/" + rest.removesuffix(".py")
    if filename == "~":
        return "C builtins (methods of str, dict, socket, ...)"
    if filename.startswith("<"):
        return "builtins " + filename
    return "stdlib/" + Path(filename).stem


# --- report ----------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    pkgs = ["fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "sqlalchemy"]
    pkgs += ["asyncpg", "aiosqlite", "cryptography", "httpx", "moto", "pykmip"]
    vers = ", ".join(f"{p} {version(p)}" for p in pkgs)
    wrkv = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    load = os.getloadavg()
    return (
        f"{platform.machine()}, nproc {os.cpu_count()}, {cpu}; Linux {platform.release()}; "
        f"Python {platform.python_version()}; {vers}; {wrkv.strip()}; "
        f"load average at start {load[0]:.2f}"
    )


def cpu_text(split: list[float]) -> str:
    if not split:
        return ""
    return " / ".join(f"{c:.0f}" for c in split[:-1]) + f" ({split[-1]:.0f})"


def table(figs: list[Figure]) -> str:
    head = (
        "| scenario | backend | workers | req/s | items/s | p50 ms | p99 ms | vs | errors "
        "| RSS/worker MiB | CPU % per worker (machine) | wrk / postgres / other CPU % |\n"
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|---|"
    )
    rows = [head]
    for f in figs:
        rows.append(
            f"| {f.scenario} | {f.backend} | {f.workers} | {f.rps:,.0f} | "
            f"{f.rps * f.unit:,.0f} | {f.p50_ms:.1f} | {f.p99_ms:.1f} | {f.ratio} | {f.errors} | "
            f"{' / '.join(f'{r:.0f}' for r in f.rss)} | {cpu_text(f.cpu_split)} | "
            f"{' / '.join(f'{f.load.get(k, 0):.0f}' for k in ('wrk', 'postgres', 'other'))} |"
        )
    return "\n".join(rows)


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10, help="seconds per timed wrk run (10)")
    p.add_argument("--warmup", type=float, default=2, help="seconds of untimed wrk before each run (2)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backends", default="postgresql,sqlite")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--scenarios", default="", help="comma list of scenario names (default all)")
    p.add_argument("--client-concurrency", type=int, default=32, help="tasks of the Python client (32)")
    p.add_argument("--no-moto", action="store_true", help="skip the moto comparison")
    p.add_argument("--kmip", action="store_true", help="also PyKMIP create+get pairs/s (~20 s)")
    p.add_argument("--size", action="store_true", help="also flat-with-size (PostgreSQL, slow)")
    p.add_argument("--size-keys", type=int, default=10_000)
    p.add_argument("--size-audit-rows", type=int, default=1_000_000)
    p.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile N in-process derives")
    p.add_argument("--profile-only", action="store_true", help="only the in-process profile (--profile N)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = p.parse_args()

    if shutil.which("wrk") is None:
        log("wrk not found: trying `apt-get install -y wrk`")
        subprocess.run(["apt-get", "install", "-y", "wrk"], capture_output=True, check=False)
        if shutil.which("wrk") is None:
            sys.exit("wrk is not installed and apt-get could not install it; the HTTP figures need it")

    started = time.monotonic()
    info = machine()
    log(info)
    workdir = Path(tempfile.mkdtemp(prefix="kms-bench-"))
    wrk = Wrk(args.duration, args.warmup, args.connections, args.threads, workdir)
    worker_counts = [int(w) for w in args.workers.split(",")]
    wanted = set(filter(None, args.scenarios.split(",")))
    figs: list[Figure] = []
    extra: list[str] = []

    if args.profile_only:
        print(profile_derive(workdir, args.profile or 3000, args.backends.split(",")[0]))
        shutil.rmtree(workdir, ignore_errors=True)
        return

    raw = raw_hkdf_rate()
    log(f"raw single-core HKDF: {raw:,.0f} DEKs/s")
    extra.append(f"raw single-core HKDF (derive_dek, in-process, median of 5): {raw:,.0f} DEKs/s")

    ceilings: dict[int, float] = {}
    for w in worker_counts:
        with ceiling(w, workdir) as (url, proc):
            res, split = wrk.run(url + "/derive", derive=True, pids=worker_pids(proc.pid))
            f = figure_of("ceiling: bare FastAPI + HKDF", "-", w, res, split)
            f.load = dict(wrk.last_load)
            f.rss = [rss_mib(pid) for pid in worker_pids(proc.pid)]
            ceilings[w] = f.rps
            figs.append(f)
            log(f"ceiling {w}w: {f.rps:,.0f} req/s p99 {f.p99_ms:.1f} ms")

    same_client: list[str] = []
    for backend in args.backends.split(","):
        for w in worker_counts:
            with service(backend, w, workdir) as svc:
                for name, path, body, vary, unit in scenarios(svc):
                    if wanted and name not in wanted:
                        continue
                    try:
                        check_once(svc.base + path, svc.agent, body)
                    except RuntimeError as exc:
                        log(f"{name} {backend} {w}w: skipped, {exc}")
                        continue
                    res, split = wrk.run(
                        svc.base + path, token=svc.agent, body=body, derive=vary, pids=svc.pids()
                    )
                    f = figure_of(name, backend, w, res, split, unit)
                    f.load = dict(wrk.last_load)
                    f.rss = [rss_mib(pid) for pid in svc.pids()]
                    if name == "derive batch 100":
                        f.ratio = f"{f.rps * unit / raw:.2f}x raw HKDF"
                    else:
                        f.ratio = f"{f.rps / ceilings[w]:.2f}x ceiling" if w in ceilings else ""
                    figs.append(f)
                    log(
                        f"{name} {backend} {w}w: {f.rps:,.0f} req/s ({f.rps * unit:,.0f} items/s) "
                        f"p50 {f.p50_ms:.1f} p99 {f.p99_ms:.1f} ms errors {f.errors} {f.ratio} "
                        f"RSS {f.rss} CPU {[round(c) for c in f.cpu_split]}"
                    )
                last = backend == args.backends.split(",")[0] and w == max(worker_counts)
                if last and not args.no_moto:
                    same_client += compare_moto(svc, args, wrk, workdir, figs)
                if last and args.size and backend == "postgresql":
                    extra += size_scenario(svc, args, wrk)
    if args.kmip:
        try:
            pairs, errs = kmip_pairs(workdir, args.duration)
            extra.append(
                f"PyKMIP create+get (4 client threads, mutual TLS 1.2): {pairs:,.1f} pairs/s, {errs} errors"
            )
        except Exception as exc:
            extra.append(f"PyKMIP: not measured ({type(exc).__name__}: {exc})")
        log(extra[-1])

    print()
    print(f"# machine: {info}")
    print(
        f"# wrk: {args.threads} threads, {args.connections} connections, {args.duration:g} s timed after "
        f"{args.warmup:g} s warm-up; bench/post.lua"
    )
    print(table(figs))
    print()
    for line in extra + same_client:
        print(f"- {line}")
    if args.profile:
        print()
        print(profile_derive(workdir, args.profile, args.backends.split(",")[0]))
    print(f"\n# total time {time.monotonic() - started:.0f} s; work dir {workdir}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": info, "figures": [f.__dict__ for f in figs], "notes": extra + same_client},
                indent=1,
            )
        )
    shutil.rmtree(workdir, ignore_errors=True)


def compare_moto(
    svc: Service, args: argparse.Namespace, wrk: Wrk, workdir: Path, figs: list[Figure]
) -> list[str]:
    out: list[str] = []
    n, secs = args.client_concurrency, args.duration
    ours_url = svc.base + "/v1/tenants/bench/keys/k0/datakey"
    ours_h = {"Authorization": f"Bearer {svc.agent}", "Content-Type": "application/json"}
    ours = asyncio.run(drive(ours_url, b"{}", ours_h, n, secs))
    try:
        with moto_server(workdir) as (url, headers, body):
            theirs = asyncio.run(drive(url, body, headers, n, secs))
            res, _ = wrk.run(url, body=body.decode(), headers=headers)
            f = figure_of("moto GenerateDataKey (pre-signed)", "moto", 1, res, [])
            f.load = dict(wrk.last_load)
            f.ratio = "peer"
            figs.append(f)
    except Exception as exc:
        return [f"moto: not measured ({type(exc).__name__}: {exc})"]
    label = f"Python client (asyncio + httpx, {n} tasks, {secs:g} s)"
    out.append(
        f"{label}: our datakey ({svc.backend}, {svc.workers} workers) {ours[0]:,.0f} req/s "
        f"p50 {ours[1]:.1f} p99 {ours[2]:.1f} ms, errors {ours[3]}"
    )
    out.append(
        f"{label}: moto GenerateDataKey {theirs[0]:,.0f} req/s p50 {theirs[1]:.1f} p99 {theirs[2]:.1f} ms, "
        f"errors {theirs[3]}"
    )
    ratio = ours[0] / theirs[0] if theirs[0] else float("nan")
    out.append(f"same-client ratio datakey / moto GenerateDataKey: {ratio:.1f}x")
    for line in out:
        log(line)
    return out


def size_scenario(svc: Service, args: argparse.Namespace, wrk: Wrk) -> list[str]:
    out: list[str] = []
    dbname = f"kms_bench_{os.getpid()}_{svc.workers}"
    path = svc.base + "/v1/tenants/bench/keys/k0/derive"
    one, _ = wrk.run(path, token=svc.agent, derive=True, pids=svc.pids())
    base = figure_of("derive 1 key", svc.backend, svc.workers, one, [])
    t0 = time.monotonic()
    made = asyncio.run(create_keys(svc.base, svc.admin, args.size_keys))
    out.append(f"size: created {made} more keys in {time.monotonic() - t0:.0f} s through the API")
    log(out[-1])
    many, _ = wrk.run(path, token=svc.agent, derive=True, keys=made + 1, pids=svc.pids())
    spread = figure_of("derive many keys", svc.backend, svc.workers, many, [])
    t0 = time.monotonic()
    pad_audit(dbname, args.size_audit_rows)
    out.append(
        f"size: padded the audit table with {args.size_audit_rows:,} rows in {time.monotonic() - t0:.0f} s"
    )
    log(out[-1])
    padded, _ = wrk.run(path, token=svc.agent, derive=True, pids=svc.pids())
    big = figure_of("derive big audit", svc.backend, svc.workers, padded, [])
    rss = " / ".join(f"{rss_mib(p):.0f}" for p in svc.pids())
    for label, f in (
        ("1 key", base),
        (f"{made + 1} keys (random key per request)", spread),
        (f"1 key, audit +{args.size_audit_rows:,} rows", big),
    ):
        out.append(
            f"size, derive on {label}: {f.rps:,.0f} req/s p50 {f.p50_ms:.1f} p99 {f.p99_ms:.1f} ms "
            f"errors {f.errors} ({f.rps / base.rps:.2f}x of 1 key)"
        )
        log(out[-1])
    out.append(f"size: RSS per worker after {made + 1} keys: {rss} MiB")
    return out


if __name__ == "__main__":
    main()
