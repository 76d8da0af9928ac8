"""The `pkcs11` provider against a real SoftHSM2 token (see tests/providers/peers/pkcs11.py).

Covers both mechanisms through conformance-style checks, the exact blob formats, the RFC 3394 /
RFC 5649 / Wycheproof key-wrap vectors run through the HSM's own C_WrapKey/C_UnwrapKey, the error
translation, the session pool, the process-wide login, BYOK, and PIN hygiene.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from providers import (
    KeyProvider,
    ProviderAccessDenied,
    ProviderConfigError,
    ProviderCryptoError,
    ProviderError,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderUnavailable,
    parse_provider_config,
)
from providers import pkcs11 as p11mod
from providers.pkcs11 import (
    CKM_AES_KEY_WRAP_KWP,
    CKM_AES_KEY_WRAP_PAD,
    SOFTHSM_MODULE,
    Pkcs11Config,
    Pkcs11LabelInUse,
    Pkcs11Unsupported,
    create_import_key,
    encode_context,
    import_key_label,
    import_wrapped_key,
    token_session,
)
from tests.conftest import VECTORS
from tests.providers.peers.pkcs11 import SoftHsm

CTX = {"tenant": "acme", "key": "volumes", "version": "1"}
MECHANISMS = ["aes-gcm", "aes-key-wrap-pad"]
CKM_AES_KEY_WRAP = 0x2109


@asynccontextmanager
async def connected(config: Pkcs11Config) -> AsyncIterator[KeyProvider]:
    provider = await config.connect()
    try:
        yield provider
    finally:
        await provider.close()


@pytest.fixture(params=MECHANISMS)
def mech_config(request: pytest.FixtureRequest, softhsm: SoftHsm) -> Pkcs11Config:
    """A fresh key, configured for each mechanism in turn."""
    return softhsm.config(softhsm.create_key(), mechanism=request.param)


# --- config --------------------------------------------------------------------------------------


def test_config_validates_from_plain_json_and_hides_the_pin() -> None:
    raw = (
        '{"type": "pkcs11", "token_label": "kek-token", "key_label": "tenant-kek", '
        '"pin": "pin-4711-secret", "mechanism": "aes-key-wrap-pad", "pool_size": 2}'
    )
    config = Pkcs11Config.model_validate_json(raw)
    assert config.pin.get_secret_value() == "pin-4711-secret"
    parsed = parse_provider_config(json.loads(raw))  # strict mode, plain str for the SecretStr
    assert isinstance(parsed, Pkcs11Config)
    assert parsed == config
    assert parsed.module_path == SOFTHSM_MODULE
    assert Pkcs11Config.model_validate({**json.loads(raw), "mechanism": "aes-gcm"}).mechanism == "aes-gcm"
    default = parse_provider_config({"type": "pkcs11", "token_label": "t", "key_label": "k", "pin": "1"})
    assert isinstance(default, Pkcs11Config)
    assert default.mechanism == "aes-gcm"
    assert default.pool_size == 4
    assert config.secret_fields == {"pin"}
    assert "pin" not in config.public_view()
    for text in (repr(config), str(config), json.dumps(config.public_view())):
        assert "pin-4711-secret" not in text
        assert "pin=" not in text  # left out, not even masked


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"module_path": "libsofthsm2.so"}, "module_path"),
        ({"module_path": "/usr/lib/../lib/softhsm/libsofthsm2.so"}, "module_path"),
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": 33}, "pool_size"),
        ({"pool_size": "4"}, "pool_size"),
        ({"mechanism": "aes-cbc"}, "mechanism"),
        ({"token_label": ""}, "token_label"),
        ({"token_label": "é" * 17}, "token_label"),
        ({"key_label": "bad\nlabel"}, "key_label"),
        ({"pin": ""}, "pin"),
        ({"pin": 1234}, "pin"),
        ({"slot": 0}, "slot"),
    ],
)
def test_config_rejects_bad_values_without_echoing_the_pin(change: dict[str, Any], field: str) -> None:
    raw = {"type": "pkcs11", "token_label": "t", "key_label": "k", "pin": "pin-4711-secret", **change}
    with pytest.raises(ProviderConfigError) as err:
        parse_provider_config(raw)
    assert f"provider.{field}" in str(err.value)
    assert "pin-4711-secret" not in str(err.value)


def test_importing_the_module_does_not_import_python_pkcs11() -> None:
    code = (
        "import sys; from providers import parse_provider_config; "
        "parse_provider_config({'type': 'pkcs11', 'token_label': 't', 'key_label': 'k', 'pin': '1'}); "
        "assert 'providers.pkcs11' in sys.modules; assert 'pkcs11' not in sys.modules, 'imported'"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- both mechanisms, conformance-style ----------------------------------------------------------


async def test_round_trip_of_any_length(mech_config: Pkcs11Config) -> None:
    async with connected(mech_config) as provider, connected(mech_config) as other:
        for size in (0, 1, 7, 8, 16, 20, 32, 33, 64):
            secret = os.urandom(size)
            blob = await provider.wrap(secret, context=CTX)
            assert blob[:1] == (b"\x01" if mech_config.mechanism == "aes-gcm" else b"\x02")
            assert size < 8 or secret not in blob
            assert await provider.unwrap(blob, context=CTX) == secret
            assert await other.unwrap(blob, context=CTX) == secret  # another connection
        info = await provider.describe()
        assert info.type == "pkcs11"
        assert info.key_ref == f"{mech_config.token_label}/{mech_config.key_label}"
        assert info.hsm_backed
        assert info.details["mechanism"] == mech_config.mechanism
        assert info.details["token_manufacturer"] == "SoftHSM project"
        assert info.details["token_model"] == "SoftHSM v2"


@pytest.mark.parametrize(
    "wrong",
    [
        {**CTX, "tenant": "acmf"},
        {**CTX, "version": "2"},
        {**CTX, "extra": ""},
        {"tenant": "acme", "version": "1"},
        {},
        {"tenant": "acme", "key": "volumes", "versio": "n1"},  # same characters, other split
        {"tenant": "acme", "key": "volumes1", "version": ""},
    ],
)
async def test_any_other_context_fails(mech_config: Pkcs11Config, wrong: dict[str, str]) -> None:
    async with connected(mech_config) as provider:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        with pytest.raises(ProviderCryptoError):
            await provider.unwrap(blob, context=wrong)


async def test_every_tampered_byte_and_length_fails(mech_config: Pkcs11Config) -> None:
    async with connected(mech_config) as provider:
        secret = os.urandom(32)
        blob = await provider.wrap(secret, context=CTX)
        bad: list[bytes] = []
        for position in range(len(blob)):
            for bit in (0x01, 0x80):
                tampered = bytearray(blob)
                tampered[position] ^= bit
                bad.append(bytes(tampered))
        bad += [blob[:cut] for cut in range(len(blob))] + [blob + b"\x00", blob + bytes(8)]
        for candidate in bad:
            with pytest.raises(ProviderCryptoError):
                await provider.unwrap(candidate, context=CTX)
        assert await provider.unwrap(blob, context=CTX) == secret  # the session survived it all


async def test_a_blob_from_another_key_or_mechanism_fails(softhsm: SoftHsm) -> None:
    label, other = softhsm.create_key(), softhsm.create_key()
    for mechanism in MECHANISMS:
        foreign_mechanism = MECHANISMS[1 - MECHANISMS.index(mechanism)]
        async with (
            connected(softhsm.config(label, mechanism=mechanism)) as provider,
            connected(softhsm.config(other, mechanism=mechanism)) as stranger,
            connected(softhsm.config(label, mechanism=foreign_mechanism)) as sibling,
        ):
            blob = await provider.wrap(os.urandom(32), context=CTX)
            for wrong_provider in (stranger, sibling):
                with pytest.raises(ProviderCryptoError):
                    await wrong_provider.unwrap(blob, context=CTX)


async def test_disabled_then_destroyed_key(mech_config: Pkcs11Config, softhsm: SoftHsm) -> None:
    async with connected(mech_config) as provider:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        assert (await provider.health()).ok
        await asyncio.to_thread(softhsm.set_usage, mech_config.key_label, False)
        for call in (provider.unwrap(blob, context=CTX), provider.wrap(os.urandom(32), context=CTX)):
            with pytest.raises(ProviderKeyDisabled) as err:
                await call
            assert "CKA_" in str(err.value)  # says which attribute to set
        health = await provider.health()
        assert not health.ok
        assert "CKA_" in health.detail
        await asyncio.to_thread(softhsm.destroy_key, mech_config.key_label)
        for call in (provider.unwrap(blob, context=CTX), provider.wrap(os.urandom(32), context=CTX)):
            with pytest.raises(ProviderKeyNotFound) as found:
                await call
            assert mech_config.key_label in str(found.value)
        assert not (await provider.health()).ok


async def test_fifty_concurrent_calls_share_the_session_pool(mech_config: Pkcs11Config) -> None:
    async with connected(mech_config) as provider:
        assert isinstance(provider, p11mod.Pkcs11Provider)
        secrets_ = [os.urandom(32) for _ in range(25)]
        blobs = await asyncio.gather(*(provider.wrap(s, context=CTX) for s in secrets_))
        calls = [provider.unwrap(b, context=CTX) for b in blobs] + [
            provider.wrap(s, context=CTX) for s in secrets_
        ]
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
        assert results[:25] == secrets_
        for secret, blob in zip(secrets_, results[25:], strict=True):
            assert await provider.unwrap(blob, context=CTX) == secret
        assert 1 <= provider.sessions_opened <= mech_config.pool_size  # reused, never one per call
    async with connected(mech_config.model_copy(update={"pool_size": 1})) as single:
        assert isinstance(single, p11mod.Pkcs11Provider)
        done = await asyncio.gather(*(single.unwrap(b, context=CTX) for b in blobs * 2))
        assert done == secrets_ * 2
        assert single.sessions_opened == 1


# --- exact blob formats, checked against a KEK whose value the test knows ------------------------

EXPECTED_AAD = b"\x00\x03key\x00\x07volumes\x00\x06tenant\x00\x04acme\x00\x07version\x00\x011"


def _enc(*parts: str) -> bytes:
    return b"".join(len(p.encode()).to_bytes(2, "big") + p.encode() for p in parts)


def test_context_encoding_is_length_prefixed_and_sorted() -> None:
    assert encode_context(CTX) == EXPECTED_AAD
    assert encode_context({"a": "bc"}) != encode_context({"ab": "c"})
    assert encode_context({"b": "1", "a": "2"}) == encode_context({"a": "2", "b": "1"})


async def test_gcm_blob_is_aes_gcm_over_the_encoded_context(softhsm: SoftHsm) -> None:
    kek = os.urandom(32)
    config = softhsm.config(softhsm.create_key(value=kek), mechanism="aes-gcm")
    secret = os.urandom(32)
    async with connected(config) as provider:
        blob = await provider.wrap(secret, context=CTX)
        assert len(blob) == 1 + 12 + 32 + 16
        assert AESGCM(kek).decrypt(blob[1:13], blob[13:], EXPECTED_AAD) == secret
        iv = os.urandom(12)
        mine = b"\x01" + iv + AESGCM(kek).encrypt(iv, secret, EXPECTED_AAD)
        assert await provider.unwrap(mine, context=CTX) == secret


async def test_kwp_blob_is_rfc5649_of_secret_pad_and_context_mac(softhsm: SoftHsm) -> None:
    kek = os.urandom(32)
    config = softhsm.config(softhsm.create_key(value=kek), mechanism="aes-key-wrap-pad")
    label = _enc("kms/pkcs11/v1", "aes-key-wrap-pad context")
    async with connected(config) as provider:
        for size in (16, 20, 32, 64):
            secret = os.urandom(size)
            pad = 8 - size % 8
            mac = hmac.new(secret, label + EXPECTED_AAD, hashlib.sha256).digest()
            payload = secret + bytes([pad]) * pad + mac
            blob = await provider.wrap(secret, context=CTX)
            assert blob == b"\x02" + keywrap.aes_key_wrap_with_padding(kek, payload)
            assert await provider.unwrap(
                b"\x02" + keywrap.aes_key_wrap_with_padding(kek, payload), context=CTX
            )
            # A well-formed payload carrying another context's MAC is refused.
            forged = secret + bytes([pad]) * pad + hmac.new(secret, label, hashlib.sha256).digest()
            with pytest.raises(ProviderCryptoError):
                await provider.unwrap(b"\x02" + keywrap.aes_key_wrap_with_padding(kek, forged), context=CTX)


# --- RFC 3394 / RFC 5649 / Wycheproof through the HSM's key-wrap mechanisms ----------------------


@pytest.fixture(scope="module")
def kwp_mechanism(softhsm: SoftHsm) -> int:
    """The RFC 5649 mechanism the provider picks on this token (KWP if offered, else PAD)."""
    with token_session(softhsm.config("none")) as session:
        offered = {int(m) for m in session.token.slot.get_mechanisms()}
    assert CKM_AES_KEY_WRAP in offered
    return CKM_AES_KEY_WRAP_KWP if CKM_AES_KEY_WRAP_KWP in offered else CKM_AES_KEY_WRAP_PAD


def _hsm_objects(session: Any, kek: bytes) -> Any:
    import pkcs11
    from pkcs11 import Attribute as Attr

    return session.create_object(
        {
            Attr.CLASS: pkcs11.ObjectClass.SECRET_KEY,
            Attr.KEY_TYPE: pkcs11.KeyType.AES,
            Attr.VALUE: kek,
            Attr.TOKEN: False,
            Attr.SENSITIVE: True,
            Attr.EXTRACTABLE: False,
            Attr.WRAP: True,
            Attr.UNWRAP: True,
        }
    )


def hsm_wrap(hsm: SoftHsm, kek: bytes, data: bytes, mechanism: int) -> bytes:
    """C_WrapKey of ``data`` (an extractable generic secret) by ``kek`` (sensitive, not extractable)."""
    import pkcs11
    from pkcs11 import Attribute as Attr

    with token_session(hsm.config("vectors")) as session:
        wrapping = _hsm_objects(session, kek)
        target = session.create_object(
            {
                Attr.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                Attr.KEY_TYPE: pkcs11.KeyType.GENERIC_SECRET,
                Attr.VALUE: data,
                Attr.TOKEN: False,
                Attr.SENSITIVE: False,
                Attr.EXTRACTABLE: True,
            }
        )
        return bytes(wrapping.wrap_key(target, mechanism=pkcs11.Mechanism(mechanism)))


def hsm_unwrap(hsm: SoftHsm, kek: bytes, wrapped: bytes, mechanism: int) -> bytes:
    """C_UnwrapKey of ``wrapped`` into a readable session object; python-pkcs11 errors propagate."""
    import pkcs11
    from pkcs11 import Attribute as Attr

    with token_session(hsm.config("vectors")) as session:
        unwrapping = _hsm_objects(session, kek)
        plain = unwrapping.unwrap_key(
            pkcs11.ObjectClass.SECRET_KEY,
            pkcs11.KeyType.GENERIC_SECRET,
            wrapped,
            mechanism=pkcs11.Mechanism(mechanism),
            template={Attr.TOKEN: False, Attr.SENSITIVE: False, Attr.EXTRACTABLE: True},
        )
        return bytes(plain[Attr.VALUE])


def _rfc(name: str, *groups: str) -> list[Any]:
    data = json.loads((VECTORS / name).read_text())
    return [pytest.param(t, id=str(t["tcId"])) for group in groups for t in data.get(group, [])]


def _wycheproof(name: str, results: set[str], *, with_file: bool = False) -> list[Any]:
    data = json.loads((VECTORS / name).read_text())
    return [
        pytest.param(*((name, t) if with_file else (t,)), id=f"{t['tcId']}-{'-'.join(t['flags']) or 'plain'}")
        for group in data["testGroups"]
        for t in group["tests"]
        if t["result"] in results
    ]


@pytest.mark.parametrize("vector", _rfc("rfc3394.json", "tests", "other_kek_sizes"))
def test_rfc3394_vectors_through_the_hsm(softhsm: SoftHsm, vector: dict[str, str]) -> None:
    kek, data, ct = (bytes.fromhex(vector[k]) for k in ("kek", "key_data", "ciphertext"))
    assert hsm_wrap(softhsm, kek, data, CKM_AES_KEY_WRAP) == ct
    assert hsm_unwrap(softhsm, kek, ct, CKM_AES_KEY_WRAP) == data


@pytest.mark.parametrize("vector", _rfc("rfc5649.json", "tests"))
def test_rfc5649_vectors_unwrap_through_the_hsm(
    softhsm: SoftHsm, kwp_mechanism: int, vector: dict[str, str]
) -> None:
    kek, data, ct = (bytes.fromhex(vector[k]) for k in ("kek", "key_data", "ciphertext"))
    assert hsm_unwrap(softhsm, kek, ct, kwp_mechanism) == data


@pytest.mark.parametrize("vector", _rfc("rfc5649.json", "tests"))
def test_rfc5649_vectors_wrap_through_the_hsm(
    softhsm: SoftHsm, kwp_mechanism: int, vector: dict[str, str]
) -> None:
    """Both RFC 5649 examples wrap unaligned key data (20 and 7 bytes). SoftHSM 2.6 zero-pads key
    data to a multiple of 8 *before* its RFC 5649 wrap, so the MLI says 24 (or 8) instead of 20
    (or 7): its output is then exactly RFC 5649 of the zero-padded data, which this test checks
    before marking the known bug xfail. The provider only wraps aligned payloads (see
    test_kwp_blob_is_rfc5649_of_secret_pad_and_context_mac), so its blobs are not affected."""
    kek, data, ct = (bytes.fromhex(vector[k]) for k in ("kek", "key_data", "ciphertext"))
    wrapped = hsm_wrap(softhsm, kek, data, kwp_mechanism)
    if wrapped != ct:
        zero_padded = data + bytes(-len(data) % 8)
        assert wrapped == keywrap.aes_key_wrap_with_padding(kek, zero_padded)
        pytest.xfail("SoftHSM 2.6 zero-pads before RFC 5649 wrap (wrong MLI for unaligned key data)")
    assert wrapped == ct


@pytest.mark.parametrize("vector", _wycheproof("aes_kwp_test.json", {"valid"}))
def test_wycheproof_kwp_valid_through_the_hsm(
    softhsm: SoftHsm, kwp_mechanism: int, vector: dict[str, Any]
) -> None:
    kek, msg, ct = (bytes.fromhex(vector[k]) for k in ("key", "msg", "ct"))
    assert hsm_unwrap(softhsm, kek, ct, kwp_mechanism) == msg
    if len(msg) % 8 == 0:  # unaligned wraps hit the SoftHSM bug above
        assert hsm_wrap(softhsm, kek, msg, kwp_mechanism) == ct


@pytest.mark.parametrize("vector", _wycheproof("aes_wrap_test.json", {"valid"}))
def test_wycheproof_wrap_valid_through_the_hsm(softhsm: SoftHsm, vector: dict[str, Any]) -> None:
    kek, msg, ct = (bytes.fromhex(vector[k]) for k in ("key", "msg", "ct"))
    assert hsm_wrap(softhsm, kek, msg, CKM_AES_KEY_WRAP) == ct
    assert hsm_unwrap(softhsm, kek, ct, CKM_AES_KEY_WRAP) == msg


@pytest.mark.parametrize(
    ("file", "vector"),
    _wycheproof("aes_kwp_test.json", {"invalid"}, with_file=True)
    + _wycheproof("aes_wrap_test.json", {"invalid"}, with_file=True),
)
def test_wycheproof_invalid_refused_by_the_hsm(
    softhsm: SoftHsm, kwp_mechanism: int, file: str, vector: dict[str, Any]
) -> None:
    import pkcs11

    kek, ct = bytes.fromhex(vector["key"]), bytes.fromhex(vector["ct"])
    mechanism = kwp_mechanism if file == "aes_kwp_test.json" else CKM_AES_KEY_WRAP
    with pytest.raises(pkcs11.PKCS11Error):
        hsm_unwrap(softhsm, kek, ct, mechanism)


# --- errors, timeouts, the pool and the shared login ---------------------------------------------


async def test_wrong_pin_is_access_denied_and_never_echoed(
    softhsm: SoftHsm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + secrets.token_hex(8)
    # No provider is logged in to the spare token: the HSM's C_Login itself refuses.
    with pytest.raises(ProviderAccessDenied) as at_login:
        await softhsm.config("any", token_label=softhsm.spare_token_label, pin=wrong).connect()
    assert "PIN incorrect" in str(at_login.value)
    async with connected(softhsm.config("any", token_label=softhsm.spare_token_label)):
        pass  # the right PIN is accepted there
    # While a provider holds the main token's login, C_Login would answer "already logged in"
    # whatever the PIN: the PIN is checked against the one that logged in.
    label = softhsm.create_key()
    async with connected(softhsm.config(label)) as good:
        with pytest.raises(ProviderAccessDenied) as while_logged_in:
            await softhsm.config(label, pin=wrong).connect()
        assert "PIN incorrect" in str(while_logged_in.value)
        blob = await good.wrap(b"k" * 32, context=CTX)
        assert await good.unwrap(blob, context=CTX) == b"k" * 32
    for error in (at_login.value, while_logged_in.value):
        for text in (str(error), repr(error)):
            assert wrong not in text
            assert softhsm.user_pin not in text
    assert wrong not in caplog.text
    assert softhsm.user_pin not in caplog.text


async def test_unknown_token_and_unloadable_module(softhsm: SoftHsm, tmp_path: Path) -> None:
    with pytest.raises(ProviderKeyNotFound) as err:
        await softhsm.config("k", token_label="no-such-token").connect()
    assert "no-such-token" in str(err.value)
    with pytest.raises(ProviderUnavailable):
        await softhsm.config("k", module_path=str(tmp_path / "missing.so")).connect()
    not_a_library = tmp_path / "not-a-library.so"
    not_a_library.write_bytes(b"plain text")
    with pytest.raises(ProviderUnavailable) as load:
        await softhsm.config("k", module_path=str(not_a_library)).connect()
    assert "could not load the PKCS#11 module" in str(load.value)


async def test_keys_that_are_extractable_or_lack_the_usage_are_refused(softhsm: SoftHsm) -> None:
    extractable = softhsm.create_key(EXTRACTABLE=True)
    async with connected(softhsm.config(extractable)) as provider:
        with pytest.raises(ProviderKeyDisabled) as err:
            await provider.wrap(os.urandom(32), context=CTX)
        assert "CKA_EXTRACTABLE=false" in str(err.value)
    encrypt_only = softhsm.create_key(WRAP=False, UNWRAP=False)
    async with connected(softhsm.config(encrypt_only, mechanism="aes-key-wrap-pad")) as provider:
        with pytest.raises(ProviderKeyDisabled) as err:
            await provider.wrap(os.urandom(32), context=CTX)
        assert "CKA_WRAP and CKA_UNWRAP" in str(err.value)
    async with connected(softhsm.config(encrypt_only, mechanism="aes-gcm")) as provider:
        blob = await provider.wrap(b"s" * 32, context=CTX)
        assert await provider.unwrap(blob, context=CTX) == b"s" * 32


def _pkcs11_error(name: str) -> BaseException:
    import pkcs11

    if name == "0x68":
        return pkcs11.PKCS11Error("Unmapped error code 0x68")  # CKR_KEY_FUNCTION_NOT_PERMITTED
    if name == "not-initialised":
        return pkcs11.PKCS11Error("Initialisation error (not initialized). Should never see this.")
    exc: BaseException = getattr(pkcs11, name)()
    return exc


@pytest.mark.parametrize(
    ("name", "unwrapping", "expected"),
    [
        ("PinIncorrect", False, ProviderAccessDenied),
        ("PinLocked", False, ProviderAccessDenied),
        ("PinExpired", False, ProviderAccessDenied),
        ("UserAlreadyLoggedIn", False, ProviderAccessDenied),
        ("NoSuchToken", False, ProviderKeyNotFound),
        ("NoSuchKey", False, ProviderKeyNotFound),
        ("ObjectHandleInvalid", False, ProviderKeyNotFound),
        ("0x68", False, ProviderKeyDisabled),
        ("0x68", True, ProviderKeyDisabled),
        ("KeyTypeInconsistent", False, ProviderKeyDisabled),
        ("MechanismInvalid", False, ProviderKeyDisabled),
        ("AttributeSensitive", True, ProviderKeyDisabled),
        ("GeneralError", True, ProviderCryptoError),
        ("EncryptedDataInvalid", True, ProviderCryptoError),
        ("WrappedKeyInvalid", True, ProviderCryptoError),
        ("WrappedKeyLenRange", True, ProviderCryptoError),
        ("GeneralError", False, ProviderUnavailable),
        ("DeviceRemoved", False, ProviderUnavailable),
        ("DeviceRemoved", True, ProviderUnavailable),
        ("TokenNotPresent", True, ProviderUnavailable),
        ("SessionHandleInvalid", False, ProviderUnavailable),
        ("not-initialised", False, ProviderUnavailable),
        ("DeviceError", False, ProviderUnavailable),
    ],
)
def test_error_translation(name: str, unwrapping: bool, expected: type[ProviderError]) -> None:
    names = p11mod._Names("/opt/hsm/lib.so", "tok", "key-1")
    error = names.translate(_pkcs11_error(name), doing="unwrap", unwrapping=unwrapping)
    assert type(error) is expected
    assert str(error)


async def test_a_call_stuck_in_the_module_fails_within_the_timeout(softhsm: SoftHsm) -> None:
    """SoftHSM cannot be made to hang, so another thread holds the module exactly as a call stuck
    inside a network HSM would: every call must fail with ProviderUnavailable within its timeout
    (the waits here are bounds against a hang, not speed checks) and recover afterwards."""
    label = softhsm.create_key()
    config = softhsm.config(label, timeout_seconds=0.5)
    entered, release = threading.Event(), threading.Event()

    def stuck_call() -> None:
        with token_session(softhsm.config(label)):
            entered.set()
            release.wait(20)

    async with connected(config) as provider:
        secret = os.urandom(32)
        blob = await provider.wrap(secret, context=CTX)
        holder = threading.Thread(target=stuck_call)
        holder.start()
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            for call in (provider.unwrap(blob, context=CTX), provider.wrap(os.urandom(32), context=CTX)):
                with pytest.raises(ProviderUnavailable):
                    await asyncio.wait_for(call, timeout=10)
            health = await asyncio.wait_for(provider.health(), timeout=10)
            assert not health.ok
            assert health.detail
        finally:
            release.set()
            await asyncio.to_thread(holder.join, 20)
        assert await provider.unwrap(blob, context=CTX) == secret


async def test_providers_share_one_login_per_token(softhsm: SoftHsm) -> None:
    """python-pkcs11 runs C_Logout when a session opened with a PIN closes, which logs out every
    session of the process: closing one provider (or an admin session) must not break another."""
    label = softhsm.create_key()
    secret = os.urandom(32)
    first = await softhsm.config(label).connect()
    async with connected(softhsm.config(label)) as second:
        blob = await first.wrap(secret, context=CTX)
        await first.close()
        assert await second.unwrap(blob, context=CTX) == secret
        assert softhsm.attributes(label, ["SENSITIVE"]) == {"SENSITIVE": True}  # admin session in and out
        assert await second.unwrap(blob, context=CTX) == secret
    async with connected(softhsm.config(label)) as third:  # the last user left: a fresh login
        assert await third.unwrap(blob, context=CTX) == secret


async def test_a_dropped_login_is_recovered(softhsm: SoftHsm) -> None:
    """The HSM forgets the login (failover, reset): the next call logs in again by itself."""
    label = softhsm.create_key()
    async with connected(softhsm.config(label)) as provider:
        blob = await provider.wrap(b"r" * 32, context=CTX)
        login = p11mod._MODULES[SOFTHSM_MODULE].login_for(softhsm.token_label)
        with p11mod._MODULES[SOFTHSM_MODULE].lock:
            login._close_anchor()  # C_Logout: every session of the process is logged out
        assert await provider.unwrap(blob, context=CTX) == b"r" * 32


async def test_close_is_idempotent_and_calls_after_close_fail(softhsm: SoftHsm) -> None:
    provider = await softhsm.config(softhsm.create_key()).connect()
    await provider.close()
    await provider.close()
    with pytest.raises(ProviderUnavailable):
        await provider.wrap(os.urandom(32), context=CTX)
    assert not (await provider.health()).ok


# --- BYOK ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def import_key(softhsm: SoftHsm) -> tuple[RSAPublicKey, str]:
    """One RSA-3072 import key pair generated inside the token (key generation takes a while)."""
    der = asyncio.run(create_import_key(softhsm.config("byok")))
    public = serialization.load_der_public_key(der)
    assert isinstance(public, RSAPublicKey)
    return public, import_key_label(der)


def _oaep(algorithm: hashes.HashAlgorithm) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=None)


async def test_byok_key_material_is_unwrapped_inside_the_hsm(
    softhsm: SoftHsm, import_key: tuple[RSAPublicKey, str]
) -> None:
    """SoftHSM 2.6 unwraps RSA-OAEP with SHA-1 only (see the SHA-256 test below)."""
    public, label = import_key
    assert public.key_size == 3072
    assert softhsm.attributes(
        label, ["SENSITIVE", "EXTRACTABLE", "UNWRAP", "DECRYPT", "SIGN", "TOKEN"], object_class="PRIVATE_KEY"
    ) == {
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "UNWRAP": True,
        "DECRYPT": False,
        "SIGN": False,
        "TOKEN": True,
    }
    material = os.urandom(32)
    new_label = f"byok-{secrets.token_hex(4)}"
    imported = await import_wrapped_key(
        softhsm.config("byok"),
        import_key_label=label,
        wrapped_key=public.encrypt(material, _oaep(hashes.SHA1())),
        new_key_label=new_label,
        oaep_hash="sha1",
    )
    assert imported.key_label == new_label
    assert softhsm.attributes(new_label, ["EXTRACTABLE", "SENSITIVE", "TOKEN", "PRIVATE"]) == {
        "EXTRACTABLE": False,
        "SENSITIVE": True,
        "TOKEN": True,
        "PRIVATE": True,
    }
    import pkcs11

    with pytest.raises(pkcs11.AttributeSensitive):  # the material cannot be read back
        softhsm.attributes(new_label, ["VALUE"])
    for mechanism in MECHANISMS:
        async with connected(imported.model_copy(update={"mechanism": mechanism})) as provider:
            secret = os.urandom(32)
            blob = await provider.wrap(secret, context=CTX)
            assert await provider.unwrap(blob, context=CTX) == secret
    # The HSM key is exactly the customer's material: a blob sealed with it outside opens inside.
    iv = os.urandom(12)
    async with connected(imported) as provider:
        sealed = b"\x01" + iv + AESGCM(material).encrypt(iv, b"m" * 32, EXPECTED_AAD)
        assert await provider.unwrap(sealed, context=CTX) == b"m" * 32


async def test_byok_with_oaep_sha256(softhsm: SoftHsm, import_key: tuple[RSAPublicKey, str]) -> None:
    public, label = import_key
    material = os.urandom(32)
    new_label = f"byok256-{secrets.token_hex(4)}"
    unsupported: Pkcs11Unsupported | None = None
    try:
        imported = await import_wrapped_key(
            softhsm.config("byok"),
            import_key_label=label,
            wrapped_key=public.encrypt(material, _oaep(hashes.SHA256())),
            new_key_label=new_label,
        )
    except Pkcs11Unsupported as exc:
        unsupported = exc
    if unsupported is not None:
        assert "RSA-OAEP with SHA256" in str(unsupported)
        with pytest.raises(ProviderKeyNotFound):  # nothing half-imported
            async with connected(softhsm.config(new_label)) as provider:
                await provider.wrap(b"x" * 32, context=CTX)
        pytest.xfail("SoftHSM 2.6 implements RSA-OAEP with SHA-1 only (CKR_ARGUMENTS_BAD for SHA-256)")
    async with connected(imported) as provider:
        iv = os.urandom(12)
        sealed = b"\x01" + iv + AESGCM(material).encrypt(iv, b"m" * 32, EXPECTED_AAD)
        assert await provider.unwrap(sealed, context=CTX) == b"m" * 32


async def test_byok_refusals(softhsm: SoftHsm, import_key: tuple[RSAPublicKey, str]) -> None:
    public, label = import_key
    wrapped = public.encrypt(os.urandom(32), _oaep(hashes.SHA1()))
    config = softhsm.config("byok")
    with pytest.raises(ProviderKeyNotFound):
        await import_wrapped_key(
            config,
            import_key_label="kms-import-none",
            wrapped_key=wrapped,
            new_key_label="x",
            oaep_hash="sha1",
        )
    taken = softhsm.create_key()
    with pytest.raises(Pkcs11LabelInUse):
        await import_wrapped_key(
            config, import_key_label=label, wrapped_key=wrapped, new_key_label=taken, oaep_hash="sha1"
        )
    corrupted = bytearray(wrapped)
    corrupted[10] ^= 1
    with pytest.raises(ProviderCryptoError):
        await import_wrapped_key(
            config, import_key_label=label, wrapped_key=bytes(corrupted), new_key_label="y", oaep_hash="sha1"
        )
    with pytest.raises(ValueError, match="new_key_label"):  # validated before touching the HSM
        await import_wrapped_key(
            config, import_key_label=label, wrapped_key=wrapped, new_key_label="bad\nlabel", oaep_hash="sha1"
        )


# --- PIN hygiene ---------------------------------------------------------------------------------


@pytest.fixture
def log_everything(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


async def test_pin_never_in_logs_errors_or_reprs(
    softhsm: SoftHsm, log_everything: pytest.LogCaptureFixture, import_key: tuple[RSAPublicKey, str]
) -> None:
    pin, wrong = softhsm.user_pin, "wrong-" + secrets.token_hex(8)
    label = softhsm.create_key()
    config = softhsm.config(label)
    texts = [repr(config), str(config), json.dumps(config.public_view()), config.model_dump_json()]
    errors: list[BaseException] = []

    async def expect_error(coro: Any) -> None:
        try:
            await coro
        except Exception as exc:
            errors.append(exc)
        else:
            raise AssertionError("expected an error")

    async with connected(config) as provider:
        texts += [repr(provider), str(await provider.describe()), str(await provider.health())]
        blob = await provider.wrap(os.urandom(32), context=CTX)
        await provider.unwrap(blob, context=CTX)
        await expect_error(provider.unwrap(blob, context={**CTX, "tenant": "x"}))
        await expect_error(softhsm.config(label, pin=wrong).connect())
        await expect_error(softhsm.config("none", token_label=softhsm.spare_token_label, pin=wrong).connect())
        await expect_error(_wrap_missing(softhsm))
        await asyncio.to_thread(softhsm.set_usage, label, False)
        await expect_error(provider.unwrap(blob, context=CTX))
        texts.append(str(await provider.health()))
    _, import_label = import_key
    await expect_error(
        import_wrapped_key(
            config,
            import_key_label=import_label,
            wrapped_key=b"\x00" * 384,
            new_key_label="z",
            oaep_hash="sha1",
        )
    )
    try:
        parse_provider_config({"type": "pkcs11", "token_label": "t", "key_label": "k", "pin": pin, "x": 1})
    except ProviderConfigError as exc:
        errors.append(exc)
    assert len(errors) == 7
    haystack = log_everything.text + "\n".join(texts + [f"{e!r} {e}" for e in errors])
    assert pin not in haystack
    assert wrong not in haystack


async def _wrap_missing(softhsm: SoftHsm) -> None:
    async with connected(softhsm.config(f"missing-{secrets.token_hex(3)}")) as provider:
        await provider.wrap(os.urandom(32), context=CTX)
