"""Cost of the data-plane crypto on this machine (no HTTP, no database).

    .venv/bin/python bench/bench_crypto.py [--seconds 2]

Prints operations per second and microseconds per operation for: one DEK derivation (HKDF-SHA256),
a local KEK derivation, seal and open of a 32-byte data key, and seal of 4 KiB. Each figure is the
median of 5 timed runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

from kms_service import crypto


def rate(fn: Callable[[], object], seconds: float) -> float:
    runs = []
    for _ in range(5):
        n = 0
        start = time.perf_counter()
        deadline = start + seconds / 5
        while True:
            for _ in range(200):
                fn()
            n += 200
            now = time.perf_counter()
            if now >= deadline:
                break
        runs.append(n / (now - start))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0, help="time per figure")
    args = parser.parse_args()
    m, salt, s = os.urandom(32), os.urandom(32), os.urandom(32)
    dk = os.urandom(32)
    ct = crypto.seal(kek_secret=s, tenant="acme", key="volumes", version=3, plaintext=dk, context={"a": "b"})
    parsed = crypto.parse_ciphertext(ct)
    big = os.urandom(4096)
    cases: list[tuple[str, Callable[[], object]]] = [
        (
            "derive_dek (HKDF-SHA256, 32 B)",
            lambda: crypto.derive_dek(kek_secret=s, purpose="volume", dek_id="pg-data-0", length=32),
        ),
        (
            "derive_local_kek",
            lambda: crypto.derive_local_kek(
                master_secret=m, version_salt=salt, tenant="acme", key="volumes", version=3
            ),
        ),
        (
            "seal 32 B data key",
            lambda: crypto.seal(
                kek_secret=s, tenant="acme", key="volumes", version=3, plaintext=dk, context={"a": "b"}
            ),
        ),
        (
            "parse+open 32 B",
            lambda: crypto.open_ciphertext(
                kek_secret=s,
                tenant="acme",
                key="volumes",
                parsed=crypto.parse_ciphertext(ct),
                context={"a": "b"},
            ),
        ),
        (
            "open 32 B (pre-parsed)",
            lambda: crypto.open_ciphertext(
                kek_secret=s, tenant="acme", key="volumes", parsed=parsed, context={"a": "b"}
            ),
        ),
        (
            "seal 4 KiB",
            lambda: crypto.seal(kek_secret=s, tenant="acme", key="volumes", version=3, plaintext=big),
        ),
    ]
    print(f"# {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}")
    print(f"{'operation':34} {'ops/s':>10} {'µs/op':>8}")
    for name, fn in cases:
        r = rate(fn, args.seconds)
        print(f"{name:34} {r:10.0f} {1e6 / r:8.2f}")


if __name__ == "__main__":
    main()
