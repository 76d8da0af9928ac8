"""The `local` provider needs no peer: it wraps under a key derived from the master secret."""

from __future__ import annotations

import os

import pytest

from providers.local import LocalProviderConfig
from tests.providers.conftest import Peer


@pytest.fixture
def peer_local() -> Peer:
    return Peer(
        name="local",
        config=LocalProviderConfig(),
        unknown_key=None,
        connect_kwargs={"local_wrapping_key": os.urandom(32)},
        notes="no backend: unknown key, disable and outage do not apply",
    )
