"""`kms-agent luks format|key|rekey` and `kms-agent status` on LUKS2 file images, with a live
service. Volume keys are checked against DEKs derived independently through the admin API and
with plain cryptsetup calls (tests/clients/luks_helpers.py)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kms_agent import cryptsetup as cs
from kms_agent import luks
from kms_client import KmsClient
from tests.clients.conftest import Live, agent_env
from tests.clients.luks_helpers import (
    CRYPTSETUP,
    agent,
    keyslots,
    metadata,
    new_image,
    ok,
    opens,
    require_cryptsetup,
    token,
)

pytestmark = pytest.mark.slow

KEY = "volumes"


@dataclass
class Setup:
    live: Live
    tenant: str
    env: dict[str, str]
    token_file: Path
    dir: Path

    def dek(self, id: str, version: int) -> bytes:
        """The volume DEK, derived by the admin (not by the agent under test)."""
        return self.live.admin.derive(self.tenant, KEY, id, length=64, version=version).key


@pytest.fixture(scope="module")
def setup(live: Live, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    require_cryptsetup()
    d = tmp_path_factory.mktemp("luks")
    tenant = live.tenant("luks", KEY)
    token_file = live.agent_token_file(tenant, d, keys=[KEY], operations=["derive"])
    return Setup(live, tenant, agent_env(live, token_file, d / "locks"), token_file, d)


def fresh_image(s: Setup) -> Path:
    return new_image(s.dir / f"vol-{secrets.token_hex(4)}.img")


def test_format_key_rotate_rekey_status(setup: Setup) -> None:
    s = setup
    img = fresh_image(s)
    vol_id = f"pg-data-{img.stem}"
    ok(agent(s.env, "luks", "format", str(img), "--tenant", s.tenant, "--key", KEY, "--id", vol_id))

    tok = token(img)
    assert {k: tok[k] for k in ("tenant", "key", "id", "version", "url", "purpose", "length")} == {
        "tenant": s.tenant,
        "key": KEY,
        "id": vol_id,
        "version": 1,
        "url": s.live.url,
        "purpose": "volume",
        "length": 64,
    }
    assert tok["pending"] is None and tok["previous"] is None
    assert keyslots(img) == {tok["keyslot"]}
    v1 = s.dek(vol_id, 1)
    assert opens(img, v1)
    # The keyslot uses the PBKDF the test asked for (not cryptsetup's 2 s argon2id default).
    slot = metadata(img)["keyslots"][str(tok["keyslot"])]
    assert slot["kdf"]["type"] == "pbkdf2" and slot["kdf"]["iterations"] == 1000

    out = ok(agent(s.env, "luks", "key", str(img))).stdout
    assert out == v1 and len(out) == 64

    # --fd: the key goes to the given descriptor, nothing to stdout.
    r, w = os.pipe()
    try:
        proc = ok(agent(s.env, "luks", "key", str(img), "--fd", str(w), pass_fds=(w,)))
        os.close(w)
        w = -1
        assert os.read(r, 1000) == v1 and proc.stdout == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)

    status = ok(agent(s.env, "status", str(img), "--json"))
    [row] = json.loads(status.stdout)["volumes"]
    assert (row["state"], row["version"], row["latest_version"]) == ("current", 1, 1)

    s.live.admin.rotate_key(s.tenant, KEY, reason="test")
    [row] = json.loads(ok(agent(s.env, "status", str(img), "--json")).stdout)["volumes"]
    assert (row["state"], row["version"], row["latest_version"]) == ("stale", 1, 2)
    assert agent(s.env, "status", str(img), "--check").returncode == 3
    # Still unlockable with the old version's key until re-keyed.
    assert ok(agent(s.env, "luks", "key", str(img))).stdout == v1

    ok(agent(s.env, "luks", "rekey", str(img)))
    v2 = s.dek(vol_id, 2)
    tok = token(img)
    assert (tok["version"], tok["pending"], tok["previous"], tok["previous_keyslot"]) == (2, None, None, None)
    assert keyslots(img) == {tok["keyslot"]}, "the old keyslot is gone"
    assert opens(img, v2) and not opens(img, v1)
    assert ok(agent(s.env, "luks", "key", str(img))).stdout == v2
    assert ok(agent(s.env, "status", str(img), "--check")).returncode == 0

    again = ok(agent(s.env, "luks", "rekey", str(img)))
    assert b"already on the latest version (2)" in again.stderr
    assert token(img)["keyslot"] == tok["keyslot"] and keyslots(img) == {tok["keyslot"]}


def test_rekey_across_several_rotations_goes_straight_to_the_latest(setup: Setup) -> None:
    s = setup
    img = fresh_image(s)
    ok(agent(s.env, "luks", "format", str(img), "--tenant", s.tenant, "--key", KEY, "--id", img.stem))
    before = token(img)["version"]
    s.live.admin.rotate_key(s.tenant, KEY)
    s.live.admin.rotate_key(s.tenant, KEY)
    ok(agent(s.env, "luks", "rekey", str(img)))
    latest = s.live.admin.get_key(s.tenant, KEY).primary_version
    assert latest == before + 2
    assert token(img)["version"] == latest and len(keyslots(img)) == 1
    assert opens(img, s.dek(img.stem, latest)) and not opens(img, s.dek(img.stem, before))


def test_format_is_idempotent_and_never_destroys_another_volume(setup: Setup) -> None:
    s = setup
    img = fresh_image(s)
    args = ["luks", "format", str(img), "--tenant", s.tenant, "--key", KEY]
    ok(agent(s.env, *args, "--id", "vol-x"))
    first = metadata(img)
    again = ok(agent(s.env, *args, "--id", "vol-x"))
    assert b"already formatted" in again.stderr or b"LUKS2" in again.stderr
    assert metadata(img) == first, "re-running format changed nothing"
    other = agent(s.env, *args, "--id", "vol-y")
    assert other.returncode == 1 and b"already a kms-service volume" in other.stderr
    assert metadata(img) == first

    # A LUKS volume that is not ours (unknown passphrase) is left alone unless --force.
    foreign = fresh_image(s)
    subprocess.run(
        [CRYPTSETUP, "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
         "1000", "--key-file=-", str(foreign)],
        input=b"someone else's passphrase",
        check=True,
    )  # fmt: skip
    refused = agent(s.env, *args[:2], str(foreign), *args[3:], "--id", "vol-z")
    assert refused.returncode == 1 and b"--force" in refused.stderr
    assert opens(foreign, b"someone else's passphrase")
    ok(agent(s.env, *args[:2], str(foreign), *args[3:], "--id", "vol-z", "--force"))
    assert not opens(foreign, b"someone else's passphrase")
    assert opens(foreign, s.dek("vol-z", token(foreign)["version"]))


def test_format_interrupted_before_the_token_is_completed_by_a_rerun(setup: Setup) -> None:
    """luksFormat done, token not yet written (crash): the DEK opens the volume, so a re-run
    records the token instead of refusing or re-formatting."""
    s = setup
    img = fresh_image(s)
    version = s.live.admin.get_key(s.tenant, KEY).primary_version
    assert version is not None
    dek = s.dek("half-done", version)
    subprocess.run(
        [CRYPTSETUP, "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
         "1000", "--key-file=-", str(img)],
        input=dek,
        check=True,
    )  # fmt: skip
    uuid = metadata(img)["digests"]
    ok(agent(s.env, "luks", "format", str(img), "--tenant", s.tenant, "--key", KEY, "--id", "half-done"))
    assert metadata(img)["digests"] == uuid, "not re-formatted"
    assert token(img)["version"] == version
    assert ok(agent(s.env, "luks", "key", str(img))).stdout == dek


def test_key_writes_nothing_unless_the_key_opens_the_volume(setup: Setup) -> None:
    s = setup
    # Not a kms-service volume.
    plain = fresh_image(s)
    subprocess.run(
        [CRYPTSETUP, "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
         "1000", "--key-file=-", str(plain)],
        input=b"pw",
        check=True,
    )  # fmt: skip
    proc = agent(s.env, "luks", "key", str(plain))
    assert proc.returncode == 1 and proc.stdout == b"" and b"no kms-service token" in proc.stderr

    # A kms-service token whose key no longer opens any slot (the slot was replaced behind our back).
    img = fresh_image(s)
    ok(agent(s.env, "luks", "format", str(img), "--tenant", s.tenant, "--key", KEY, "--id", "swapped"))
    dek = s.dek("swapped", token(img)["version"])
    r, w = os.pipe()
    os.write(w, b"an unrelated passphrase")
    os.close(w)
    try:
        subprocess.run(
            [CRYPTSETUP, "luksAddKey", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
             "--key-file=-", str(img), f"/dev/fd/{r}"],
            input=dek,
            check=True,
            pass_fds=(r,),
        )  # fmt: skip
    finally:
        os.close(r)
    subprocess.run([CRYPTSETUP, "luksRemoveKey", "-q", "--key-file=-", str(img)], input=dek, check=True)
    assert not opens(img, dek)
    proc = agent(s.env, "luks", "key", str(img))
    assert proc.returncode == 1 and proc.stdout == b"" and b"opens no keyslot" in proc.stderr
    # ...and rekey refuses to touch it.
    s.live.admin.rotate_key(s.tenant, KEY)
    proc = agent(s.env, "luks", "rekey", str(img))
    assert proc.returncode == 1 and b"refusing to re-key" in proc.stderr
    assert opens(img, b"an unrelated passphrase")


def test_status_reports_old_and_new_volumes_from_arguments_or_the_config(setup: Setup) -> None:
    s = setup
    old, new, junk = fresh_image(s), fresh_image(s), fresh_image(s)
    for img in (old, new):
        ok(agent(s.env, "luks", "format", str(img), "--tenant", s.tenant, "--key", KEY, "--id", img.stem))
    s.live.admin.rotate_key(s.tenant, KEY)
    ok(agent(s.env, "luks", "rekey", str(new)))

    out = agent(s.env, "status", str(old), str(new))
    assert out.returncode == 0
    lines = out.stdout.decode().splitlines()
    assert lines[0].startswith(f"{old}\tstale\t") and lines[1].startswith(f"{new}\tcurrent\t")

    config = s.dir / "agent.toml"
    config.write_text(f'volumes = ["{old}", "{new}", "{junk}"]\nurl = "{s.live.url}"\n')
    env = s.env | {"KMS_AGENT_CONFIG": str(config)}
    proc = agent(env, "status", "--json")
    rows = {r["path"]: r for r in json.loads(proc.stdout)["volumes"]}
    latest = s.live.admin.get_key(s.tenant, KEY).primary_version
    assert rows[str(old)]["state"] == "stale" and rows[str(old)]["latest_version"] == latest
    assert rows[str(old)]["version"] < latest
    assert rows[str(new)]["state"] == "current" and rows[str(new)]["version"] == latest
    assert rows[str(junk)]["state"] == "error"
    assert proc.returncode == 1, "an unreadable volume is an error"


def test_bad_usage_and_service_errors_exit_cleanly(setup: Setup) -> None:
    s = setup
    img = fresh_image(s)
    env = {k: v for k, v in s.env.items() if k != "KMS_AGENT_TOKEN_FILE"}
    proc = agent(env, "luks", "format", str(img), "--tenant", s.tenant, "--key", KEY, "--id", "x")
    assert proc.returncode == 2 and b"no credentials" in proc.stderr
    proc = agent(s.env, "luks", "format", str(img), "--tenant", s.tenant, "--key", "nope", "--id", "x")
    assert proc.returncode == 1 and b"not_found" in proc.stderr and b"Traceback" not in proc.stderr
    assert img.read_bytes()[: 1 << 20].strip(b"\x00") == b"", "nothing was written to the device"


# -- keys travel only through stdin and pipes --------------------------------------------------


def test_command_builders_keep_keys_out_of_argv() -> None:
    old, new = secrets.token_bytes(64), secrets.token_bytes(64)
    pbkdf = cs.Pbkdf("pbkdf2", 1000)
    commands = [
        (cs.format_luks2("cryptsetup", "/dev/x", old, pbkdf), old, ()),
        (cs.check_passphrase("cryptsetup", "/dev/x", old), old, ()),
        (cs.check_passphrase("cryptsetup", "/dev/x", old, slot=3), old, ()),
        (cs.add_key("cryptsetup", "/dev/x", old, new, pbkdf), old, (new,)),
        (cs.kill_slot("cryptsetup", "/dev/x", 0, new), new, ()),
    ]
    for cmd, stdin, pipes in commands:
        assert cmd.stdin == stdin and cmd.pipes == pipes
        assert "--key-file=-" in cmd.argv
        _assert_no_secret(cmd.argv, [old, new])
        assert "--key-file=-" in cmd.shown() and old.hex() not in repr(cmd)
    add = commands[3][0]
    # The new key of luksAddKey is named only by a pipe placeholder, resolved to /dev/fd/N.
    assert add.shown().endswith("/dev/x /dev/fd/N")
    assert cs.format_luks2("cryptsetup", "/dev/x", old, cs.Pbkdf()).argv[-2:] == ("--key-file=-", "/dev/x")


def _assert_no_secret(argv: tuple[str, ...] | list[str], keys: list[bytes]) -> None:
    joined = "\x00".join(argv)
    for key in keys:
        for form in (
            key.hex(),
            base64.b64encode(key).decode(),
            base64.urlsafe_b64encode(key).decode().rstrip("="),
            key.decode("latin-1"),
        ):
            assert form not in joined


def test_real_runs_pass_keys_only_by_stdin_and_pipe_fds(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Format and re-key in-process with subprocess.run recorded: no argv holds a key, and the
    luksAddKey new key is read from /dev/fd/N of an inherited pipe."""
    s = setup
    calls: list[tuple[list[str], bytes, tuple[int, ...]]] = []
    real_run = subprocess.run

    def recording_run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        calls.append((list(argv), kw.get("input") or b"", tuple(kw.get("pass_fds") or ())))  # type: ignore[arg-type]
        return real_run(argv, **kw)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(cs.subprocess, "run", recording_run)
    monkeypatch.setenv("KMS_AGENT_LOCK_DIR", str(tmp_path))
    img = fresh_image(s)
    vol = luks.Volume(img, pbkdf=cs.Pbkdf("pbkdf2", 1000), after_step=lambda _step: None)
    with KmsClient(s.live.url, token_file=s.token_file) as kms:
        vol.format(kms, url=s.live.url, tenant=s.tenant, key=KEY, id="in-process")
        s.live.admin.rotate_key(s.tenant, KEY)
        before, after = vol.rekey(kms)
    assert after == before + 1
    keys = [s.dek("in-process", before), s.dek("in-process", after)]
    assert calls
    for argv, _stdin, _fds in calls:
        _assert_no_secret(argv, keys)
    adds = [c for c in calls if c[0][1] == "luksAddKey"]
    assert len(adds) == 1
    argv, stdin, fds = adds[0]
    assert stdin == keys[0] and len(fds) == 1 and argv[-1] == f"/dev/fd/{fds[0]}"
    kills = [c for c in calls if c[0][1] == "luksKillSlot"]
    assert len(kills) == 1 and kills[0][1] == keys[1]
    for argv, stdin, _fds in calls:
        if argv[1] == "token":
            assert json.loads(stdin)["type"] == "kms-service"
            _assert_no_secret([stdin.decode()], keys)
        else:
            assert stdin in (b"", *keys)
    # Every descriptor handed to cryptsetup was closed again.
    for _argv, _stdin, fds in calls:
        for fd in fds:
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(fd)


def test_no_key_ever_lands_in_a_file(setup: Setup, live: Live) -> None:
    """After a format, an unlock and a re-key, no DEK (raw, hex or base64) is found in any file
    under the test directories or the server's data directory (database, tokens, locks), nor in
    this volume's LUKS image (LUKS keeps only the encrypted volume key, never the passphrase).
    The module's other images are skipped: each is 32 MiB of scanning for no extra evidence."""
    s = setup
    img = fresh_image(s)
    ok(agent(s.env, "luks", "format", str(img), "--tenant", s.tenant, "--key", KEY, "--id", "scan-me"))
    ok(agent(s.env, "luks", "key", str(img)))
    s.live.admin.rotate_key(s.tenant, KEY)
    ok(agent(s.env, "luks", "rekey", str(img)))
    latest = token(img)["version"]
    keys = [s.dek("scan-me", v) for v in range(1, latest + 1)]
    needles = [f for k in keys for f in (k, k.hex().encode(), base64.b64encode(k)[:40])]
    scanned = 0
    for root in (s.dir, live.root):
        for path in root.rglob("*"):
            if path.is_file() and (path.suffix != ".img" or path == img):
                data = path.read_bytes()
                scanned += 1
                for needle in needles:
                    assert needle not in data, f"key material found in {path}"
    assert scanned > 5
