"""The `pkcs11` provider's peer: a real SoftHSM2 token in a temporary directory.

One SoftHSM2 installation per test session (SOFTHSM2_CONF points at a generated conf whose
token directory is temporary). Its tokens are initialised with softhsm2-util *before* the module
is first loaded in this process: a loaded module does not see tokens created later. Each test
gets a fresh AES-256 key (sensitive, non-extractable) with a unique label; slots are random, so
everything is opened by token label. All HSM administration goes through
`providers.pkcs11.token_session`, which shares the process's one login per token: a plain
python-pkcs11 session opened with the PIN would log every provider out when closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from providers import ProviderKeyDisabled
from providers.pkcs11 import SOFTHSM_MODULE, Pkcs11Config, token_session
from tests.conftest import peer_missing
from tests.providers.conftest import Peer

MAIN_TOKEN = "kms-test"
SPARE_TOKEN = "kms-spare"  # never used by a provider: a wrong PIN there reaches the real C_Login


@dataclass(frozen=True)
class SoftHsm:
    """The session's SoftHSM2: two initialised tokens and their PINs."""

    root: Path
    user_pin: str
    so_pin: str
    token_label: str = MAIN_TOKEN
    spare_token_label: str = SPARE_TOKEN

    def config(self, key_label: str, **fields: Any) -> Pkcs11Config:
        values: dict[str, Any] = {
            "type": "pkcs11",
            "module_path": SOFTHSM_MODULE,
            "token_label": self.token_label,
            "key_label": key_label,
            "pin": self.user_pin,
        }
        return Pkcs11Config.model_validate({**values, **fields})

    def create_key(self, label: str | None = None, *, value: bytes | None = None, **attributes: bool) -> str:
        """A new AES token key (random, or with CKA_VALUE ``value``): sensitive, non-extractable,
        usable for encrypt/decrypt/wrap/unwrap unless ``attributes`` (e.g. EXTRACTABLE=True)
        say otherwise. Returns its label."""
        import pkcs11
        from pkcs11 import Attribute as Attr

        label = label or f"kek-{secrets.token_hex(6)}"
        template: dict[Any, Any] = {
            Attr.TOKEN: True,
            Attr.PRIVATE: True,
            Attr.SENSITIVE: True,
            Attr.EXTRACTABLE: False,
            Attr.ENCRYPT: True,
            Attr.DECRYPT: True,
            Attr.WRAP: True,
            Attr.UNWRAP: True,
            Attr.SIGN: False,
            Attr.VERIFY: False,
            Attr.DERIVE: False,
        }
        template.update({Attr[name]: flag for name, flag in attributes.items()})
        with token_session(self.config(label), rw=True) as session:
            if value is None:
                session.generate_key(pkcs11.KeyType.AES, 256, label=label, store=True, template=template)
            else:
                session.create_object(
                    {
                        Attr.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                        Attr.KEY_TYPE: pkcs11.KeyType.AES,
                        Attr.VALUE: value,
                        Attr.LABEL: label,
                        **template,
                    }
                )
        return label

    def set_usage(self, label: str, allowed: bool) -> None:
        """Set CKA_ENCRYPT/DECRYPT/WRAP/UNWRAP of the key: False revokes its use."""
        import pkcs11
        from pkcs11 import Attribute as Attr

        with token_session(self.config(label), rw=True) as session:
            key = session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, label=label)
            for attribute in (Attr.ENCRYPT, Attr.DECRYPT, Attr.WRAP, Attr.UNWRAP):
                key[attribute] = allowed

    def destroy_key(self, label: str) -> None:
        import pkcs11

        with token_session(self.config(label), rw=True) as session:
            session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, label=label).destroy()

    def attributes(self, label: str, names: list[str], *, object_class: str = "SECRET_KEY") -> dict[str, Any]:
        import pkcs11
        from pkcs11 import Attribute as Attr

        with token_session(self.config(label)) as session:
            key = session.get_key(object_class=pkcs11.ObjectClass[object_class], label=label)
            values = key.get_attributes([Attr[name] for name in names])
        return {name: values[Attr[name]] for name in names}


@pytest.fixture(scope="session", name="softhsm")
def fixture_softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    util = shutil.which("softhsm2-util")
    if util is None or not Path(SOFTHSM_MODULE).exists():
        peer_missing("SoftHSM2 is not installed (apt-get install softhsm2)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        peer_missing("python-pkcs11 is not installed (the 'pkcs11' extra)")
    from providers import pkcs11 as provider_module

    if SOFTHSM_MODULE in provider_module._MODULES:
        pytest.fail("SoftHSM2 was loaded before its fixture: it would not see the test tokens")

    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    hsm = SoftHsm(root=root, user_pin="user-" + secrets.token_hex(8), so_pin="so-" + secrets.token_hex(8))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        for label in (hsm.token_label, hsm.spare_token_label):
            subprocess.run(
                [
                    util,
                    "--init-token",
                    "--free",
                    "--label",
                    label,
                    "--so-pin",
                    hsm.so_pin,
                    "--pin",
                    hsm.user_pin,
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
        yield hsm
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture
def peer_pkcs11(softhsm: SoftHsm) -> Peer:
    label = softhsm.create_key()

    async def disable() -> None:
        await asyncio.to_thread(softhsm.set_usage, label, False)

    @contextlib.asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        """SoftHSM runs in this process and cannot be stopped: another thread holds the module
        exactly as a call stuck inside a network HSM would, until the block ends."""
        entered, release = threading.Event(), threading.Event()

        def stuck_call() -> None:
            with token_session(softhsm.config(label)):
                entered.set()
                release.wait(60)

        holder = threading.Thread(target=stuck_call, daemon=True)
        holder.start()
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            yield
        finally:
            release.set()
            await asyncio.to_thread(holder.join, 20)

    return Peer(
        name="pkcs11",
        config=softhsm.config(label, timeout_seconds=1),
        unknown_key=softhsm.config(f"missing-{secrets.token_hex(4)}"),
        disable=disable,
        disabled_errors=(ProviderKeyDisabled,),
        outage=outage,
        notes="the outage is a call stuck in the module (SoftHSM has no server to stop)",
    )
