"""Known-answer tests generated from the vector files in shared/vectors (DESIGN §2).

One pytest case per vector (ids carry the file's tcId), in the style of pyca/cryptography's
``tests/hazmat/primitives/test_hkdf_vectors.py``:

- RFC 5869 Appendix A (SHA-256) and every Wycheproof HKDF-SHA256 case through ``hkdf_sha256``;
- the Wycheproof AES-GCM cases with 96-bit IVs and 128-bit tags (the only shape our ciphertext
  format uses) through cryptography's ``AESGCM``, the primitive ``seal``/``open_ciphertext`` use;
- every entry of ``kms_v1_golden.json`` through the kms/v1 derivations and ciphertext format,
  including a byte-for-byte re-seal of each golden ciphertext.

The loaders check the case counts against the files (``numberOfTests``) at collection time, so a
broken loader fails the run instead of silently parametrizing over nothing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from kms_service.crypto import (
    DecryptionFailed,
    audit_key,
    cluster_id,
    derive_dek,
    derive_local_kek,
    enc,
    hkdf_sha256,
    open_ciphertext,
    parse_ciphertext,
    seal,
)
from tests.conftest import VECTORS

Case = dict[str, Any]

# Sizes of the vector files as shipped. The Wycheproof files state their own totals
# (numberOfTests, checked below); the others are pinned here so a truncated file is noticed too.
RFC5869_CASES = 3
GCM_SELECTED_CASES = 197  # the ivSize == 96 and tagSize == 128 groups of aes_gcm_test.json
GOLDEN_COUNTS = {"encode_examples": 1, "local_keks": 2, "derived_deks": 8, "ciphertexts": 2}


def _require(condition: bool, message: str) -> None:
    """A collection-time check that survives ``python -O`` (unlike ``assert``)."""
    if not condition:
        raise RuntimeError(f"vector loader: {message}")


def _load(name: str) -> dict[str, Any]:
    path: Path = VECTORS / name
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _wycheproof(name: str, schema: str, keep: Callable[[Case], bool] = lambda _: True) -> list[Case]:
    """All cases of a Wycheproof file, each merged with its group's parameters (tests excluded)."""
    data = _load(name)
    _require(data["schema"] == schema, f"{name}: schema {data['schema']!r}, expected {schema!r}")
    everything: list[Case] = []
    for group in data["testGroups"]:
        params = {k: v for k, v in group.items() if k != "tests"}
        everything += [{**params, **case} for case in group["tests"]]
    _require(
        len(everything) == data["numberOfTests"],
        f"{name}: {len(everything)} cases, numberOfTests says {data['numberOfTests']}",
    )
    tc_ids = [case["tcId"] for case in everything]
    _require(len(set(tc_ids)) == len(tc_ids), f"{name}: duplicate tcId")
    return [case for case in everything if keep(case)]


def _wycheproof_id(case: Case) -> str:
    flags = "-".join(case["flags"]) or "noflags"
    return f"tc{case['tcId']}-{case['result']}-{flags}"


# --- RFC 5869 -------------------------------------------------------------------------------------

_RFC5869 = _load("rfc5869_sha256.json")
_require(_RFC5869["hash"] == "SHA-256", "rfc5869_sha256.json is not the SHA-256 set")
RFC5869: list[Case] = _RFC5869["tests"]
_require(len(RFC5869) == RFC5869_CASES, f"rfc5869_sha256.json: {len(RFC5869)} cases")


@pytest.mark.parametrize("case", RFC5869, ids=[f"tc{c['tcId']}" for c in RFC5869])
def test_rfc5869_hkdf_sha256(case: Case) -> None:
    ikm, salt, info = (bytes.fromhex(case[k]) for k in ("ikm", "salt", "info"))
    okm = bytes.fromhex(case["okm"])
    assert len(okm) == case["L"]

    assert hkdf_sha256(ikm=ikm, salt=salt, info=info, length=case["L"]) == okm
    if not salt:  # "no salt" is the RFC default of HashLen zero bytes, however it is spelled
        assert hkdf_sha256(ikm=ikm, salt=None, info=info, length=case["L"]) == okm
        assert hkdf_sha256(ikm=ikm, salt=bytes(32), info=info, length=case["L"]) == okm

    if "prk" in case:
        prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
        assert prk.hex() == case["prk"]
        # The OKM is HKDF-Expand of that PRK: extract and expand agree with the RFC separately.
        expand = HKDFExpand(algorithm=hashes.SHA256(), length=case["L"], info=info)
        assert expand.derive(prk) == okm


# --- Wycheproof HKDF-SHA256 -----------------------------------------------------------------------

HKDF_MAX_LENGTH = 255 * 32
WYCHEPROOF_HKDF = _wycheproof("hkdf_sha256_test.json", "hkdf_test_schema_v1.json")
_require(
    {c["result"] for c in WYCHEPROOF_HKDF} == {"valid", "invalid"},
    "hkdf_sha256_test.json: expected both valid and invalid cases",
)


@pytest.mark.parametrize("case", WYCHEPROOF_HKDF, ids=[_wycheproof_id(c) for c in WYCHEPROOF_HKDF])
def test_wycheproof_hkdf_sha256(case: Case) -> None:
    ikm, salt, info = (bytes.fromhex(case[k]) for k in ("ikm", "salt", "info"))
    assert len(ikm) * 8 == case["keySize"]
    size = case["size"]

    if case["result"] == "valid":
        okm = bytes.fromhex(case["okm"])
        assert len(okm) == size
        assert hkdf_sha256(ikm=ikm, salt=salt, info=info, length=size) == okm
        if "EmptySalt" in case["flags"]:
            assert not salt
            assert hkdf_sha256(ikm=ikm, salt=None, info=info, length=size) == okm
    else:
        # The only invalid kind in the file: an output longer than 255 * HashLen (RFC 5869 §2.3).
        # cryptography refuses it with ValueError; our wrapper must not mask or truncate that.
        assert case["result"] == "invalid"
        assert case["flags"] == ["SizeTooLarge"]
        assert size > HKDF_MAX_LENGTH
        with pytest.raises(ValueError, match=str(HKDF_MAX_LENGTH)):
            hkdf_sha256(ikm=ikm, salt=salt, info=info, length=size)


# --- Wycheproof AES-GCM (the shape kms/v1 uses: 12-byte nonce, 16-byte tag) -------------------------


def _our_gcm_shape(case: Case) -> bool:
    return bool(case["ivSize"] == 96 and case["tagSize"] == 128)


WYCHEPROOF_GCM = _wycheproof("aes_gcm_test.json", "aead_test_schema_v1.json", keep=_our_gcm_shape)
_require(len(WYCHEPROOF_GCM) == GCM_SELECTED_CASES, f"aes_gcm_test.json: {len(WYCHEPROOF_GCM)} selected")
_require({c["keySize"] for c in WYCHEPROOF_GCM} == {128, 192, 256}, "aes_gcm_test.json: key sizes")
_require(
    {"valid", "invalid"} <= {c["result"] for c in WYCHEPROOF_GCM},
    "aes_gcm_test.json: expected both valid and invalid cases",
)


@pytest.mark.parametrize("case", WYCHEPROOF_GCM, ids=[_wycheproof_id(c) for c in WYCHEPROOF_GCM])
def test_wycheproof_aes_gcm(case: Case) -> None:
    key, iv, aad, msg, ct, tag = (bytes.fromhex(case[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
    assert (len(key) * 8, len(iv) * 8, len(tag) * 8) == (case["keySize"], 96, 128)
    aead = AESGCM(key)

    if case["result"] == "valid":
        assert aead.encrypt(iv, msg, aad) == ct + tag
        assert aead.decrypt(iv, ct + tag, aad) == msg
    elif case["result"] == "invalid":
        with pytest.raises(InvalidTag):
            aead.decrypt(iv, ct + tag, aad)
        # Encrypting the message must not reproduce the rejected (ct, tag) pair either.
        assert aead.encrypt(iv, msg, aad) != ct + tag
    else:
        # "acceptable": legal but discouraged inputs. Either outcome is allowed, but a
        # decryption that succeeds must be the right one.
        assert case["result"] == "acceptable"
        with contextlib.suppress(InvalidTag):
            assert aead.decrypt(iv, ct + tag, aad) == msg


# --- kms/v1 golden values -------------------------------------------------------------------------

GOLDEN = _load("kms_v1_golden.json")
for _section, _count in GOLDEN_COUNTS.items():
    _require(len(GOLDEN[_section]) == _count, f"kms_v1_golden.json: {_section} has {len(GOLDEN[_section])}")

MASTER = bytes.fromhex(GOLDEN["master_secret_hex"])
CLUSTER_SALT = bytes.fromhex(GOLDEN["cluster_salt_hex"])


def _golden_kek(tenant: str, key: str, version: int) -> bytes:
    """S(t, k, v) derived from the golden master secret and that version's golden salt."""
    (entry,) = (
        e for e in GOLDEN["local_keks"] if (e["tenant"], e["key"], e["version"]) == (tenant, key, version)
    )
    return derive_local_kek(
        master_secret=MASTER,
        version_salt=bytes.fromhex(entry["version_salt_hex"]),
        tenant=tenant,
        key=key,
        version=version,
    )


def _tkv(entry: Case) -> str:
    return f"{entry['tenant']}/{entry['key']}/v{entry['version']}"


def _body(text: str) -> bytes:
    """The raw r || nonce || ct || tag of a text-form ciphertext, decoded independently of the code."""
    prefix, version, body = text.split(":")
    assert prefix == "kms"
    assert version.startswith("v")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def test_golden_cluster_id() -> None:
    assert cluster_id(master_secret=MASTER, cluster_salt=CLUSTER_SALT) == GOLDEN["cluster_id"]


def test_golden_audit_key() -> None:
    assert audit_key(master_secret=MASTER, cluster_salt=CLUSTER_SALT).hex() == GOLDEN["audit_key_hex"]


ENCODE_EXAMPLES: list[Case] = GOLDEN["encode_examples"]


@pytest.mark.parametrize("example", ENCODE_EXAMPLES, ids=[str(i) for i in range(len(ENCODE_EXAMPLES))])
def test_golden_encode(example: Case) -> None:
    assert enc(*example["parts"]).hex() == example["encoded_hex"]


LOCAL_KEKS: list[Case] = GOLDEN["local_keks"]


@pytest.mark.parametrize("entry", LOCAL_KEKS, ids=[_tkv(e) for e in LOCAL_KEKS])
def test_golden_local_kek(entry: Case) -> None:
    kek = derive_local_kek(
        master_secret=MASTER,
        version_salt=bytes.fromhex(entry["version_salt_hex"]),
        tenant=entry["tenant"],
        key=entry["key"],
        version=entry["version"],
    )
    assert kek.hex() == entry["kek_hex"]


DERIVED_DEKS: list[Case] = GOLDEN["derived_deks"]


@pytest.mark.parametrize(
    "entry",
    DERIVED_DEKS,
    ids=[f"{_tkv(e)}/{e['purpose']}/{e['id']}/{e['length']}" for e in DERIVED_DEKS],
)
def test_golden_derived_dek(entry: Case) -> None:
    kek = _golden_kek(entry["tenant"], entry["key"], entry["version"])
    dek = derive_dek(kek_secret=kek, purpose=entry["purpose"], dek_id=entry["id"], length=entry["length"])
    assert len(dek) == entry["length"]
    assert dek.hex() == entry["dek_hex"]


CIPHERTEXTS: list[Case] = GOLDEN["ciphertexts"]
_CT_IDS = [f"{_tkv(e)}/{'ctx' if e['context'] else 'noctx'}" for e in CIPHERTEXTS]


@pytest.mark.parametrize("entry", CIPHERTEXTS, ids=_CT_IDS)
def test_golden_ciphertext_opens(entry: Case) -> None:
    kek = _golden_kek(entry["tenant"], entry["key"], entry["version"])
    parsed = parse_ciphertext(entry["ciphertext"])
    raw = _body(entry["ciphertext"])
    plaintext = bytes.fromhex(entry["plaintext_hex"])

    assert parsed.version == entry["version"]
    assert (parsed.r, parsed.nonce, parsed.sealed) == (raw[:16], raw[16:28], raw[28:])
    assert len(parsed.sealed) == len(plaintext) + 16
    opened = open_ciphertext(
        kek_secret=kek,
        tenant=entry["tenant"],
        key=entry["key"],
        parsed=parsed,
        context=entry["context"],  # JSON null: no context
    )
    assert opened == plaintext


@pytest.mark.parametrize("entry", CIPHERTEXTS, ids=_CT_IDS)
def test_golden_ciphertext_reseals_byte_for_byte(entry: Case) -> None:
    """With the golden r and nonce injected, seal() must reproduce the golden text exactly."""
    raw = _body(entry["ciphertext"])
    wanted = [(16, raw[:16]), (12, raw[16:28])]  # r first, then the nonce

    def randbytes(n: int) -> bytes:
        assert wanted, "seal() asked for more randomness than r and the nonce"
        size, value = wanted.pop(0)
        assert n == size
        return value

    text = seal(
        kek_secret=_golden_kek(entry["tenant"], entry["key"], entry["version"]),
        tenant=entry["tenant"],
        key=entry["key"],
        version=entry["version"],
        plaintext=bytes.fromhex(entry["plaintext_hex"]),
        context=entry["context"],
        randbytes=randbytes,
    )
    assert not wanted
    assert text == entry["ciphertext"]


@pytest.mark.parametrize("entry", CIPHERTEXTS, ids=_CT_IDS)
def test_golden_ciphertext_every_bit_flip_fails(entry: Case) -> None:
    """Exhaustive over the golden bodies: no single-bit change of r, nonce, ct or tag opens."""
    kek = _golden_kek(entry["tenant"], entry["key"], entry["version"])
    raw = _body(entry["ciphertext"])
    prefix = entry["ciphertext"].rsplit(":", 1)[0] + ":"
    opened = 0
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        text = prefix + base64.urlsafe_b64encode(bytes(flipped)).rstrip(b"=").decode("ascii")
        try:
            parsed = parse_ciphertext(text)
            open_ciphertext(
                kek_secret=kek,
                tenant=entry["tenant"],
                key=entry["key"],
                parsed=parsed,
                context=entry["context"],
            )
        except DecryptionFailed:
            continue
        opened += 1
    assert opened == 0


def test_vector_files_were_loaded() -> None:
    """The parametrized lists are the sizes the files declare (also checked at collection)."""
    hkdf = _load("hkdf_sha256_test.json")
    gcm = _load("aes_gcm_test.json")
    assert len(RFC5869) == RFC5869_CASES
    assert len(WYCHEPROOF_HKDF) == hkdf["numberOfTests"] == sum(len(g["tests"]) for g in hkdf["testGroups"])
    assert len(WYCHEPROOF_GCM) == GCM_SELECTED_CASES
    assert sum(len(g["tests"]) for g in gcm["testGroups"]) == gcm["numberOfTests"]
    assert {k: len(GOLDEN[k]) for k in GOLDEN_COUNTS} == GOLDEN_COUNTS
