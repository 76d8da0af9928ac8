"""The provider conformance suite's peers.

Each module in `tests/providers/peers/` provides one backend's peer as a fixture named
`peer_<module>` returning a :class:`Peer` (a working key on a real peer, plus hooks to break it).
They are discovered here, so adding a backend adds a file and changes nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import pytest

import tests.providers.peers as peers_pkg
from providers import ProviderAccessDenied, ProviderConfig, ProviderError, ProviderKeyDisabled


@dataclass
class Peer:
    """One backend key on a real peer, as the conformance suite needs it."""

    name: str
    config: ProviderConfig
    """Config of a working, enabled key."""
    unknown_key: ProviderConfig | None
    """Config naming a key that does not exist on the peer (None: the backend cannot express it)."""
    disable: Callable[[], Awaitable[None]] | None = None
    """Disable/revoke the working key at the backend (None: the peer does not enforce it)."""
    outage: Callable[[], AbstractAsyncContextManager[None]] | None = None
    """Within this block the peer is stopped or paused (None: cannot be simulated)."""
    connect_kwargs: dict[str, Any] = field(default_factory=dict)
    disabled_errors: tuple[type[ProviderError], ...] = (ProviderKeyDisabled, ProviderAccessDenied)
    notes: str = ""


PEER_MODULES = sorted(m.name for m in pkgutil.iter_modules(peers_pkg.__path__) if not m.name.startswith("_"))

for _name in PEER_MODULES:
    _module = importlib.import_module(f"tests.providers.peers.{_name}")
    for _attr in dir(_module):
        if _attr.startswith(("peer_", "fixture_")):
            globals()[_attr] = getattr(_module, _attr)


@pytest.fixture(params=PEER_MODULES)
def peer(request: pytest.FixtureRequest) -> Peer:
    value: Peer = request.getfixturevalue(f"peer_{request.param}")
    return value
