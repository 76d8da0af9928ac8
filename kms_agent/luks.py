"""LUKS2 volumes keyed by kms-service DEKs: format, unlock key, re-key after rotation, status.

A volume's key is the DEK ``derive(tenant, key, id, purpose="volume", length=64, version=v)``.
The volume describes itself in a LUKS2 token of type ``kms-service``::

    {"type": "kms-service", "keyslots": ["1"], "kms_format": 1,
     "url": "https://kms:8400", "tenant": "acme", "key": "volumes", "id": "pg-data-0",
     "purpose": "volume", "length": 64,
     "version": 2, "keyslot": 1,                  # the version whose DEK opens `keyslot`
     "pending": null,                             # re-key under way: version being added
     "previous": null, "previous_keyslot": null}  # re-key committed: version/slot being retired

Keys reach cryptsetup only through stdin and pipes (see :mod:`kms_agent.cryptsetup`).

Re-key state machine
--------------------

The token is rewritten with ``cryptsetup token import --token-replace``: one LUKS2 metadata
update, which cryptsetup makes crash-safe (two header copies with sequence ids). Between any
two of the steps below the process may die; the invariant holding at every point is

    some keyslot opens with the DEK of a version the token names (``version``, ``pending`` or
    ``previous``), so ``kms-agent luks key`` (which tries them in that order) finds a key;

and re-running ``rekey`` resumes from whatever state the token and the keyslots are in.

====================  =============================================  ===========================
state (token)         steps (each followed by the test kill hook)    working slot(s)
====================  =============================================  ===========================
CURRENT  v, slot s    ``derive(version=v)`` says ``latest_version``
                      t > v: check DEK(v) opens s (else refuse);
                      1. ``mark-pending``: token pending=t            s (DEK v)
PENDING  v, s, t      2. ``add-keyslot``: unless DEK(t) already       s; then s and n (DEK t)
                         opens a slot, luksAddKey (existing key
                         DEK(v) on stdin, DEK(t) through a pipe)
                      3. ``verify-new-keyslot``: DEK(t) opens slot n  s and n
                      4. ``commit-token``: version=t, keyslot=n,      s and n
                         previous=v, previous_keyslot=s
COMMITTED t, n, v, s  5. ``remove-old-keyslot``: DEK(t) still opens   n
                         n; if slot s exists, is not n and (when the
                         service still derives DEK(v)) DEK(v) opens
                         it, luksKillSlot s authenticated by DEK(t)
                      6. ``finalize-token``: previous cleared         n
CURRENT  t, n         loop: another rotation meanwhile starts over
====================  =============================================  ===========================

A killed step is simply redone: ``mark-pending`` and the token writes are idempotent, step 2
first checks whether DEK(t) already opens a slot (so a crash after luksAddKey never adds a
second slot), step 5 skips a slot that no longer exists. The old slot is removed only after the
token names the new version *and* the new slot was verified, so no point in the sequence has
the token pointing only at versions whose slots are gone.

For tests only, ``KMS_AGENT_TEST_KILL_AFTER=<step>`` makes the process SIGKILL itself right
after that step (names in :data:`REKEY_STEPS`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kms_agent import cryptsetup as cs
from kms_client import KeyVersionBelowMinimum, KeyVersionDisabled, KmsClient, KmsError, NotFound

TOKEN_TYPE = "kms-service"  # noqa: S105 - a LUKS2 token type, not a secret
TOKEN_FORMAT = 1
PURPOSE = "volume"
KEY_LENGTH = 64
MAX_TOKENS = 32

REKEY_STEPS = (
    "mark-pending",
    "add-keyslot",
    "verify-new-keyslot",
    "commit-token",
    "remove-old-keyslot",
    "finalize-token",
)
KILL_HOOK_ENV = "KMS_AGENT_TEST_KILL_AFTER"

# Versions the service refuses to derive: their keyslot cannot be checked any more.
_GONE = (KeyVersionDisabled, KeyVersionBelowMinimum, NotFound)


class LuksError(Exception):
    """The volume is not in a state this agent can work with; the message says why."""


@dataclass(frozen=True, slots=True)
class VolumeToken:
    tenant: str
    key: str
    id: str
    version: int
    keyslot: int | None
    url: str | None = None
    purpose: str = PURPOSE
    length: int = KEY_LENGTH
    pending: int | None = None
    previous: int | None = None
    previous_keyslot: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": TOKEN_TYPE,
            "keyslots": [str(self.keyslot)] if self.keyslot is not None else [],
            "kms_format": TOKEN_FORMAT,
            "url": self.url,
            "tenant": self.tenant,
            "key": self.key,
            "id": self.id,
            "purpose": self.purpose,
            "length": self.length,
            "version": self.version,
            "keyslot": self.keyslot,
            "pending": self.pending,
            "previous": self.previous,
            "previous_keyslot": self.previous_keyslot,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> VolumeToken:
        def opt_int(name: str) -> int | None:
            value = raw.get(name)
            if value is None:
                return None
            if not isinstance(value, int) or isinstance(value, bool):
                raise LuksError(f"kms-service token: {name!r} is not an integer")
            return value

        def text(name: str) -> str:
            value = raw.get(name)
            if not isinstance(value, str) or not value:
                raise LuksError(f"kms-service token: {name!r} missing")
            return value

        if raw.get("kms_format") != TOKEN_FORMAT:
            raise LuksError(f"kms-service token: unsupported kms_format {raw.get('kms_format')!r}")
        version = opt_int("version")
        if version is None:
            raise LuksError("kms-service token: 'version' missing")
        url = raw.get("url")
        return cls(
            tenant=text("tenant"),
            key=text("key"),
            id=text("id"),
            version=version,
            keyslot=opt_int("keyslot"),
            url=url if isinstance(url, str) else None,
            purpose=text("purpose"),
            length=opt_int("length") or KEY_LENGTH,
            pending=opt_int("pending"),
            previous=opt_int("previous"),
            previous_keyslot=opt_int("previous_keyslot"),
        )

    @property
    def candidate_versions(self) -> list[int]:
        """Versions whose DEK may open the volume, most likely first."""
        out = [self.version]
        for v in (self.pending, self.previous):
            if v is not None and v not in out:
                out.append(v)
        return out

    @property
    def state(self) -> str:
        if self.pending is not None:
            return "pending"
        if self.previous is not None:
            return "committed"
        return "current"


def _kill_hook(step: str) -> None:
    if os.environ.get(KILL_HOOK_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class Volume:
    """A LUKS2 device or image file and its kms-service token."""

    def __init__(
        self,
        device: str | os.PathLike[str],
        *,
        pbkdf: cs.Pbkdf | None = None,
        after_step: Callable[[str], None] = _kill_hook,
        log: Callable[[str], None] = lambda _msg: None,
        lock_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.device = os.fspath(device)
        self._lock_dir = Path(lock_dir or os.environ.get("KMS_AGENT_LOCK_DIR") or "/run/kms-agent")
        self.pbkdf = pbkdf or cs.Pbkdf()
        self._cs = cs.cryptsetup_binary()
        self._after_step = after_step
        self._log = log

    # -- cryptsetup primitives -------------------------------------------------------------

    def is_luks(self) -> bool:
        return cs.run(cs.is_luks(self._cs, self.device), check=False).returncode == 0

    def metadata(self) -> dict[str, Any]:
        out = cs.run(cs.dump_json(self._cs, self.device))
        try:
            data = json.loads(out.stdout)
        except ValueError:
            raise LuksError(f"{self.device}: cryptsetup printed unreadable metadata") from None
        if not isinstance(data, dict):
            raise LuksError(f"{self.device}: unexpected LUKS2 metadata")
        return data

    def keyslots(self) -> set[int]:
        return {int(k) for k in self.metadata().get("keyslots", {})}

    def slot_opened_by(self, key: bytes, slot: int | None = None) -> int | None:
        """The keyslot ``key`` opens (only ``slot`` if given), or None."""
        return cs.unlocked_slot(
            cs.run(cs.check_passphrase(self._cs, self.device, key, slot=slot), check=False)
        )

    def _token_entry(self) -> tuple[int, dict[str, Any]] | None:
        tokens = self.metadata().get("tokens", {})
        ours = [(int(tid), tok) for tid, tok in tokens.items() if tok.get("type") == TOKEN_TYPE]
        if len(ours) > 1:
            raise LuksError(f"{self.device}: {len(ours)} kms-service tokens; expected one")
        return ours[0] if ours else None

    def read_token(self) -> VolumeToken:
        entry = self._token_entry()
        if entry is None:
            raise LuksError(f"{self.device}: no kms-service token (not formatted by kms-agent?)")
        return VolumeToken.from_json(entry[1])

    def write_token(self, token: VolumeToken) -> None:
        entry = self._token_entry()
        if entry is not None:
            token_id = entry[0]
        else:
            used = {int(t) for t in self.metadata().get("tokens", {})}
            token_id = next(i for i in range(MAX_TOKENS) if i not in used)
        cs.run(cs.token_import(self._cs, self.device, token_id, token.to_json(), replace=True))

    def _step(self, name: str) -> None:
        self._log(f"{self.device}: {name} done")
        self._after_step(name)

    # -- format ----------------------------------------------------------------------------

    def format(
        self, kms: KmsClient, *, url: str, tenant: str, key: str, id: str, force: bool = False
    ) -> VolumeToken:
        """luksFormat the device with DEK(primary version) and record the token.

        Re-running it on a volume it formatted is a no-op; on a volume whose format was
        interrupted before the token was written, it writes the token. Any other LUKS volume is
        left alone unless ``force``."""
        with self.lock():
            if self.is_luks() and not force:
                entry = self._token_entry()
                if entry is not None:
                    token = VolumeToken.from_json(entry[1])
                    if (token.tenant, token.key, token.id) == (tenant, key, id):
                        self._log(f"{self.device}: already formatted for {tenant}/{key} id {id}")
                        return token
                    raise LuksError(
                        f"{self.device}: already a kms-service volume of "
                        f"{token.tenant}/{token.key} id {token.id}"
                    )
                dek = kms.derive(tenant, key, id, purpose=PURPOSE, length=KEY_LENGTH)
                slot = self.slot_opened_by(dek.key)
                if slot is None:
                    raise LuksError(f"{self.device}: already a LUKS volume (use --force to destroy it)")
                token = VolumeToken(tenant=tenant, key=key, id=id, version=dek.version, keyslot=slot, url=url)
                self.write_token(token)
                return token
            dek = kms.derive(tenant, key, id, purpose=PURPOSE, length=KEY_LENGTH)
            cs.run(cs.format_luks2(self._cs, self.device, dek.key, self.pbkdf))
            slot = self.slot_opened_by(dek.key)
            if slot is None:
                raise LuksError(f"{self.device}: the new volume does not open with its key")
            token = VolumeToken(tenant=tenant, key=key, id=id, version=dek.version, keyslot=slot, url=url)
            self.write_token(token)
            return token

    # -- unlock ----------------------------------------------------------------------------

    def unlock_key(self, kms: KmsClient, token: VolumeToken | None = None) -> tuple[bytes, int, int]:
        """(key, version, slot): the DEK of a version the token names that opens a keyslot,
        verified with ``cryptsetup open --test-passphrase``."""
        token = token or self.read_token()
        problems: list[str] = []
        for version in token.candidate_versions:
            try:
                dek = kms.derive(
                    token.tenant,
                    token.key,
                    token.id,
                    purpose=token.purpose,
                    length=token.length,
                    version=version,
                )
            except KmsError as exc:
                problems.append(f"version {version}: {exc.code}: {exc.detail}")
                continue
            slot = self.slot_opened_by(dek.key)
            if slot is not None:
                return dek.key, version, slot
            problems.append(f"version {version}: its key opens no keyslot")
        raise LuksError(f"{self.device}: no working key ({'; '.join(problems)})")

    # -- re-key ----------------------------------------------------------------------------

    def _derive(self, kms: KmsClient, token: VolumeToken, version: int) -> bytes:
        dek = kms.derive(
            token.tenant, token.key, token.id, purpose=token.purpose, length=token.length, version=version
        )
        return dek.key

    def rekey(self, kms: KmsClient) -> tuple[int, int]:
        """Bring the volume to the key's latest version; returns (version before, version after).
        Resumes an interrupted re-key. See the module docstring for the state machine."""
        with self.lock():
            token = self.read_token()
            start = token.previous if token.previous is not None else token.version
            while True:
                if token.previous is not None:
                    token = self._retire(kms, token)
                    continue
                if token.pending is None:
                    current = kms.derive(
                        token.tenant,
                        token.key,
                        token.id,
                        purpose=token.purpose,
                        length=token.length,
                        version=token.version,
                    )
                    target = current.latest_version
                    if target is None or target <= token.version:
                        return start, token.version
                    slot = self.slot_opened_by(current.key)
                    if slot is None:
                        raise LuksError(
                            f"{self.device}: the key of version {token.version} named by the token opens no "
                            "keyslot; refusing to re-key"
                        )
                    token = replace(token, keyslot=slot, pending=target)
                    self.write_token(token)
                    self._step("mark-pending")
                token = self._add_and_commit(kms, token)

    def _add_and_commit(self, kms: KmsClient, token: VolumeToken) -> VolumeToken:
        assert token.pending is not None
        new_key = self._derive(kms, token, token.pending)
        new_slot = self.slot_opened_by(new_key)
        if new_slot is None:
            old_key = self._derive(kms, token, token.version)
            cs.run(cs.add_key(self._cs, self.device, old_key, new_key, self.pbkdf))
            self._step("add-keyslot")
            new_slot = self.slot_opened_by(new_key)
            if new_slot is None:
                raise LuksError(f"{self.device}: the keyslot just added does not open")
        self._step("verify-new-keyslot")
        old_slot = token.keyslot
        if old_slot == new_slot:  # the token's slot was not the old key's; never retire the new one
            old_slot = None
        token = replace(
            token,
            version=token.pending,
            keyslot=new_slot,
            pending=None,
            previous=token.version,
            previous_keyslot=old_slot,
        )
        self.write_token(token)
        self._step("commit-token")
        return token

    def _retire(self, kms: KmsClient, token: VolumeToken) -> VolumeToken:
        assert token.previous is not None
        new_key = self._derive(kms, token, token.version)
        new_slot = self.slot_opened_by(new_key)
        if new_slot is None:
            raise LuksError(
                f"{self.device}: the key of version {token.version} opens no keyslot; not removing any"
            )
        old_slot = token.previous_keyslot
        if old_slot is not None and old_slot != new_slot and old_slot in self.keyslots():
            try:
                old_key: bytes | None = self._derive(kms, token, token.previous)
            except _GONE:
                old_key = None  # the service no longer derives it: the recorded slot is ours
            if old_key is None or self.slot_opened_by(old_key, slot=old_slot) == old_slot:
                cs.run(cs.kill_slot(self._cs, self.device, old_slot, new_key))
            else:
                self._log(f"{self.device}: keyslot {old_slot} is not version {token.previous}'s; left alone")
        self._step("remove-old-keyslot")
        token = replace(token, keyslot=new_slot, previous=None, previous_keyslot=None)
        self.write_token(token)
        self._step("finalize-token")
        return token

    # -- locking ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive advisory lock per device, so two formats or re-keys (a timer and an
        operator) do not interleave. It is a separate file in ``lock_dir`` (default
        ``$KMS_AGENT_LOCK_DIR`` or /run/kms-agent): cryptsetup takes its own locks on the device."""
        real = os.path.realpath(self.device)
        name = hashlib.sha256(real.encode()).hexdigest()[:24] + ".lock"
        base = self._lock_dir
        try:
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            base = Path(tempfile.gettempdir())
        with open(base / name, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# -- status ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VolumeStatus:
    """One volume as ``kms-agent status`` reports it. ``state``: ``current`` (on the latest
    version), ``stale`` (re-key needed), ``rekey-pending``/``rekey-committed`` (an interrupted
    re-key; run ``luks rekey``) or ``error``."""

    path: str
    state: str
    tenant: str | None = None
    key: str | None = None
    id: str | None = None
    version: int | None = None
    latest_version: int | None = None
    url: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "state": self.state,
            "tenant": self.tenant,
            "key": self.key,
            "id": self.id,
            "version": self.version,
            "latest_version": self.latest_version,
            "url": self.url,
            "error": self.error,
        }


def volume_status(path: str, token: VolumeToken, kms: KmsClient) -> VolumeStatus:
    """Ask the service for the latest version of the volume's key (derive at the token's
    version: agent tokens cannot read key metadata, and the derive records the volume's re-key
    progress server-side, DESIGN §4)."""
    base = VolumeStatus(
        path=path,
        state="error",
        tenant=token.tenant,
        key=token.key,
        id=token.id,
        version=token.version,
        url=token.url,
    )
    try:
        dek = kms.derive(
            token.tenant,
            token.key,
            token.id,
            purpose=token.purpose,
            length=token.length,
            version=token.version,
        )
    except KmsError as exc:
        return replace(base, error=f"{exc.code}: {exc.detail}")
    latest = dek.latest_version
    if token.pending is not None:
        state = "rekey-pending"
    elif token.previous is not None:
        state = "rekey-committed"
    elif latest is not None and latest > token.version:
        state = "stale"
    else:
        state = "current"
    return replace(base, state=state, latest_version=latest)
