"""One conformance suite for every provider, each against its real peer (DESIGN §3)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os

import pytest
from pydantic import SecretBytes, SecretStr

from providers import KeyProvider, ProviderCryptoError, ProviderKeyNotFound, ProviderUnavailable
from tests.providers.conftest import Peer

CTX = {"tenant": "acme", "key": "volumes", "version": "1"}
HANG_BOUND = 3.0  # multiples of the configured timeout after which a call counts as hung


async def connect(peer: Peer) -> KeyProvider:
    return await peer.config.connect(**peer.connect_kwargs)


async def test_round_trip(peer: Peer) -> None:
    provider = await connect(peer)
    try:
        for size in (16, 32, 64):
            secret = os.urandom(size)
            blob = await provider.wrap(secret, context=CTX)
            assert secret not in blob
            assert await provider.unwrap(blob, context=CTX) == secret
        # A fresh connection (another replica) unwraps what this one wrapped.
        other = await connect(peer)
        try:
            assert await other.unwrap(blob, context=CTX) == secret
        finally:
            await other.close()
    finally:
        await provider.close()


@pytest.mark.parametrize("field", ["tenant", "key", "version"])
async def test_wrong_context_fails(peer: Peer, field: str) -> None:
    provider = await connect(peer)
    try:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        with pytest.raises(ProviderCryptoError):
            await provider.unwrap(blob, context={**CTX, field: CTX[field] + "x"})
    finally:
        await provider.close()


async def test_tampered_blob_fails(peer: Peer) -> None:
    provider = await connect(peer)
    try:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        for position in (0, len(blob) // 2, len(blob) - 1):
            tampered = bytearray(blob)
            tampered[position] ^= 0x01
            with pytest.raises(ProviderCryptoError):
                await provider.unwrap(bytes(tampered), context=CTX)
        with pytest.raises(ProviderCryptoError):
            await provider.unwrap(blob[:-1], context=CTX)
        with pytest.raises(ProviderCryptoError):
            await provider.unwrap(b"", context=CTX)
    finally:
        await provider.close()


async def test_unknown_key_is_a_clear_error(peer: Peer) -> None:
    if peer.unknown_key is None:
        pytest.skip(f"{peer.name}: {peer.notes or 'no notion of an unknown key'}")
    provider = await peer.unknown_key.connect(**peer.connect_kwargs)
    try:
        with pytest.raises(ProviderKeyNotFound) as err:
            await provider.wrap(os.urandom(32), context=CTX)
        assert str(err.value)
    finally:
        await provider.close()


async def test_key_disabled_at_the_backend(peer: Peer) -> None:
    if peer.disable is None:
        pytest.skip(f"{peer.name}: {peer.notes or 'the peer does not enforce key state'}")
    provider = await connect(peer)
    try:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        await peer.disable()
        with pytest.raises(peer.disabled_errors):
            await provider.unwrap(blob, context=CTX)
        with pytest.raises(peer.disabled_errors):
            await provider.wrap(os.urandom(32), context=CTX)
    finally:
        await provider.close()


async def test_health_reports_latency(peer: Peer) -> None:
    provider = await connect(peer)
    try:
        health = await provider.health()
        assert health.ok, health.detail
        assert health.latency_ms >= 0
        info = await provider.describe()
        assert info.type == peer.config.type
        assert info.key_ref
    finally:
        await provider.close()


async def test_unreachable_peer_errors_within_the_timeout(peer: Peer) -> None:
    if peer.outage is None:
        pytest.skip(f"{peer.name}: {peer.notes or 'no outage to simulate'}")
    provider = await connect(peer)
    try:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        bound = peer.config.timeout_seconds * HANG_BOUND + 5
        async with peer.outage():
            for call in (provider.unwrap(blob, context=CTX), provider.wrap(os.urandom(32), context=CTX)):
                with pytest.raises(ProviderUnavailable):
                    await asyncio.wait_for(call, timeout=bound)
            health = await asyncio.wait_for(provider.health(), timeout=bound)
            assert not health.ok
    finally:
        await provider.close()


async def test_concurrent_unwraps(peer: Peer) -> None:
    provider = await connect(peer)
    try:
        secrets = [os.urandom(32) for _ in range(50)]
        blobs = [await provider.wrap(s, context=CTX) for s in secrets[:5]]
        blobs = [blobs[i % 5] for i in range(50)]
        results = await asyncio.gather(*(provider.unwrap(b, context=CTX) for b in blobs))
        assert results == [secrets[i % 5] for i in range(50)]
    finally:
        await provider.close()


async def test_no_key_material_in_logs_or_errors(peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    provider = await connect(peer)
    secret = os.urandom(32)
    errors: list[str] = []
    try:
        blob = await provider.wrap(secret, context=CTX)
        await provider.unwrap(blob, context=CTX)
        for bad in (blob[:-1], bytes(len(blob))):
            try:
                await provider.unwrap(bad, context=CTX)
            except Exception as exc:
                errors.append(f"{exc!r} {exc}")
        try:
            await provider.unwrap(blob, context={**CTX, "tenant": "other"})
        except Exception as exc:
            errors.append(f"{exc!r} {exc}")
    finally:
        await provider.close()
    haystack = caplog.text + "\n".join(errors) + repr(provider) + repr(peer.config)
    for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
        assert form not in haystack
    for name in peer.config.secret_fields:
        value = getattr(peer.config, name)
        if value is None:
            continue
        if isinstance(value, (SecretStr, SecretBytes)):
            value = value.get_secret_value()
        shown = value.decode() if isinstance(value, bytes) else str(value)
        assert shown not in haystack, f"secret field {name} leaked"
