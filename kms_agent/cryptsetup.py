"""cryptsetup invocations, built so that key material never appears in argv or on disk.

Every command is a :class:`Command`: the argument vector (no secrets, ever), the bytes for the
child's stdin (the existing key, ``--key-file=-``) and the bytes for extra pipes (a second key,
passed as ``/dev/fd/N``). :func:`run` writes each secret into an anonymous pipe and hands the read
end to cryptsetup, so a key exists only in this process's memory, a kernel pipe buffer and
cryptsetup's memory. The builders are pure functions so tests can check that no key reaches argv.

Key files read from stdin or a pipe are taken byte for byte (cryptsetup strips no newline from a
``--key-file``), so raw binary keys are fine.

luksAddKey needs two keys at once. With cryptsetup 2.6 the existing key comes from
``--key-file=-`` (stdin) and the new one from the positional new-key-file argument, here
``/dev/fd/N`` of an inherited pipe (2.6 also spells it ``--new-keyfile``; the positional form
works on every LUKS2-capable release). ``luksKillSlot DEVICE N --key-file=-`` takes the key of a
*remaining* slot on stdin.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Command",
    "CryptsetupError",
    "Pbkdf",
    "add_key",
    "check_passphrase",
    "cryptsetup_binary",
    "dump_json",
    "format_luks2",
    "is_luks",
    "kill_slot",
    "run",
    "token_import",
]

# argv placeholder for the read end of the i-th extra pipe; replaced by "/dev/fd/<n>" in run().
_FD_PLACEHOLDER = "\x00fd{}\x00"
_MAX_PIPE_INPUT = 4096  # keys are at most 512 bytes; one write must fit the pipe buffer
_UNLOCKED = re.compile(r"Key slot (\d+) unlocked")
EXIT_BAD_PASSPHRASE = 2  # cryptsetup: "no permission (bad passphrase)"


class CryptsetupError(Exception):
    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message + (f": {stderr.strip()}" if stderr.strip() else ""))
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class Command:
    """One cryptsetup run. ``argv`` is public (it shows in ``ps``); ``stdin`` and ``pipes`` are
    the only places secrets go."""

    argv: tuple[str, ...]
    stdin: bytes = field(default=b"", repr=False)
    pipes: tuple[bytes, ...] = field(default=(), repr=False)

    def shown(self) -> str:
        return " ".join(a if not a.startswith("\x00") else "/dev/fd/N" for a in self.argv)


@dataclass(frozen=True, slots=True)
class Pbkdf:
    """Keyslot PBKDF options; None leaves cryptsetup's defaults (argon2id, benchmarked ~2 s),
    which is what production wants. Tests use ``Pbkdf("pbkdf2", 1000)`` (LUKS2 minimum is 1000).
    """

    algorithm: str | None = None
    iterations: int | None = None

    def args(self) -> list[str]:
        out: list[str] = []
        if self.algorithm:
            out += ["--pbkdf", self.algorithm]
        if self.iterations is not None:
            out += ["--pbkdf-force-iterations", str(self.iterations)]
        return out


def cryptsetup_binary() -> str:
    """``$KMS_AGENT_CRYPTSETUP``, else ``cryptsetup`` on PATH, else /usr/sbin or /sbin."""
    configured = os.environ.get("KMS_AGENT_CRYPTSETUP")
    if configured:
        return configured
    found = shutil.which("cryptsetup")
    if found:
        return found
    for candidate in ("/usr/sbin/cryptsetup", "/sbin/cryptsetup"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise CryptsetupError("cryptsetup not found (install cryptsetup-bin or set KMS_AGENT_CRYPTSETUP)")


# -- builders (pure) -------------------------------------------------------------------------


def format_luks2(cs: str, device: str, key: bytes, pbkdf: Pbkdf) -> Command:
    return Command(
        (cs, "luksFormat", "--batch-mode", "--type", "luks2", *pbkdf.args(), "--key-file=-", device),
        stdin=key,
    )


def check_passphrase(cs: str, device: str, key: bytes, *, slot: int | None = None) -> Command:
    slot_args = ["--key-slot", str(slot)] if slot is not None else []
    return Command(
        (
            cs,
            "open",
            "--test-passphrase",
            "--verbose",
            "--disable-external-tokens",
            *slot_args,
            "--key-file=-",
            device,
        ),
        stdin=key,
    )


def add_key(cs: str, device: str, existing_key: bytes, new_key: bytes, pbkdf: Pbkdf) -> Command:
    """luksAddKey: the existing key on stdin, the new one through a pipe named as the new key file."""
    return Command(
        (cs, "luksAddKey", "--batch-mode", *pbkdf.args(), "--key-file=-", device, _FD_PLACEHOLDER.format(0)),
        stdin=existing_key,
        pipes=(new_key,),
    )


def kill_slot(cs: str, device: str, slot: int, auth_key: bytes) -> Command:
    """luksKillSlot, authenticated by the key of another slot (on stdin). --batch-mode would
    also let it kill the last slot: callers must have verified another working slot first."""
    return Command((cs, "luksKillSlot", "--batch-mode", "--key-file=-", device, str(slot)), stdin=auth_key)


def dump_json(cs: str, device: str) -> Command:
    return Command((cs, "luksDump", "--dump-json-metadata", device))


def token_import(cs: str, device: str, token_id: int, token: dict[str, Any], *, replace: bool) -> Command:
    body = json.dumps(token, sort_keys=True, separators=(",", ":")).encode()
    replace_args = ["--token-replace"] if replace else []
    return Command(
        (cs, "token", "import", "--json-file=-", "--token-id", str(token_id), *replace_args, device),
        stdin=body,
    )


def is_luks(cs: str, device: str) -> Command:
    return Command((cs, "isLuks", "--type", "luks2", device))


# -- running ----------------------------------------------------------------------------------


def run(cmd: Command, *, check: bool = True, timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; secrets go through stdin and pipes only. ``check``: raise on non-zero exit."""
    read_ends: list[int] = []
    try:
        for data in cmd.pipes:
            if len(data) > _MAX_PIPE_INPUT:
                raise CryptsetupError("key too large for a pipe")
            r, w = os.pipe()
            read_ends.append(r)
            try:
                os.write(w, data)
            finally:
                os.close(w)
        argv = [_substitute(a, read_ends) for a in cmd.argv]
        proc = subprocess.run(  # noqa: S603 - argv is built above, never from a shell string
            argv,
            input=cmd.stdin,
            capture_output=True,
            pass_fds=tuple(read_ends),
            env={**os.environ, "LC_ALL": "C"},
            timeout=timeout,
            check=False,
        )
    finally:
        for fd in read_ends:
            os.close(fd)
    result = subprocess.CompletedProcess(
        cmd.argv,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )
    if check and proc.returncode != 0:
        raise CryptsetupError(
            f"{cmd.shown()} exited {proc.returncode}", returncode=proc.returncode, stderr=result.stderr
        )
    return result


def _substitute(arg: str, read_ends: Sequence[int]) -> str:
    for i, fd in enumerate(read_ends):
        if arg == _FD_PLACEHOLDER.format(i):
            return f"/dev/fd/{fd}"
    return arg


def unlocked_slot(result: subprocess.CompletedProcess[str]) -> int | None:
    """The keyslot a successful ``check_passphrase`` opened; None when the key opened none."""
    if result.returncode == EXIT_BAD_PASSPHRASE:
        return None
    if result.returncode != 0:
        raise CryptsetupError(
            f"cryptsetup open --test-passphrase exited {result.returncode}",
            returncode=result.returncode,
            stderr=result.stderr,
        )
    match = _UNLOCKED.search(result.stdout + result.stderr)
    if match is None:
        raise CryptsetupError("cryptsetup did not say which keyslot it unlocked", stderr=result.stderr)
    return int(match.group(1))
