"""`gcp-kms` beyond the conformance suite: config validation, write-only credentials, CRC32C
integrity checks both ways, AAD binding, protection levels, and the translation of every gRPC
status Cloud KMS answers. Runs against the fake Cloud KMS on the real gRPC protocol
(tests/providers/fakes/gcp_kms.py), authenticating with a generated service-account key."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import SecretStr, ValidationError

from providers import (
    ProviderAccessDenied,
    ProviderConfigError,
    ProviderCryptoError,
    ProviderError,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderUnavailable,
    parse_provider_config,
)
from providers.gcp_kms import GcpKmsConfig, GcpKmsProvider, context_aad
from tests.providers.peers.gcp_kms import ServiceAccount, gcp_kms_config, make_service_account

if TYPE_CHECKING:
    from tests.providers.fakes.gcp_kms import FakeCloudKms

CTX = {"tenant": "acme", "key": "volumes", "version": "1"}
KEY = "projects/my-project/locations/europe-west1/keyRings/ring-1/cryptoKeys/kek_1"
HANG_BOUND = 10.0  # seconds after which a call counts as hung (a bound, not a speed check)
PAYLOAD_LOGGER = "google.cloud.kms_v1.services.key_management_service.transports.grpc_asyncio"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake(gcp_kms_fake: FakeCloudKms) -> Iterator[FakeCloudKms]:
    yield gcp_kms_fake
    gcp_kms_fake.clear_failures()  # an injected failure never leaks into the next test


@pytest.fixture
def account(gcp_kms_account: ServiceAccount) -> ServiceAccount:
    return gcp_kms_account


def config(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount | None, **overrides: Any
) -> GcpKmsConfig:
    if account is not None:
        overrides.setdefault("credentials_json", account.key_json)
    return gcp_kms_config(fake, key_name, **overrides)


@asynccontextmanager
async def connected(cfg: GcpKmsConfig) -> AsyncIterator[GcpKmsProvider]:
    provider = await cfg.connect()
    assert isinstance(provider, GcpKmsProvider)
    try:
        yield provider
    finally:
        await provider.close()


@pytest.fixture
def key_name(fake: FakeCloudKms, account: ServiceAccount) -> str:
    return fake.create_key(members={account.email})


# -- configuration --------------------------------------------------------------------------


def test_key_name_accepts_cryptokey_names() -> None:
    for name in (
        KEY,
        "projects/123456789012/locations/global/keyRings/r/cryptoKeys/k",
        "projects/example.com:my-project/locations/us/keyRings/R_1-x/cryptoKeys/K-2_y",
    ):
        assert GcpKmsConfig(key_name=name).key_name == name


@pytest.mark.parametrize(
    "bad",
    [
        "",
        KEY + "/cryptoKeyVersions/1",  # a version: Decrypt needs the CryptoKey
        "/" + KEY,
        "https://cloudkms.googleapis.com/v1/" + KEY,
        KEY.replace("/keyRings/", "/keyrings/"),
        "projects/p/locations/l/keyRings/r",
        "projects/p/locations/l/keyRings/r/cryptoKeys/",
        "projects/p/locations/l/keyRings/r/cryptoKeys/k k",
        KEY + "\n",
    ],
)
def test_key_name_is_validated_with_a_clear_error(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        GcpKmsConfig(key_name=bad)
    assert err.value.errors()[0]["loc"] == ("key_name",)
    assert "projects/<project>/locations/<location>/keyRings/<ring>/cryptoKeys/<key>" in str(err.value)
    with pytest.raises(ProviderConfigError, match=r"provider\.key_name: .*cryptoKeys/<key>"):
        parse_provider_config({"type": "gcp-kms", "key_name": bad})


@pytest.mark.parametrize(
    "endpoint",
    ["10.0.0.7:443", "kms.example.com:443", "[2001:db8::1]:443", "0.0.0.0:8443", "127.0.0.1.nip.io:1"],
)
def test_insecure_endpoint_refused_unless_loopback(endpoint: str) -> None:
    with pytest.raises(ProviderConfigError, match=r"provider\.insecure_endpoint: .*loopback"):
        parse_provider_config(
            {"type": "gcp-kms", "key_name": KEY, "endpoint": endpoint, "insecure_endpoint": True}
        )
    # The same endpoint over TLS is fine (a private endpoint).
    assert GcpKmsConfig(key_name=KEY, endpoint=endpoint).endpoint == endpoint


def test_insecure_endpoint_needs_an_endpoint_and_allows_loopback() -> None:
    with pytest.raises(ProviderConfigError, match=r"provider\.insecure_endpoint: .*needs an endpoint"):
        parse_provider_config({"type": "gcp-kms", "key_name": KEY, "insecure_endpoint": True})
    for endpoint in ("127.0.0.1:9000", "127.8.9.10:1", "localhost:9000", "[::1]:9000"):
        assert GcpKmsConfig(key_name=KEY, endpoint=endpoint, insecure_endpoint=True).insecure_endpoint


@pytest.mark.parametrize(
    "endpoint", ["https://kms.example.com:443", "kms.example.com", "h:0", "h:70000", "h:443/x"]
)
def test_endpoint_must_be_host_and_port(endpoint: str) -> None:
    with pytest.raises(ProviderConfigError, match=r"provider\.endpoint: .*must be host:port"):
        parse_provider_config({"type": "gcp-kms", "key_name": KEY, "endpoint": endpoint})


def test_credentials_validate_from_plain_json_strings() -> None:
    account, _ = make_service_account("from-json")
    raw = {"type": "gcp-kms", "key_name": KEY, "credentials_json": account.key_json}
    for cfg in (
        parse_provider_config(raw),  # the service's path: strict model, dict from JSON
        GcpKmsConfig.model_validate_json(json.dumps(raw)),
        GcpKmsConfig.model_validate(json.loads(json.dumps(raw))),
    ):
        assert isinstance(cfg, GcpKmsConfig)
        assert isinstance(cfg.credentials_json, SecretStr)
        assert cfg.credentials_json.get_secret_value() == account.key_json
    # Stored as the service stores it (public part as JSON, secret apart) and reopened.
    public = json.loads(json.dumps(cfg.public_view()))
    assert "credentials_json" not in public
    reopened = parse_provider_config({**public, "credentials_json": account.key_json})
    assert reopened == cfg


def secret_marker(account: ServiceAccount) -> str:
    """A distinctive piece of the private key (not the PEM armour every key shares)."""
    return account.private_key_pem.splitlines()[5]


def test_credentials_never_in_repr_str_dumps_or_public_view() -> None:
    account, _ = make_service_account("leak-check")
    cfg = GcpKmsConfig(key_name=KEY, credentials_json=SecretStr(account.key_json))
    marker = secret_marker(account)
    shown = [
        repr(cfg),
        str(cfg),
        json.dumps(cfg.public_view()),
        cfg.model_dump_json(),
        str(cfg.model_dump()),
        f"{cfg!r} {cfg}",
    ]
    for text in shown:
        assert marker not in text
        assert "PRIVATE KEY" not in text
    assert "credentials_json" not in cfg.public_view()
    assert "credentials_json" not in repr(cfg)  # not even masked
    assert cfg.credentials_json is not None and cfg.credentials_json.get_secret_value() == account.key_json


@pytest.mark.parametrize(
    "value",
    [
        "not json at all -----BEGIN PRIVATE KEY----- SECRETSECRET",
        '["SECRETSECRET"]',
        '{"type": "authorized_user", "refresh_token": "SECRETSECRET"}',
        # Could make the service read a local file or URL for a token: refused.
        '{"type": "external_account", "credential_source": {"file": "/etc/SECRETSECRET"}}',
        '{"type": "service_account", "client_email": "a@b.c", "private_key": 7, "x": "SECRETSECRET"}',
    ],
)
def test_bad_credentials_rejected_without_echoing_them(value: str) -> None:
    raw = {"type": "gcp-kms", "key_name": KEY, "credentials_json": value}
    with pytest.raises(ValidationError) as err:
        GcpKmsConfig.model_validate(raw)
    assert "SECRETSECRET" not in str(err.value) and "SECRETSECRET" not in repr(err.value)
    assert err.value.errors()[0]["loc"] == ("credentials_json",)
    with pytest.raises(ProviderConfigError, match=r"provider\.credentials_json: .*service-account") as cerr:
        parse_provider_config(raw)
    assert "SECRETSECRET" not in str(cerr.value)


def test_no_secret_echo_in_errors_of_other_fields() -> None:
    """A bad field beside the credentials must not print the whole input either."""
    account, _ = make_service_account("echo")
    with pytest.raises(ValidationError) as err:
        GcpKmsConfig.model_validate(
            {
                "key_name": KEY,
                "credentials_json": account.key_json,
                "endpoint": "10.1.1.1:1",
                "insecure_endpoint": True,
            }
        )
    assert secret_marker(account) not in str(err.value)
    with pytest.raises(ValidationError) as err:
        GcpKmsConfig.model_validate(
            {"key_name": KEY, "credentials_json": {"private_key": account.private_key_pem}}
        )
    assert secret_marker(account) not in str(err.value)


def test_module_imports_no_sdk() -> None:
    """Config validation must work where the gcp extra is not installed."""
    code = (
        "import sys, providers.gcp_kms as m; from providers import parse_provider_config;"
        f"parse_provider_config({{'type': 'gcp-kms', 'key_name': {KEY!r}}});"
        "bad = [n for n in sys.modules if n.startswith(('google', 'grpc'))];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_aad_encoding_is_fixed_and_injective() -> None:
    # Wrapped secrets at rest depend on these bytes: a change here strands every stored blob.
    assert context_aad({"tenant": "t", "key": "k"}) == bytes.fromhex(
        "00066b6d732f7631000c6763702d6b6d732d77726170"  # "kms/v1", "gcp-kms-wrap"
        "00036b6579"
        "00016b"  # "key", "k"  (sorted by name)
        "000674656e616e74"
        "000174"  # "tenant", "t"
    )
    assert context_aad({"b": "1", "a": "2"}) == context_aad({"a": "2", "b": "1"})
    distinct = [{"a": "bc"}, {"ab": "c"}, {"a": "b", "c": ""}, {"a": "b\x00c"}, {}, {"": ""}]
    assert len({context_aad(c) for c in distinct}) == len(distinct)


# -- the provider against the fake -----------------------------------------------------------


async def test_round_trip_is_authenticated_and_checksummed(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    from tests.providers.fakes.gcp_kms import crc32c

    secret = os.urandom(32)
    async with connected(config(fake, key_name, account)) as provider:
        blob = await provider.wrap(secret, context=CTX)
        encrypt = fake.calls_of("Encrypt")[-1]
        assert await provider.unwrap(blob, context=CTX) == secret
        decrypt = fake.calls_of("Decrypt")[-1]
    assert encrypt.caller == decrypt.caller == account.email  # the service-account key was used
    assert encrypt.request.name == decrypt.request.name == key_name
    assert encrypt.request.plaintext == secret
    assert encrypt.request.additional_authenticated_data == context_aad(CTX)
    assert encrypt.request.plaintext_crc32c == crc32c(secret)
    assert encrypt.request.additional_authenticated_data_crc32c == crc32c(context_aad(CTX))
    assert blob[:1] == b"\x01"
    assert decrypt.request.ciphertext == blob[1:]
    assert decrypt.request.ciphertext_crc32c == crc32c(blob[1:])
    assert decrypt.request.additional_authenticated_data_crc32c == crc32c(context_aad(CTX))


@pytest.mark.parametrize(
    "mode",
    [
        "flip_ciphertext",
        "bad_ciphertext_crc",
        "no_ciphertext_crc",
        "unverified_plaintext",
        "unverified_aad",
        "foreign_name",
    ],
)
async def test_corrupted_encrypt_response_is_discarded(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount, mode: str
) -> None:
    async with connected(config(fake, key_name, account)) as provider:
        fake.corrupt_next("Encrypt", mode)
        result: bytes | None = None
        with pytest.raises(ProviderError, match="integrity check") as err:
            result = await provider.wrap(os.urandom(32), context=CTX)
        assert result is None
        assert not isinstance(err.value, ProviderUnavailable | ProviderCryptoError)
        # The next, intact response is accepted: the check is on the response, not the key.
        secret = os.urandom(32)
        assert await provider.unwrap(await provider.wrap(secret, context=CTX), context=CTX) == secret


@pytest.mark.parametrize("mode", ["flip_plaintext", "bad_plaintext_crc", "no_plaintext_crc"])
async def test_corrupted_decrypt_response_is_discarded(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount, mode: str
) -> None:
    secret = os.urandom(32)
    async with connected(config(fake, key_name, account)) as provider:
        blob = await provider.wrap(secret, context=CTX)
        fake.corrupt_next("Decrypt", mode)
        result: bytes | None = None
        with pytest.raises(ProviderError, match="integrity check"):
            result = await provider.unwrap(blob, context=CTX)
        assert result is None
        assert await provider.unwrap(blob, context=CTX) == secret


async def test_fake_checks_request_checksums_like_cloud_kms(fake: FakeCloudKms) -> None:
    """The fake's own fidelity: a request whose CRC32C does not match is INVALID_ARGUMENT."""
    import grpc
    from google.api_core import exceptions
    from google.cloud.kms_v1 import KeyManagementServiceAsyncClient
    from google.cloud.kms_v1.services.key_management_service.transports.grpc_asyncio import (
        KeyManagementServiceGrpcAsyncIOTransport,
    )

    key = fake.create_key()
    client = KeyManagementServiceAsyncClient(
        transport=KeyManagementServiceGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(fake.address))
    )
    try:
        with pytest.raises(exceptions.InvalidArgument, match="plaintext_crc32c"):
            await client.encrypt(
                request={"name": key, "plaintext": b"abc", "plaintext_crc32c": 12345}, timeout=5, retry=None
            )
        ok = await client.encrypt(request={"name": key, "plaintext": b"abc"}, timeout=5, retry=None)
        assert not ok.verified_plaintext_crc32c  # nothing to verify: not claimed verified
    finally:
        await client.transport.close()


@pytest.mark.parametrize(
    "other",
    [
        {**CTX, "tenant": "acme2"},
        {"tenant": "acme", "key": "volumes"},
        {**CTX, "extra": ""},
        {"tenant": "acmevolumes", "key": "", "version": "1"},
    ],
)
async def test_aad_binds_the_context(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount, other: dict[str, str]
) -> None:
    secret = os.urandom(32)
    async with connected(config(fake, key_name, account)) as provider:
        blob = await provider.wrap(secret, context=CTX)
        with pytest.raises(ProviderCryptoError):
            await provider.unwrap(blob, context=other)
        assert await provider.unwrap(blob, context=dict(reversed(list(CTX.items())))) == secret


async def test_blob_of_another_key_does_not_unwrap(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    other_key = fake.create_key(members={account.email})
    async with (
        connected(config(fake, key_name, account)) as a,
        connected(config(fake, other_key, account)) as b,
    ):
        blob = await a.wrap(os.urandom(32), context=CTX)
        with pytest.raises(ProviderCryptoError):
            await b.unwrap(blob, context=CTX)


async def test_rotation_at_cloud_kms_is_transparent(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    secret = os.urandom(32)
    async with connected(config(fake, key_name, account)) as provider:
        old = await provider.wrap(secret, context=CTX)
        assert (await provider.describe()).details["primary_version"] == "1"
        fake.rotate(key_name)
        assert (await provider.describe()).details["primary_version"] == "2"
        new = await provider.wrap(secret, context=CTX)
        assert fake.calls_of("Encrypt")[-1].request.name == key_name
        assert await provider.unwrap(old, context=CTX) == secret
        assert await provider.unwrap(new, context=CTX) == secret
        fake.set_state(key_name, "DESTROYED", version=1)
        with pytest.raises(ProviderKeyDisabled, match="DESTROYED"):
            await provider.unwrap(old, context=CTX)
        assert await provider.unwrap(new, context=CTX) == secret


@pytest.mark.parametrize(
    ("level", "hsm", "external"),
    [
        ("HSM", True, False),
        ("SOFTWARE", False, False),
        ("EXTERNAL", False, True),
        ("EXTERNAL_VPC", False, True),
    ],
)
async def test_protection_level_reported(
    fake: FakeCloudKms, account: ServiceAccount, level: str, hsm: bool, external: bool
) -> None:
    key = fake.create_key(protection_level=level, members={account.email})
    async with connected(config(fake, key, account)) as provider:
        info = await provider.describe()
    assert info.type == "gcp-kms"
    assert info.key_ref == key
    assert info.hsm_backed is hsm
    assert info.details["protection_level"] == level
    assert info.details["external"] is external
    assert info.details["purpose"] == "ENCRYPT_DECRYPT"
    assert info.details["primary_version"] == "1"
    assert info.details["primary_state"] == "ENABLED"


async def test_health_reports_key_problems_without_raising(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    async with connected(config(fake, key_name, account)) as provider:
        assert (await provider.health()).ok
        fake.disable_primary(key_name)
        health = await provider.health()
        assert not health.ok and "DISABLED" in health.detail
        fake.set_state(key_name, "ENABLED")
        fake.set_purpose(key_name, "ASYMMETRIC_DECRYPT")
        health = await provider.health()
        assert not health.ok and "ASYMMETRIC_DECRYPT" in health.detail
        fake.forbid(key_name)
        health = await provider.health()
        assert not health.ok and "PERMISSION_DENIED" in health.detail
    async with connected(config(fake, fake.unknown_key_name(), account)) as provider:
        health = await provider.health()
        assert not health.ok and "NOT_FOUND" in health.detail


STATUS_CASES = [
    ("Encrypt", "NOT_FOUND", ProviderKeyNotFound),
    ("Decrypt", "NOT_FOUND", ProviderKeyNotFound),
    ("Encrypt", "PERMISSION_DENIED", ProviderAccessDenied),
    ("Decrypt", "PERMISSION_DENIED", ProviderAccessDenied),
    ("Encrypt", "UNAUTHENTICATED", ProviderAccessDenied),
    ("Decrypt", "UNAUTHENTICATED", ProviderAccessDenied),
    ("Encrypt", "FAILED_PRECONDITION", ProviderKeyDisabled),
    ("Decrypt", "FAILED_PRECONDITION", ProviderKeyDisabled),
    ("Decrypt", "INVALID_ARGUMENT", ProviderCryptoError),
    ("Encrypt", "DEADLINE_EXCEEDED", ProviderUnavailable),
    ("Decrypt", "DEADLINE_EXCEEDED", ProviderUnavailable),
    ("Encrypt", "RESOURCE_EXHAUSTED", ProviderUnavailable),
    ("Decrypt", "RESOURCE_EXHAUSTED", ProviderUnavailable),
    ("Encrypt", "INTERNAL", ProviderUnavailable),
    ("GetCryptoKey", "NOT_FOUND", ProviderKeyNotFound),
    ("GetCryptoKey", "PERMISSION_DENIED", ProviderAccessDenied),
    ("GetCryptoKey", "UNAVAILABLE", ProviderUnavailable),
]


@pytest.mark.parametrize(("method", "code", "expected"), STATUS_CASES)
async def test_status_translation(
    fake: FakeCloudKms,
    key_name: str,
    account: ServiceAccount,
    method: str,
    code: str,
    expected: type[ProviderError],
) -> None:
    async with connected(config(fake, key_name, account, timeout_seconds=1.0)) as provider:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        calls = {
            "Encrypt": lambda: provider.wrap(os.urandom(32), context=CTX),
            "Decrypt": lambda: provider.unwrap(blob, context=CTX),
            "GetCryptoKey": provider.describe,
        }
        fake.fail_next(method, code, "Cloud KMS says no", times=100)  # also outlasts the retry
        with pytest.raises(ProviderError) as err:
            await asyncio.wait_for(calls[method](), timeout=HANG_BOUND)
        assert type(err.value) is expected
        if expected is not ProviderCryptoError:
            assert code in str(err.value) and key_name in str(err.value)


async def test_invalid_argument_on_encrypt_is_not_a_crypto_error(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    async with connected(config(fake, key_name, account)) as provider:
        fake.fail_next("Encrypt", "INVALID_ARGUMENT", "The checksum in field plaintext_crc32c did not match")
        with pytest.raises(ProviderError, match="INVALID_ARGUMENT") as err:
            await provider.wrap(os.urandom(32), context=CTX)
        assert type(err.value) is ProviderError


async def test_one_unavailable_is_retried_within_the_deadline(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    secret = os.urandom(32)
    async with connected(config(fake, key_name, account)) as provider:
        fake.fail_next("Encrypt", "UNAVAILABLE")
        fake.fail_next("Decrypt", "UNAVAILABLE")
        blob = await provider.wrap(secret, context=CTX)
        assert await provider.unwrap(blob, context=CTX) == secret
    assert fake.calls_of("Encrypt")[-2].request.plaintext == secret  # the failed first attempt


async def test_persistent_unavailable_fails_within_the_timeout(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    async with connected(config(fake, key_name, account, timeout_seconds=0.5)) as provider:
        fake.fail_next("Encrypt", "UNAVAILABLE", times=1000)
        with pytest.raises(ProviderUnavailable):
            await asyncio.wait_for(provider.wrap(os.urandom(32), context=CTX), timeout=HANG_BOUND)


async def test_iam_and_authentication_failures(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    stranger, _ = make_service_account("stranger")  # a valid-looking key Google does not know
    other, other_private = make_service_account("other")
    fake.trust_service_account(other.email, other_private.public_key())  # known, but not granted
    cases: list[tuple[GcpKmsConfig, str]] = [
        (config(fake, key_name, None), "UNAUTHENTICATED"),  # anonymous
        (config(fake, key_name, stranger), "UNAUTHENTICATED"),
        (config(fake, key_name, other), "PERMISSION_DENIED"),
    ]
    for cfg, code in cases:
        async with connected(cfg) as provider:
            with pytest.raises(ProviderAccessDenied, match=code):
                await provider.wrap(os.urandom(32), context=CTX)
    async with connected(config(fake, key_name, account)) as provider:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        fake.forbid(key_name)  # the customer removed the binding
        with pytest.raises(ProviderAccessDenied, match="useToDecrypt"):
            await provider.unwrap(blob, context=CTX)


async def test_disabled_version_is_key_disabled(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    async with connected(config(fake, key_name, account)) as provider:
        blob = await provider.wrap(os.urandom(32), context=CTX)
        fake.disable_primary(key_name)
        for call in (provider.unwrap(blob, context=CTX), provider.wrap(os.urandom(32), context=CTX)):
            with pytest.raises(ProviderKeyDisabled, match="DISABLED"):
                await call


async def test_malformed_blobs_fail_without_a_call(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    async with connected(config(fake, key_name, account)) as provider:
        before = len(fake.calls_of("Decrypt"))
        for bad in (b"", b"\x01", b"\x02" + os.urandom(60), b"\x01" + bytes(200_000)):
            with pytest.raises(ProviderCryptoError):
                await provider.unwrap(bad, context=CTX)
        assert len(fake.calls_of("Decrypt")) == before


async def test_stopped_server_is_unavailable_within_the_timeout() -> None:
    from tests.providers.fakes.gcp_kms import FakeCloudKms

    account, private_key = make_service_account("own-server")
    with FakeCloudKms() as own:
        own.trust_service_account(account.email, private_key.public_key())
        key = own.create_key(members={account.email})
        async with connected(config(own, key, account, timeout_seconds=0.5)) as provider:
            blob = await provider.wrap(os.urandom(32), context=CTX)
            own.stop()
            for call in (provider.unwrap(blob, context=CTX), provider.wrap(os.urandom(32), context=CTX)):
                with pytest.raises(ProviderUnavailable):
                    await asyncio.wait_for(call, timeout=HANG_BOUND)
            health = await asyncio.wait_for(provider.health(), timeout=HANG_BOUND)
            assert not health.ok


def _tls_certificates(directory: Path) -> tuple[Path, bytes, bytes]:
    """A test CA (PEM file) and a server certificate for localhost/127.0.0.1 (chain, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gcp-kms-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca_path, cert.public_bytes(serialization.Encoding.PEM), key_pem


_PRODUCTION_PATH_SCRIPT = """
import asyncio, json, os, sys
from providers import parse_provider_config
async def main():
    for raw in json.loads(sys.argv[1]):
        provider = await parse_provider_config(raw).connect()
        try:
            secret = os.urandom(32)
            blob = await provider.wrap(secret, context={"tenant": "t"})
            assert await provider.unwrap(blob, context={"tenant": "t"}) == secret
            assert (await provider.health()).ok
        finally:
            await provider.close()
    print("round trips ok")
asyncio.run(main())
"""


def test_production_path_tls_with_adc_and_with_credentials_json(tmp_path: Path) -> None:
    """The non-test branch: TLS to a private ``endpoint``, Application Default Credentials
    (here GOOGLE_APPLICATION_CREDENTIALS) or ``credentials_json``, self-signed JWTs checked by
    the fake. In a subprocess because gRPC reads its trusted roots (the test CA, via
    GRPC_DEFAULT_SSL_ROOTS_FILE_PATH) once per process."""
    from tests.providers.fakes.gcp_kms import FakeCloudKms

    ca_path, chain, key_pem = _tls_certificates(tmp_path)
    adc_account, adc_private = make_service_account("adc")
    json_account, json_private = make_service_account("json-key")
    (tmp_path / "adc.json").write_text(adc_account.key_json)
    (tmp_path / "gcloud").mkdir()
    env = {
        **os.environ,
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(ca_path),
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "adc.json"),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "NO_GCE_CHECK": "True",
    }
    with FakeCloudKms(tls=(chain, key_pem)) as tls_fake:
        for account, private_key in ((adc_account, adc_private), (json_account, json_private)):
            tls_fake.trust_service_account(account.email, private_key.public_key())
        key = tls_fake.create_key(members={adc_account.email, json_account.email})
        base = {
            "type": "gcp-kms",
            "key_name": key,
            "endpoint": f"localhost:{tls_fake.port}",
            "timeout_seconds": 5,
        }
        configs = [base, {**base, "credentials_json": json_account.key_json}]
        result = subprocess.run(
            [sys.executable, "-c", _PRODUCTION_PATH_SCRIPT, json.dumps(configs)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "round trips ok" in result.stdout
        callers = {call.caller for call in tls_fake.calls}
    assert callers == {adc_account.email, json_account.email}
    assert secret_marker(json_account) not in result.stdout + result.stderr


async def test_tls_endpoint_refuses_a_plaintext_server(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    """Without insecure_endpoint the provider speaks TLS only: a plaintext peer is unreachable."""
    cfg = config(fake, key_name, account, insecure_endpoint=False, timeout_seconds=0.5)
    before = len(fake.calls)
    async with connected(cfg) as provider:
        with pytest.raises(ProviderUnavailable):
            await asyncio.wait_for(provider.wrap(os.urandom(32), context=CTX), timeout=HANG_BOUND)
    assert len(fake.calls) == before  # nothing reached the service


def test_no_application_default_credentials_is_access_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    cfg = GcpKmsConfig(key_name=KEY)
    with pytest.raises(ProviderAccessDenied, match="Application Default Credentials"):
        asyncio.run(cfg.connect())


async def test_payloads_never_logged_even_at_debug(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's transport logs request and response payloads (S in Encrypt, in Decrypt's answer)
    when its logger is enabled for DEBUG; the provider must keep them out of every log."""
    caplog.set_level(logging.DEBUG)
    secret = os.urandom(32)
    async with connected(config(fake, key_name, account)) as provider:
        logging.getLogger(PAYLOAD_LOGGER).setLevel(logging.DEBUG)  # an operator turning it on
        try:
            blob = await provider.wrap(secret, context=CTX)
            assert await provider.unwrap(blob, context=CTX) == secret
        finally:
            logging.getLogger(PAYLOAD_LOGGER).setLevel(logging.INFO)
    records = [r for r in caplog.records if r.name.startswith("google.cloud.kms")]
    assert records, "expected the SDK's own (payload-free) debug records"
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret), secret_marker(account)):
        assert form not in text


async def test_unusable_credentials_fail_connect_without_echo(fake: FakeCloudKms, key_name: str) -> None:
    info = {
        "type": "service_account",
        "client_email": "x@fake-project.iam.gserviceaccount.com",
        "private_key": "-----BEGIN PRIVATE KEY-----\nSECRETSECRETnotakey\n-----END PRIVATE KEY-----\n",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    cfg = config(fake, key_name, None, credentials_json=json.dumps(info))
    with pytest.raises(ProviderAccessDenied, match="credentials_json") as err:
        await cfg.connect()
    assert "SECRETSECRET" not in f"{err.value!r} {err.value}"
    assert err.value.__cause__ is None and err.value.__suppress_context__


async def test_close_is_idempotent_and_final(
    fake: FakeCloudKms, key_name: str, account: ServiceAccount
) -> None:
    provider = await config(fake, key_name, account).connect()
    blob = await provider.wrap(os.urandom(32), context=CTX)
    await provider.close()
    await provider.close()
    with pytest.raises(ProviderUnavailable):
        await provider.unwrap(blob, context=CTX)
    assert "credentials" not in repr(provider) and key_name in repr(provider)
