"""Property tests of the kms/v1 primitives (DESIGN §2): enc, seal/open, the text form, DEK derivation."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from itertools import pairwise

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kms_service.crypto import (
    DecryptionFailed,
    ParsedCiphertext,
    canonical_context,
    derive_dek,
    derive_local_kek,
    enc,
    hkdf_sha256,
    open_ciphertext,
    parse_ciphertext,
    seal,
)

MODEST = settings(max_examples=100, deadline=None)
FEW = settings(max_examples=60, deadline=None)  # for the tests that seal up to 4 KiB per example

# --- strategies -----------------------------------------------------------------------------------

NAME = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)  # tenant ids and key names
PURPOSE = st.from_regex(r"[a-z][a-z0-9-]{0,31}", fullmatch=True)
DEK_ID = st.from_regex(r"[A-Za-z0-9._:/@+=-]{1,256}", fullmatch=True)
VERSION = st.integers(min_value=1, max_value=2**31 - 1)
SECRET = st.binary(min_size=32, max_size=32)
PLAINTEXT = st.binary(max_size=4096)
CONTEXT = st.dictionaries(st.text(max_size=12), st.text(max_size=24), max_size=5)
OPTIONAL_CONTEXT = st.none() | CONTEXT

# enc parts: arbitrary unicode (st.text never yields lone surrogates) and non-negative ints, plus a
# tiny alphabet and small ints so that pairs of tuples collide, or nearly collide, often.
_TINY_TEXT = st.text(alphabet="ab1\x00é€😀", max_size=3)
PART = st.one_of(
    st.text(max_size=16), st.integers(min_value=0, max_value=10**30), _TINY_TEXT, st.integers(0, 12)
)
PARTS = st.lists(PART, max_size=6).map(tuple)


def _normalise(parts: tuple[str | int, ...]) -> tuple[str, ...]:
    """enc() writes an int as its decimal string, so only this normal form can matter."""
    return tuple(str(p) if isinstance(p, int) else p for p in parts)


def _decode_enc(data: bytes) -> tuple[str, ...]:
    """An independent decoder of enc(): a left inverse of enc on normalised parts."""
    parts: list[str] = []
    i = 0
    while i < len(data):
        assert i + 2 <= len(data), "dangling length prefix"
        n = int.from_bytes(data[i : i + 2], "big")
        i += 2
        assert i + n <= len(data), "part runs past the end"
        parts.append(data[i : i + n].decode("utf-8"))
        i += n
    return tuple(parts)


# --- enc ------------------------------------------------------------------------------------------


@MODEST
@given(a=PARTS, b=PARTS)
def test_enc_is_injective_up_to_int_spelling(a: tuple[str | int, ...], b: tuple[str | int, ...]) -> None:
    """enc(a) == enc(b)  <=>  a and b are equal once every int is replaced by its decimal string.

    The "<=" half is by definition (enc(1) == enc("1")); the "=>" half is injectivity. Note that
    the normal form is the decimal string, so enc(1) != enc("01") and enc(0) != enc("").
    """
    assert (enc(*a) == enc(*b)) == (_normalise(a) == _normalise(b))


@MODEST
@given(parts=PARTS)
def test_enc_decodes_back_to_its_parts(parts: tuple[str | int, ...]) -> None:
    """A left inverse exists, which proves injectivity on normalised tuples constructively."""
    assert _decode_enc(enc(*parts)) == _normalise(parts)


@MODEST
@given(parts=PARTS)
def test_enc_int_parts_are_their_decimal_strings(parts: tuple[str | int, ...]) -> None:
    assert enc(*parts) == enc(*_normalise(parts))


@MODEST
@given(words=st.lists(st.text(max_size=6), min_size=1, max_size=5), data=st.data())
def test_enc_resplitting_the_same_characters_changes_the_encoding(
    words: list[str], data: st.DataObject
) -> None:
    """The classic separator-free collision ("ab","c") vs ("a","bc") cannot happen."""
    joined = "".join(words)
    cuts = data.draw(st.lists(st.integers(0, len(joined)), max_size=5).map(sorted))
    bounds = [0, *cuts, len(joined)]
    other = [joined[x:y] for x, y in pairwise(bounds)]
    assert "".join(other) == joined
    assert (enc(*words) == enc(*other)) == (words == other)


def test_enc_length_prefix_counts_utf8_bytes_not_characters() -> None:
    assert enc("é😀") == b"\x00\x06" + "é😀".encode()
    assert enc() == b""
    assert enc("") == b"\x00\x00"
    assert enc(0, "") == b"\x00\x010\x00\x00"


@pytest.mark.parametrize("bad", [True, False, None, 1.0, b"x", bytearray(b"x"), ["x"], ("x",), {"x": 1}])
def test_enc_rejects_non_str_int_parts(bad: object) -> None:
    with pytest.raises(TypeError):
        enc(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # also when it is not the first part
        enc("kms/v1", 1, bad)  # type: ignore[arg-type]


@MODEST
@given(
    parts=PARTS,
    bad=st.one_of(st.booleans(), st.none(), st.floats(), st.binary(), st.lists(st.text(), max_size=2)),
    data=st.data(),
)
def test_enc_rejects_a_bad_part_anywhere(
    parts: tuple[str | int, ...], bad: object, data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(parts)))
    with pytest.raises(TypeError):
        enc(*parts[:at], bad, *parts[at:])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("part", "ok"),
    [
        ("a" * 65535, True),
        ("a" * 65536, False),
        ("é" * 32767 + "a", True),  # 65535 bytes
        ("é" * 32768, False),  # only 32768 characters, but 65536 bytes
        ("😀" * 16384, False),  # 16384 characters, 65536 bytes
        ("😀" * 16383 + "abc", True),  # 65535 bytes
    ],
    ids=["ascii-65535", "ascii-65536", "2byte-65535", "2byte-65536", "4byte-65536", "4byte-65535"],
)
def test_enc_part_size_limit_is_65535_bytes(part: str, ok: bool) -> None:
    if ok:
        encoded = enc("x", part)
        assert encoded[3:5] == b"\xff\xff"
        assert encoded[5:] == part.encode()
    else:
        with pytest.raises(ValueError, match="65535"):
            enc("x", part)


# --- seal / open ----------------------------------------------------------------------------------


def _open_text(
    text: str, *, kek: bytes, tenant: str, key: str, context: Mapping[str, str] | None = None
) -> bytes:
    return open_ciphertext(
        kek_secret=kek, tenant=tenant, key=key, parsed=parse_ciphertext(text), context=context
    )


def _raw(text: str) -> bytes:
    body = text.rsplit(":", 1)[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _text(version: int | str, raw: bytes) -> str:
    return f"kms:v{version}:" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@FEW
@given(kek=SECRET, tenant=NAME, key=NAME, version=VERSION, plaintext=PLAINTEXT, context=OPTIONAL_CONTEXT)
def test_seal_open_round_trip(
    kek: bytes, tenant: str, key: str, version: int, plaintext: bytes, context: dict[str, str] | None
) -> None:
    text = seal(kek_secret=kek, tenant=tenant, key=key, version=version, plaintext=plaintext, context=context)

    assert text.startswith(f"kms:v{version}:")
    body = text[len(f"kms:v{version}:") :]
    assert body
    assert "=" not in body
    assert set(body) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(_raw(text)) == 16 + 12 + len(plaintext) + 16

    parsed = parse_ciphertext(text)
    assert parsed.version == version
    assert (
        open_ciphertext(kek_secret=kek, tenant=tenant, key=key, parsed=parsed, context=context) == plaintext
    )


@MODEST
@given(kek=SECRET, tenant=NAME, key=NAME, version=VERSION, plaintext=st.binary(max_size=64))
def test_seal_is_randomised(kek: bytes, tenant: str, key: str, version: int, plaintext: bytes) -> None:
    """Fresh r and nonce per call (os.urandom by default): two seals of the same input differ."""
    one, two = (
        seal(kek_secret=kek, tenant=tenant, key=key, version=version, plaintext=plaintext) for _ in range(2)
    )
    assert one != two
    assert _raw(one)[:28] != _raw(two)[:28]


@MODEST
@given(context=CONTEXT)
def test_canonical_context_ignores_insertion_order(context: dict[str, str]) -> None:
    reordered = dict(reversed(list(context.items())))
    assert canonical_context(reordered) == canonical_context(context)


def test_canonical_context_form() -> None:
    assert canonical_context(None) == canonical_context({}) == "{}"
    assert canonical_context({"b": "2", "a": "é"}) == '{"a":"é","b":"2"}'


@MODEST
@given(
    kek=SECRET,
    tenant=NAME,
    key=NAME,
    version=VERSION,
    plaintext=st.binary(max_size=64),
    sealed_with_none=st.booleans(),
)
def test_no_context_and_empty_context_are_the_same(
    kek: bytes, tenant: str, key: str, version: int, plaintext: bytes, sealed_with_none: bool
) -> None:
    """By design (canonical_context), None and {} are one context: each opens what the other sealed."""
    sealing, opening = (None, {}) if sealed_with_none else ({}, None)
    text = seal(kek_secret=kek, tenant=tenant, key=key, version=version, plaintext=plaintext, context=sealing)
    assert _open_text(text, kek=kek, tenant=tenant, key=key, context=opening) == plaintext


@MODEST
@given(kek=SECRET, tenant=NAME, key=NAME, other=NAME, version=VERSION, context=OPTIONAL_CONTEXT)
def test_ciphertext_is_bound_to_its_tenant(
    kek: bytes, tenant: str, key: str, other: str, version: int, context: dict[str, str] | None
) -> None:
    assume(other != tenant)
    text = seal(kek_secret=kek, tenant=tenant, key=key, version=version, plaintext=b"dek", context=context)
    with pytest.raises(DecryptionFailed):
        _open_text(text, kek=kek, tenant=other, key=key, context=context)


@MODEST
@given(kek=SECRET, tenant=NAME, key=NAME, other=NAME, version=VERSION, context=OPTIONAL_CONTEXT)
def test_ciphertext_is_bound_to_its_key(
    kek: bytes, tenant: str, key: str, other: str, version: int, context: dict[str, str] | None
) -> None:
    assume(other != key)
    text = seal(kek_secret=kek, tenant=tenant, key=key, version=version, plaintext=b"dek", context=context)
    with pytest.raises(DecryptionFailed):
        _open_text(text, kek=kek, tenant=tenant, key=other, context=context)


@MODEST
@given(kek=SECRET, tenant=NAME, key=NAME, version=VERSION, other=VERSION, context=OPTIONAL_CONTEXT)
def test_ciphertext_is_bound_to_its_version(
    kek: bytes, tenant: str, key: str, version: int, other: int, context: dict[str, str] | None
) -> None:
    """Rewriting the `kms:v<N>:` prefix (same secret, same body) must not open."""
    assume(other != version)
    text = seal(kek_secret=kek, tenant=tenant, key=key, version=version, plaintext=b"dek", context=context)
    forged = text.replace(f"kms:v{version}:", f"kms:v{other}:", 1)
    assert forged != text
    assert parse_ciphertext(forged).version == other
    with pytest.raises(DecryptionFailed):
        _open_text(forged, kek=kek, tenant=tenant, key=key, context=context)


@MODEST
@given(kek=SECRET, tenant=NAME, key=NAME, version=VERSION, context=OPTIONAL_CONTEXT, other=OPTIONAL_CONTEXT)
def test_ciphertext_is_bound_to_its_context(
    kek: bytes,
    tenant: str,
    key: str,
    version: int,
    context: dict[str, str] | None,
    other: dict[str, str] | None,
) -> None:
    assume((context or {}) != (other or {}))  # None and {} are the same context, see above
    text = seal(kek_secret=kek, tenant=tenant, key=key, version=version, plaintext=b"dek", context=context)
    with pytest.raises(DecryptionFailed):
        _open_text(text, kek=kek, tenant=tenant, key=key, context=other)


@pytest.mark.parametrize(
    ("sealed_with", "opened_with"),
    [
        (None, {"a": ""}),
        ({}, {"a": ""}),
        ({"a": ""}, None),
        ({"a": ""}, {}),
        ({"a": "1"}, {"a": "1", "b": "2"}),
        ({"a": "1", "b": "2"}, {"a": "1"}),
        ({"a": "1"}, {"A": "1"}),
        ({"a": "1"}, {"a": "1 "}),
        ({"ab": "c"}, {"a": "bc"}),
    ],
)
def test_context_binding_examples(
    sealed_with: dict[str, str] | None, opened_with: dict[str, str] | None
) -> None:
    kek = bytes(range(32))
    text = seal(kek_secret=kek, tenant="acme", key="volumes", version=1, plaintext=b"x", context=sealed_with)
    assert _open_text(text, kek=kek, tenant="acme", key="volumes", context=sealed_with) == b"x"
    with pytest.raises(DecryptionFailed):
        _open_text(text, kek=kek, tenant="acme", key="volumes", context=opened_with)


@MODEST
@given(kek=SECRET, other=SECRET, tenant=NAME, key=NAME, version=VERSION)
def test_ciphertext_is_bound_to_its_secret(
    kek: bytes, other: bytes, tenant: str, key: str, version: int
) -> None:
    assume(other != kek)
    text = seal(kek_secret=kek, tenant=tenant, key=key, version=version, plaintext=b"dek")
    with pytest.raises(DecryptionFailed):
        _open_text(text, kek=other, tenant=tenant, key=key)


# --- tampering and malformed text -----------------------------------------------------------------

_KEK = bytes(range(32))


def _sealed(plaintext: bytes, version: int = 7) -> str:
    return seal(kek_secret=_KEK, tenant="acme", key="volumes", version=version, plaintext=plaintext)


def _must_fail(text: str) -> None:
    """Opening `text` as acme/volumes must raise DecryptionFailed and nothing else."""
    with pytest.raises(DecryptionFailed):
        _open_text(text, kek=_KEK, tenant="acme", key="volumes")


@MODEST
@given(plaintext=st.binary(max_size=256), data=st.data())
def test_any_single_bit_flip_fails(plaintext: bytes, data: st.DataObject) -> None:
    text = _sealed(plaintext)
    raw = bytearray(_raw(text))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    _must_fail(_text(7, bytes(raw)))


@MODEST
@given(plaintext=st.binary(max_size=256), data=st.data())
def test_any_truncation_fails(plaintext: bytes, data: st.DataObject) -> None:
    raw = _raw(_sealed(plaintext))
    keep = data.draw(st.integers(0, len(raw) - 1), label="keep")
    _must_fail(_text(7, raw[:keep]))


@MODEST
@given(plaintext=st.binary(max_size=256), extra=st.binary(min_size=1, max_size=32))
def test_any_extension_fails(plaintext: bytes, extra: bytes) -> None:
    _must_fail(_text(7, _raw(_sealed(plaintext)) + extra))


_SECRET = b"a 17-byte secret!"
_VALID = _sealed(_SECRET, version=7)  # 61 raw bytes: an 82-character body that would take "==" padding
_VALID_BODY = _VALID.split(":")[2]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "kms:v7:",
        "kms:v7",
        _VALID_BODY,
        "KMS:v7:" + _VALID_BODY,
        "kms:V7:" + _VALID_BODY,
        "kms:7:" + _VALID_BODY,
        "kms-v7:" + _VALID_BODY,
        "kms:v:" + _VALID_BODY,
        "kms:v0:" + _VALID_BODY,  # version 0
        "kms:v07:" + _VALID_BODY,  # leading zero
        "kms:v-7:" + _VALID_BODY,
        "kms:v+7:" + _VALID_BODY,
        "kms:v 7:" + _VALID_BODY,
        "kms:v7.0:" + _VALID_BODY,
        "kms:v\u0667:" + _VALID_BODY,  # ARABIC-INDIC DIGIT SEVEN: int() would accept it
        "kms:v12345678901:" + _VALID_BODY,  # more than 10 digits
        " " + _VALID,
        _VALID + " ",
        _VALID + "\n",
        _VALID + "==",  # padding is not part of the form
        "kms:v7:" + _VALID_BODY + ":",
        "kms:v7:kms:v7:" + _VALID_BODY,
        "kms:v7:" + _VALID_BODY[:-1] + "+",  # standard-base64 characters
        "kms:v7:" + _VALID_BODY[:-1] + "/",
        "kms:v7:" + _VALID_BODY[:10] + "." + _VALID_BODY[11:],
        "kms:v7:" + _VALID_BODY[:10] + "é" + _VALID_BODY[11:],
        "kms:v7:" + _VALID_BODY[:10] + "\x00" + _VALID_BODY[11:],
        "kms:v7:" + _VALID_BODY + "A" * ((1 - len(_VALID_BODY)) % 4),  # length = 1 mod 4
        "kms:v7:" + "A",  # length 1
        "kms:v7:" + "A" * 57,  # length = 1 mod 4, and long enough to hold r, nonce and tag
        "kms:v7:" + "A" * 58,  # decodes to 43 bytes: one short of r + nonce + tag
        "kms:v7:" + "A" * 59,  # 44 zero bytes: well-formed, empty plaintext, wrong tag
    ],
)
def test_garbled_text_fails(text: str) -> None:
    assert text != _VALID
    _must_fail(text)


def test_garbled_text_cases_are_garbled() -> None:
    """The length-related cases above really have the lengths they claim."""
    assert _open_text(_VALID, kek=_KEK, tenant="acme", key="volumes") == _SECRET
    assert len(_VALID_BODY) % 4 == 2  # so the "==" case above is the correct padding, and still rejected
    assert len(_VALID_BODY + "A" * ((1 - len(_VALID_BODY)) % 4)) % 4 == 1
    assert len(base64.urlsafe_b64decode("A" * 58 + "==")) == 43
    assert len(base64.urlsafe_b64decode("A" * 59 + "=")) == 44


@MODEST
@given(text=st.text(max_size=120) | st.text(alphabet="kms:v0123456789-_AZaz=+/", max_size=120))
def test_arbitrary_text_only_ever_raises_decryption_failed(text: str) -> None:
    assume(text != _VALID)
    _must_fail(text)


@MODEST
@given(
    junk=st.characters(exclude_characters="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"),
    data=st.data(),
)
def test_any_non_base64url_character_in_the_body_fails(junk: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(_VALID_BODY)), label="at")
    for body in (_VALID_BODY[:at] + junk + _VALID_BODY[at:], _VALID_BODY[:at] + junk + _VALID_BODY[at + 1 :]):
        _must_fail("kms:v7:" + body)


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@MODEST
@given(plaintext=st.binary(max_size=64), data=st.data())
def test_non_canonical_base64_fails(plaintext: bytes, data: st.DataObject) -> None:
    """One ciphertext, one text form: the unused low bits of the last character must be zero.

    When the body length is 2 or 3 mod 4, the last character carries 4 or 2 bits that decode to
    nothing; a lenient decoder maps several strings to the same bytes (the text form becomes malleable).
    """
    text = _sealed(plaintext)
    body = text.split(":")[2]
    unused_bits = {0: 0, 2: 4, 3: 2}[len(body) % 4]
    assume(unused_bits)
    last = _B64URL.index(body[-1])
    assert last % (1 << unused_bits) == 0  # seal() itself writes the canonical form
    low = data.draw(st.integers(1, (1 << unused_bits) - 1), label="stray bits")
    forged = text[:-1] + _B64URL[last | low]
    assert _raw(forged) == _raw(text)  # same bytes under a lenient decoder
    _must_fail(forged)


@MODEST
@given(version=st.text(max_size=12))
def test_version_must_be_canonical_decimal(version: str) -> None:
    assume(version != "7")
    _must_fail(f"kms:v{version}:{_VALID_BODY}")


def test_open_rejects_a_hand_built_parsed_ciphertext_with_a_bad_tag() -> None:
    parsed = parse_ciphertext(_VALID)
    forged = ParsedCiphertext(
        parsed.version, parsed.r, parsed.nonce, parsed.sealed[:-1] + bytes([parsed.sealed[-1] ^ 1])
    )
    assert forged.sealed != parsed.sealed
    with pytest.raises(DecryptionFailed):
        open_ciphertext(kek_secret=_KEK, tenant="acme", key="volumes", parsed=forged)


# --- DEK derivation -------------------------------------------------------------------------------

DEK_LENGTH = st.integers(16, 64)


@MODEST
@given(kek=SECRET, purpose=PURPOSE, dek_id=DEK_ID, length=DEK_LENGTH)
def test_derive_dek_is_deterministic_and_per_spec(kek: bytes, purpose: str, dek_id: str, length: int) -> None:
    dek = derive_dek(kek_secret=kek, purpose=purpose, dek_id=dek_id, length=length)
    assert len(dek) == length
    assert derive_dek(kek_secret=kek, purpose=purpose, dek_id=dek_id, length=length) == dek
    # DESIGN §2: HKDF(S, no salt, enc("kms/v1", "dek", purpose, id), length); "no salt" = 32 zero bytes.
    info = enc("kms/v1", "dek", purpose, dek_id)
    assert hkdf_sha256(ikm=kek, salt=bytes(32), info=info, length=length) == dek


@MODEST
@given(kek=SECRET, purpose=PURPOSE, other=PURPOSE, dek_id=DEK_ID, length=DEK_LENGTH)
def test_derive_dek_separates_purposes(
    kek: bytes, purpose: str, other: str, dek_id: str, length: int
) -> None:
    assume(other != purpose)
    assert derive_dek(kek_secret=kek, purpose=purpose, dek_id=dek_id, length=length) != derive_dek(
        kek_secret=kek, purpose=other, dek_id=dek_id, length=length
    )


@MODEST
@given(kek=SECRET, purpose=PURPOSE, dek_id=DEK_ID, other=DEK_ID, length=DEK_LENGTH)
def test_derive_dek_separates_ids(kek: bytes, purpose: str, dek_id: str, other: str, length: int) -> None:
    assume(other != dek_id)
    assert derive_dek(kek_secret=kek, purpose=purpose, dek_id=dek_id, length=length) != derive_dek(
        kek_secret=kek, purpose=purpose, dek_id=other, length=length
    )


@MODEST
@given(kek=SECRET, other=SECRET, purpose=PURPOSE, dek_id=DEK_ID, length=DEK_LENGTH)
def test_derive_dek_separates_key_versions(
    kek: bytes, other: bytes, purpose: str, dek_id: str, length: int
) -> None:
    assume(other != kek)
    assert derive_dek(kek_secret=kek, purpose=purpose, dek_id=dek_id, length=length) != derive_dek(
        kek_secret=other, purpose=purpose, dek_id=dek_id, length=length
    )


def test_derive_dek_purpose_and_id_do_not_run_together() -> None:
    """Same concatenation "volume-a", different split between purpose and id: different DEKs."""
    kek = bytes(32)
    assert derive_dek(kek_secret=kek, purpose="vol", dek_id="ume-a", length=32) != derive_dek(
        kek_secret=kek, purpose="volume", dek_id="-a", length=32
    )


@MODEST
@given(kek=SECRET, purpose=PURPOSE, dek_id=DEK_ID, short=DEK_LENGTH, long=DEK_LENGTH)
def test_derive_dek_shorter_length_is_a_prefix_of_longer(
    kek: bytes, purpose: str, dek_id: str, short: int, long: int
) -> None:
    """Documents a property of the normative derivation, not a wish.

    DESIGN §2 derives a DEK as HKDF(S, no salt, enc("kms/v1", "dek", purpose, id), length): the
    length is NOT part of the info, and HKDF-Expand's output for a given PRK and info is one
    stream that `length` merely cuts. So the 16-byte DEK of an id is exactly the first 16 bytes of
    its 32-byte DEK. Asking for the same (purpose, id) at two lengths does not give independent
    keys; use distinct ids (or purposes) when independent keys are needed. Changing this would
    change every derived DEK and break the recovery path, so it is pinned here.
    """
    short, long = sorted((short, long))
    a = derive_dek(kek_secret=kek, purpose=purpose, dek_id=dek_id, length=short)
    b = derive_dek(kek_secret=kek, purpose=purpose, dek_id=dek_id, length=long)
    assert len(a) == short
    assert len(b) == long
    assert b[:short] == a


@pytest.mark.parametrize("length", [-1, 0, 1, 15, 65, 128, 255 * 32, 255 * 32 + 1])
def test_derive_dek_rejects_lengths_outside_16_to_64(length: int) -> None:
    with pytest.raises(ValueError, match=r"16\.\.64"):
        derive_dek(kek_secret=bytes(32), purpose="volume", dek_id="pg-data-0", length=length)


@MODEST
@given(length=st.integers(max_value=15) | st.integers(min_value=65, max_value=10**6))
def test_derive_dek_rejects_any_length_outside_16_to_64(length: int) -> None:
    with pytest.raises(ValueError, match=r"16\.\.64"):
        derive_dek(kek_secret=bytes(32), purpose="volume", dek_id="pg-data-0", length=length)


@pytest.mark.parametrize("length", [16, 64])
def test_derive_dek_accepts_the_bounds(length: int) -> None:
    assert (
        len(derive_dek(kek_secret=bytes(32), purpose="volume", dek_id="pg-data-0", length=length)) == length
    )


@MODEST
@given(salt=st.binary(max_size=80).filter(lambda s: len(s) != 32))
def test_derive_local_kek_rejects_salts_that_are_not_32_bytes(salt: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        derive_local_kek(master_secret=bytes(32), version_salt=salt, tenant="acme", key="volumes", version=1)


@MODEST
@given(master=SECRET, salt=SECRET, tenant=NAME, key=NAME, version=VERSION)
def test_derive_local_kek_is_per_spec(
    master: bytes, salt: bytes, tenant: str, key: str, version: int
) -> None:
    kek = derive_local_kek(master_secret=master, version_salt=salt, tenant=tenant, key=key, version=version)
    assert kek == hkdf_sha256(
        ikm=master, salt=salt, info=enc("kms/v1", "kek", tenant, key, version), length=32
    )


@MODEST
@given(
    master=SECRET,
    salt=SECRET,
    a=st.tuples(NAME, NAME, VERSION),
    b=st.tuples(NAME, NAME, VERSION),
)
def test_derive_local_kek_separates_tenant_key_version(
    master: bytes, salt: bytes, a: tuple[str, str, int], b: tuple[str, str, int]
) -> None:
    """Even under one (hypothetically shared) salt, distinct (tenant, key, version) give distinct S."""
    assume(a != b)
    kek_a, kek_b = (
        derive_local_kek(master_secret=master, version_salt=salt, tenant=t, key=k, version=v)
        for t, k, v in (a, b)
    )
    assert kek_a != kek_b
