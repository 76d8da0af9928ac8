"""`kms-agent luks rekey` killed (SIGKILL) after each step of its state machine.

After every kill: `luks key` still yields a key that opens the volume, and it is the DEK of a
version the token names; a second `rekey` then finishes the job, leaving exactly one keyslot
(the latest version's) and a clean token. The kill comes from the agent itself through the
test hook KMS_AGENT_TEST_KILL_AFTER=<step>.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from kms_agent.cryptsetup import Pbkdf
from kms_agent.luks import KILL_HOOK_ENV, REKEY_STEPS, Volume
from kms_client import KmsClient
from tests.clients.conftest import Live, agent_env
from tests.clients.luks_helpers import agent, keyslots, new_image, ok, opens, require_cryptsetup, token

pytestmark = pytest.mark.slow

KEY = "volumes"


@dataclass
class Volumes:
    live: Live
    tenant: str
    env: dict[str, str]
    images: dict[str, Path]

    def dek(self, id: str, version: int) -> bytes:
        return self.live.admin.derive(self.tenant, KEY, id, length=64, version=version).key


@pytest.fixture(scope="module")
def volumes(live: Live, tmp_path_factory: pytest.TempPathFactory) -> Volumes:
    """One image per step plus one for the chained test, all formatted on version 1; then the
    key is rotated to version 2."""
    require_cryptsetup()
    d = tmp_path_factory.mktemp("crash")
    tenant = live.tenant("crash", KEY)
    token_file = live.agent_token_file(tenant, d)
    env = agent_env(live, token_file, d / "locks")
    images = {}
    with KmsClient(live.url, token_file=token_file) as kms:  # in-process: faster than 7 commands
        for name in (*REKEY_STEPS, "chain"):
            img = new_image(d / f"{name}.img")
            Volume(img, pbkdf=Pbkdf("pbkdf2", 1000), lock_dir=d / "locks").format(
                kms, url=live.url, tenant=tenant, key=KEY, id=f"vol-{name}"
            )
            images[name] = img
    live.admin.rotate_key(tenant, KEY)
    return Volumes(live, tenant, env, images)


def check_unlockable(v: Volumes, img: Path) -> int:
    """`luks key` gives a working key, the DEK of a version the token names; returns it."""
    tok = token(img)
    key = ok(agent(v.env, "luks", "key", str(img))).stdout
    assert len(key) == 64 and opens(img, key)
    named = [x for x in (tok["version"], tok["pending"], tok["previous"]) if x is not None]
    matching = [ver for ver in named if v.dek(tok["id"], ver) == key]
    assert matching, f"the key is not the DEK of any version the token names ({named})"
    return matching[0]


def check_finished(v: Volumes, img: Path) -> None:
    tok = token(img)
    assert (tok["version"], tok["pending"], tok["previous"], tok["previous_keyslot"]) == (2, None, None, None)
    assert keyslots(img) == {tok["keyslot"]}, "exactly one keyslot: the new version's"
    assert opens(img, v.dek(tok["id"], 2)) and not opens(img, v.dek(tok["id"], 1))
    assert ok(agent(v.env, "luks", "key", str(img))).stdout == v.dek(tok["id"], 2)


# What the token says right after each step (version, pending, previous) and how many slots exist.
EXPECTED_AFTER = {
    "mark-pending": ((1, 2, None), 1),
    "add-keyslot": ((1, 2, None), 2),
    "verify-new-keyslot": ((1, 2, None), 2),
    "commit-token": ((2, None, 1), 2),
    "remove-old-keyslot": ((2, None, 1), 1),
    "finalize-token": ((2, None, None), 1),
}


@pytest.mark.parametrize("step", REKEY_STEPS)
def test_rekey_killed_after_a_step_stays_unlockable_and_resumes(volumes: Volumes, step: str) -> None:
    v = volumes
    img = v.images[step]
    killed = agent(v.env | {KILL_HOOK_ENV: step}, "luks", "rekey", str(img))
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()

    tok = token(img)
    state, slots = EXPECTED_AFTER[step]
    assert (tok["version"], tok["pending"], tok["previous"]) == state
    assert len(keyslots(img)) == slots
    check_unlockable(v, img)

    ok(agent(v.env, "luks", "rekey", str(img)))
    check_finished(v, img)


def test_rekey_killed_after_every_step_in_turn_on_one_volume(volumes: Volumes) -> None:
    """Each re-run is killed one step further; the volume goes through every state and every
    resume path, and ends re-keyed."""
    v = volumes
    img = v.images["chain"]
    for step in REKEY_STEPS:
        killed = agent(v.env | {KILL_HOOK_ENV: step}, "luks", "rekey", str(img))
        # Every run resumes where the previous one died and is killed after the next step.
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr.decode())
        tok = token(img)
        assert (tok["version"], tok["pending"], tok["previous"]) == EXPECTED_AFTER[step][0]
        assert len(keyslots(img)) <= 2, "a resumed re-key never adds a second new keyslot"
        check_unlockable(v, img)
    check_finished(v, img)
