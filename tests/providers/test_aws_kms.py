"""The `aws-kms` provider beyond the conformance suite.

Peers:
* the session's moto server (tests/providers/peers/aws_kms.py) for what moto implements: KMS with
  encryption context, AssumeRole across moto accounts;
* a second, dedicated moto *process* with IAM checks on (INITIAL_NO_AUTH_ACTION_COUNT; the setting is
  process-global in moto, so it cannot share the in-process server): wrong ExternalId and missing
  kms:Decrypt are really refused there;
* botocore's ``Stubber`` where moto does not implement or enforce the API: key state (moto ignores
  disabled keys), CloudHSM custom key stores and GetParametersForImport/ImportKeyMaterial (moto
  answers HTTP 500), and every error code of the translation table. Stubbed responses follow the
  shapes of the AWS KMS/STS API reference (the Stubber validates them against botocore's models).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.stub import Stubber
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
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
from providers.aws_kms import (
    VALIDATION_CHECKS,
    AwsKmsConfig,
    AwsKmsProvider,
    Check,
    assume_role_fetcher,
    get_parameters_for_import,
    import_key_material,
    onboarding_policies,
    refreshable_credentials,
    translate_error,
    validate,
)
from tests.providers.conftest import Peer
from tests.providers.peers.aws_kms import (
    DUMMY_ACCESS_KEY_ID,
    DUMMY_SECRET_ACCESS_KEY,
    REGION,
    MotoEndpoint,
    kms_config,
)

ROOT = Path(__file__).resolve().parents[2]
CTX = {"tenant": "acme", "key": "volumes", "version": "1"}
SERVICE_ACCOUNT = "111111111111"
CUSTOMER_ACCOUNT = "222222222222"
EXTERNAL_ID = "kms-ext-3f9c2a"
KEY_ARN = f"arn:aws:kms:{REGION}:{CUSTOMER_ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ROLE_ARN = f"arn:aws:iam::{CUSTOMER_ACCOUNT}:role/kms-service-access"


def stubbed_config(**overrides: Any) -> AwsKmsConfig:
    """A config whose clients only ever talk to a Stubber (the endpoint is never contacted)."""
    values: dict[str, Any] = {
        "region": REGION,
        "key_id": KEY_ARN,
        "endpoint_url": "http://127.0.0.1:9",
        "access_key_id": DUMMY_ACCESS_KEY_ID,
        "secret_access_key": DUMMY_SECRET_ACCESS_KEY,
        "timeout_seconds": 1,
    }
    values.update(overrides)
    return AwsKmsConfig.model_validate(values)


@dataclass
class Stubs:
    """Attaches a Stubber to every client the provider builds (`on_client` hook)."""

    prepare: Callable[[str, Stubber], None]
    stubbers: dict[str, Stubber] = field(default_factory=dict)

    def __call__(self, service: str, client: Any) -> None:
        stubber = Stubber(client)
        self.prepare(service, stubber)
        stubber.activate()
        self.stubbers[service] = stubber

    def assert_all_used(self) -> None:
        for stubber in self.stubbers.values():
            stubber.assert_no_pending_responses()


def key_metadata(**overrides: Any) -> dict[str, Any]:
    """DescribeKey's KeyMetadata as documented in the AWS KMS API reference."""
    metadata: dict[str, Any] = {
        "AWSAccountId": CUSTOMER_ACCOUNT,
        "KeyId": KEY_ARN.rsplit("/", 1)[1],
        "Arn": KEY_ARN,
        "CreationDate": datetime(2026, 1, 1, tzinfo=UTC),
        "Enabled": True,
        "Description": "",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyState": "Enabled",
        "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
        "MultiRegion": False,
    }
    metadata.update(overrides)
    return metadata


def assert_checks(checks: list[Check], *, failed: str | None) -> Check | None:
    """All checks present in order; those before `failed` ok, `failed` not ok, later ones not run."""
    assert [c.name for c in checks] == list(VALIDATION_CHECKS)
    if failed is None:
        assert all(c.ok for c in checks), checks
        return None
    index = VALIDATION_CHECKS.index(failed)
    assert all(c.ok for c in checks[:index]), checks
    assert not checks[index].ok
    for later in checks[index + 1 :]:
        assert not later.ok
        assert later.detail == f"not run: the {failed} check failed"
    return checks[index]


# --------------------------------------------------------------------------------------------------
# Configuration


def test_config_validates_from_plain_json_strings() -> None:
    raw = {
        "type": "aws-kms",
        "region": "eu-west-1",
        "key_id": "alias/service-root",
        "access_key_id": DUMMY_ACCESS_KEY_ID,
        "secret_access_key": DUMMY_SECRET_ACCESS_KEY,
    }
    from_json = AwsKmsConfig.model_validate_json(json.dumps(raw))
    from_registry = parse_provider_config(json.loads(json.dumps(raw)))
    for config in (from_json, from_registry):
        assert isinstance(config, AwsKmsConfig)
        assert isinstance(config.secret_access_key, SecretStr)
        assert isinstance(config.access_key_id, SecretStr)
        assert config.secret_access_key.get_secret_value() == DUMMY_SECRET_ACCESS_KEY
        assert config.access_key_id.get_secret_value() == DUMMY_ACCESS_KEY_ID
    assert from_json == from_registry


@pytest.mark.parametrize(
    "key_id",
    [
        KEY_ARN,
        f"arn:aws:kms:{REGION}:{CUSTOMER_ACCOUNT}:key/mrk-1234abcd12ab34cd56ef1234567890ab",
        f"arn:aws:kms:{REGION}:{CUSTOMER_ACCOUNT}:alias/service-root",
        "alias/service-root",
        "1234abcd-12ab-34cd-56ef-1234567890ab",
    ],
)
def test_service_key_accepts_arn_alias_and_id(key_id: str) -> None:
    config = AwsKmsConfig.model_validate({"region": REGION, "key_id": key_id})
    assert config.key_id == key_id
    assert config.role_arn is None


CROSS = {"region": REGION, "role_arn": ROLE_ARN, "external_id": EXTERNAL_ID}


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ({**CROSS, "key_id": "alias/customer"}, "key_id", "resolved in the caller's account"),
        (
            {**CROSS, "key_id": f"arn:aws:kms:{REGION}:{CUSTOMER_ACCOUNT}:alias/customer"},
            "key_id",
            "resolved in the caller's account",
        ),
        (
            {**CROSS, "key_id": "1234abcd-12ab-34cd-56ef-1234567890ab"},
            "key_id",
            "resolved in the caller's account",
        ),
        ({**CROSS, "key_id": KEY_ARN.replace(REGION, "eu-west-1")}, "key_id", "another region"),
        ({"region": REGION, "key_id": KEY_ARN.replace(REGION, "eu-west-1")}, "key_id", "another region"),
        ({**CROSS, "key_id": KEY_ARN.replace("1234abcd-", "zzzzabcd-")}, "key_id", "full key ARN"),
        (
            {**CROSS, "key_id": KEY_ARN, "role_arn": f"arn:aws:iam::{CUSTOMER_ACCOUNT}:user/bob"},
            "role_arn",
            "role",
        ),
        (
            {**CROSS, "key_id": KEY_ARN, "role_arn": f"arn:aws:sts::{CUSTOMER_ACCOUNT}:assumed-role/r/s"},
            "role_arn",
            "IAM role ARN",
        ),
        ({**CROSS, "key_id": KEY_ARN, "external_id": None}, "external_id", "required with role_arn"),
        ({"region": REGION, "key_id": KEY_ARN, "external_id": EXTERNAL_ID}, "external_id", "only applies"),
        ({**CROSS, "key_id": KEY_ARN, "external_id": "x"}, "external_id", "2-1224"),
        ({"region": "us-east", "key_id": "alias/a"}, "region", "region code"),
        (
            {"region": REGION, "key_id": "alias/a", "access_key_id": DUMMY_ACCESS_KEY_ID},
            "secret_access_key",
            "both",
        ),
        ({"region": REGION, "key_id": "alias/a", "secret_access_key": "s"}, "secret_access_key", "both"),
        ({"region": REGION, "key_id": "alias/a", "endpoint_url": "kms.local"}, "endpoint_url", "http(s) URL"),
        ({"region": REGION, "key_id": "alias/a", "surprise": 1}, "surprise", "Extra inputs"),
        ({"region": REGION, "key_id": "alias/a", "timeout_seconds": 0}, "timeout_seconds", "greater than 0"),
    ],
)
def test_config_refuses_with_an_explanation(raw: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as err:
        AwsKmsConfig.model_validate(raw)
    problems = {str(e["loc"][0]): e["msg"] for e in err.value.errors()}
    assert field in problems, problems
    assert reason in problems[field]
    # The registry names the field; it never echoes a secret value.
    with pytest.raises(ProviderConfigError) as reg:
        parse_provider_config({"type": "aws-kms", **raw})
    assert f"provider.{field}" in str(reg.value)
    assert DUMMY_SECRET_ACCESS_KEY not in str(reg.value)


def test_cross_account_with_a_full_key_arn_is_accepted() -> None:
    config = AwsKmsConfig.model_validate({**CROSS, "key_id": KEY_ARN})
    assert (config.role_arn, config.external_id, config.key_id) == (ROLE_ARN, EXTERNAL_ID, KEY_ARN)


def test_secrets_never_in_repr_str_dump_or_public_view() -> None:
    config = stubbed_config()
    secret, key_id = DUMMY_SECRET_ACCESS_KEY, DUMMY_ACCESS_KEY_ID
    view = config.public_view()
    assert "secret_access_key" not in view
    assert "access_key_id" not in view
    assert view["key_id"] == KEY_ARN  # the rest of the config is shown
    for text in (
        repr(config),
        str(config),
        json.dumps(view),
        config.model_dump_json(),
        str(config.model_dump()),
    ):
        assert secret not in text
        assert key_id not in text
    assert "secret_access_key" not in repr(config)  # not even masked: the field is hidden from repr


async def test_secrets_and_key_material_never_logged(
    peer_aws_kms: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    """With every logger at DEBUG (botocore logs whole request and response bodies there), neither
    the static credentials nor the wrapped secret reach the log, an error, or a repr."""
    caplog.set_level(logging.DEBUG)
    provider = await peer_aws_kms.config.connect()
    secret = os.urandom(32)
    texts: list[str] = [repr(provider)]
    try:
        blob = await provider.wrap(secret, context=CTX)
        assert await provider.unwrap(blob, context=CTX) == secret
        with pytest.raises(ProviderCryptoError) as err:
            await provider.unwrap(blob, context={**CTX, "version": "2"})
        texts.append(f"{err.value!r} {err.value}")
    finally:
        await provider.close()
    assert any(r.name.startswith("botocore") for r in caplog.records)  # botocore did log at DEBUG
    haystack = caplog.text + "\n".join(texts)
    for form in (
        DUMMY_SECRET_ACCESS_KEY,
        DUMMY_ACCESS_KEY_ID,
        secret.hex(),
        base64.b64encode(secret).decode(),
    ):
        assert form not in haystack


def test_module_imports_and_validates_without_the_sdk() -> None:
    """Config validation must work where boto3 is not installed; connect() then says what to install."""
    script = """
import asyncio, sys
sys.modules["boto3"] = None
sys.modules["botocore"] = None
from providers import parse_provider_config
from providers.base import ProviderError
config = parse_provider_config({"type": "aws-kms", "region": "us-east-1", "key_id": "alias/a"})
try:
    asyncio.run(config.connect())
except ProviderError as exc:
    print("refused:", exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "refused: the aws-kms provider needs boto3" in result.stdout


# --------------------------------------------------------------------------------------------------
# Against the session's moto server


def create_role_and_key(moto: MotoEndpoint, account: str, *, trust_principal: str) -> tuple[str, str]:
    """A customer's role (trusting `trust_principal` with EXTERNAL_ID) and symmetric key in `account`."""
    policies = onboarding_policies(
        service_principal_arn=trust_principal, external_id=EXTERNAL_ID, key_arn=None, tenant="acme"
    )
    role = moto.client("iam", account=account).create_role(
        RoleName=f"kms-service-{uuid.uuid4().hex[:8]}",
        AssumeRolePolicyDocument=json.dumps(policies["trust_policy"]),
    )["Role"]["Arn"]
    key = moto.client("kms", account=account).create_key(
        KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT"
    )["KeyMetadata"]["Arn"]
    return role, key


async def test_customer_key_in_another_account_via_assume_role(aws_moto_endpoint: MotoEndpoint) -> None:
    role_arn, key_arn = create_role_and_key(
        aws_moto_endpoint, CUSTOMER_ACCOUNT, trust_principal=f"arn:aws:iam::{SERVICE_ACCOUNT}:root"
    )
    assert f":{CUSTOMER_ACCOUNT}:" in key_arn
    url = aws_moto_endpoint.url
    cross = kms_config(url, key_arn, role_arn=role_arn, external_id=EXTERNAL_ID, sts_endpoint_url=url)
    provider = await cross.connect()
    try:
        secret = os.urandom(32)
        blob = await provider.wrap(secret, context=CTX)
        assert await provider.unwrap(blob, context=CTX) == secret
        info = await provider.describe()
        assert info.key_ref == key_arn
    finally:
        await provider.close()
    # The service's own credentials do not see the customer's key: the role's credentials were used.
    direct = await kms_config(url, key_arn).connect()
    try:
        with pytest.raises(ProviderKeyNotFound, match="does not exist or is not visible"):
            await direct.wrap(os.urandom(32), context=CTX)
    finally:
        await direct.close()
    checks = await validate(cross, tenant="acme")
    assert_checks(checks, failed=None)
    assert checks[1].detail == f"assumed {role_arn} with the external id"


async def test_encryption_context_is_the_kms_encryption_context(
    peer_aws_kms: Peer, aws_moto_endpoint: MotoEndpoint
) -> None:
    config = peer_aws_kms.config
    assert isinstance(config, AwsKmsConfig)
    provider = await config.connect()
    another_arn = aws_moto_endpoint.client("kms").create_key(
        KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT"
    )["KeyMetadata"]["Arn"]
    other_key = await kms_config(aws_moto_endpoint.url, another_arn).connect()
    try:
        secret = os.urandom(32)
        blob = await provider.wrap(secret, context=CTX)
        # Exactly the context is bound: not a subset, a superset, reordering-sensitive values or none.
        for wrong in ({}, {"tenant": "acme"}, {**CTX, "extra": "x"}, {**CTX, "tenant": "ACME"}):
            with pytest.raises(ProviderCryptoError):
                await provider.unwrap(blob, context=wrong)
        assert await provider.unwrap(blob, context=dict(reversed(list(CTX.items())))) == secret
        # It is KMS's EncryptionContext (a plain KMS client decrypts with it and only with it) ...
        kms = boto3.client(
            "kms",
            region_name=REGION,
            endpoint_url=config.endpoint_url,
            aws_access_key_id=DUMMY_ACCESS_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET_ACCESS_KEY,
        )
        assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"] == secret
        with pytest.raises(botocore.exceptions.ClientError, match="InvalidCiphertextException"):
            kms.decrypt(CiphertextBlob=blob)
        # ... and Decrypt names the key: another key of the same account refuses the blob.
        with pytest.raises(ProviderCryptoError):
            await other_key.unwrap(blob, context=CTX)
    finally:
        await provider.close()
        await other_key.close()


async def test_describe_and_health_on_moto(peer_aws_kms: Peer) -> None:
    provider = await peer_aws_kms.config.connect()
    try:
        info = await provider.describe()
        assert info.type == "aws-kms"
        assert info.key_ref == peer_aws_kms.config.key_id
        assert info.hsm_backed is False
        assert dict(info.details) == {
            "key_state": "Enabled",
            "key_spec": "SYMMETRIC_DEFAULT",
            "origin": "AWS_KMS",
            "custom_key_store_id": None,
        }
        health = await provider.health()
        assert health.ok, health.detail
    finally:
        await provider.close()
        await provider.close()  # idempotent


async def test_validate_a_service_key_on_moto(peer_aws_kms: Peer) -> None:
    assert isinstance(peer_aws_kms.config, AwsKmsConfig)
    checks = await validate(peer_aws_kms.config)
    assert_checks(checks, failed=None)
    assert checks[1].detail.startswith("skipped: no role_arn")


async def test_validate_reports_a_malformed_submission_in_the_arn_check() -> None:
    checks = await validate({"type": "aws-kms", **CROSS, "key_id": "alias/customer"})
    check = assert_checks(checks, failed="arn")
    assert check is not None
    assert "key_id" in check.detail
    assert "resolved in the caller's account" in check.detail


async def test_unreachable_endpoint_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = await stubbed_config(endpoint_url=f"http://127.0.0.1:{port}").connect()
    try:
        with pytest.raises(ProviderUnavailable, match="unreachable"):
            await asyncio.wait_for(provider.wrap(os.urandom(32), context=CTX), timeout=30)
        health = await asyncio.wait_for(provider.health(), timeout=30)
        assert not health.ok
        assert "unreachable" in health.detail
    finally:
        await provider.close()


# --------------------------------------------------------------------------------------------------
# Credentials refresh (injectable clock)


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def assume_role_response(access_key: str, expires: datetime) -> dict[str, Any]:
    return {
        "Credentials": {
            "AccessKeyId": access_key,
            "SecretAccessKey": "secret-" + access_key,
            "SessionToken": "token-" + access_key,
            "Expiration": expires,
        },
        "AssumedRoleUser": {
            "AssumedRoleId": "AROAEXAMPLEID:kms-service",
            "Arn": f"arn:aws:sts::{CUSTOMER_ACCOUNT}:assumed-role/kms-service-access/kms-service",
        },
    }


def test_assumed_role_credentials_refresh_before_expiry() -> None:
    clock = FakeClock()
    config = stubbed_config(role_arn=ROLE_ARN, external_id=EXTERNAL_ID)
    sts = boto3.client(
        "sts",
        region_name=REGION,
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id=DUMMY_ACCESS_KEY_ID,
        aws_secret_access_key=DUMMY_SECRET_ACCESS_KEY,
    )
    expected = {
        "RoleArn": ROLE_ARN,
        "RoleSessionName": "kms-service",
        "ExternalId": EXTERNAL_ID,
        "DurationSeconds": 3600,
    }
    first_expiry = clock.now + timedelta(hours=1)
    second_expiry = first_expiry + timedelta(hours=1)
    with Stubber(sts) as stubber:
        stubber.add_response("assume_role", assume_role_response("ASIAFIRST0000000", first_expiry), expected)
        stubber.add_response("assume_role", assume_role_response("ASIASECOND000000", second_expiry), expected)
        stubber.add_client_error(
            "assume_role", service_error_code="AccessDenied", http_status_code=403, expected_params=expected
        )
        stubber.add_client_error(
            "assume_role", service_error_code="AccessDenied", http_status_code=403, expected_params=expected
        )
        credentials = refreshable_credentials(assume_role_fetcher(sts, config), clock=clock)

        assert credentials.get_frozen_credentials().access_key == "ASIAFIRST0000000"  # fetched on first use
        clock.now = first_expiry - timedelta(minutes=20)
        assert credentials.get_frozen_credentials().access_key == "ASIAFIRST0000000"  # still fresh: no call
        clock.now = first_expiry - timedelta(minutes=5)
        assert (
            credentials.get_frozen_credentials().token == "token-ASIASECOND000000"
        )  # refreshed before expiry

        # Within the advisory window a failed refresh keeps the still-valid credentials ...
        clock.now = second_expiry - timedelta(minutes=12)
        assert credentials.get_frozen_credentials().access_key == "ASIASECOND000000"
        # ... within the mandatory window it is an error, translated for the operator.
        clock.now = second_expiry - timedelta(minutes=5)
        with pytest.raises(ProviderAccessDenied, match="trust policy") as err:
            credentials.get_frozen_credentials()
        assert EXTERNAL_ID in str(err.value)
        stubber.assert_no_pending_responses()


async def test_provider_refreshes_assumed_role_on_moto(
    aws_moto_endpoint: MotoEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a real KMS client: after the clock nears expiry, the next call assumes the role again.
    The temporary credentials never reach a log, even at DEBUG."""
    caplog.set_level(logging.DEBUG)
    role_arn, key_arn = create_role_and_key(
        aws_moto_endpoint, CUSTOMER_ACCOUNT, trust_principal=f"arn:aws:iam::{SERVICE_ACCOUNT}:root"
    )
    url = aws_moto_endpoint.url
    config = kms_config(url, key_arn, role_arn=role_arn, external_id=EXTERNAL_ID, sts_endpoint_url=url)
    assumed: list[str] = []
    temporary_secrets: list[str] = []

    def count_assume_role(service: str, client: Any) -> None:
        if service == "sts":

            def record(parsed: dict[str, Any], **_: Any) -> None:
                assumed.append(parsed["Credentials"]["AccessKeyId"])
                temporary_secrets.extend(
                    (parsed["Credentials"]["SecretAccessKey"], parsed["Credentials"]["SessionToken"])
                )

            client.meta.events.register("after-call.sts.AssumeRole", record)

    clock = FakeClock()
    provider = await AwsKmsProvider.create(config, clock=clock, on_client=count_assume_role)
    try:
        assert assumed == []  # connect() does not call STS
        blob = await provider.wrap(os.urandom(32), context=CTX)
        await provider.unwrap(blob, context=CTX)
        assert len(assumed) == 1
        clock.now += timedelta(minutes=56)  # moto's credentials last 1 h: 4 minutes left
        await provider.unwrap(blob, context=CTX)
        assert len(assumed) == 2
        assert assumed[0] != assumed[1]
    finally:
        await provider.close()
    assert len(temporary_secrets) == 4
    for value in temporary_secrets:
        assert value not in caplog.text


# --------------------------------------------------------------------------------------------------
# Against a moto process with IAM checks on


@dataclass(frozen=True)
class IamMoto:
    url: str
    service_key_id: str
    service_secret: str
    same_account_role: str
    same_account_key: str
    no_decrypt_role: str
    customer_key: str

    def config(self, *, role_arn: str, key_arn: str, external_id: str = EXTERNAL_ID) -> AwsKmsConfig:
        return AwsKmsConfig(
            region=REGION,
            key_id=key_arn,
            role_arn=role_arn,
            external_id=external_id,
            endpoint_url=self.url,
            sts_endpoint_url=self.url,
            access_key_id=SecretStr(self.service_key_id),
            secret_access_key=SecretStr(self.service_secret),
            timeout_seconds=5,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def iam_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamMoto]:
    """A dedicated moto process; IAM checks are switched on once the accounts are set up.

    moto reads INITIAL_NO_AUTH_ACTION_COUNT from the environment at start (unlimited here, so the
    setup calls below run unauthenticated) and `POST /moto-api/reset-auth` sets it to 0 afterwards:
    from then on every request is SigV4-verified against moto's IAM users and roles.
    moto limitations (moto 5.2): a role's trust policy (and so the ExternalId condition) is only
    evaluated when the role is in the caller's own account, and KMS resources are not matched (the
    roles' policies use "Resource": "*"); key policies are not enforced at all."""
    port = free_port()
    log_file = tmp_path_factory.mktemp("iam-moto") / "moto.log"
    with log_file.open("wb") as log_out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "inf"},
            stdout=log_out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start: {log_file.read_text()[-2000:]}")
                time.sleep(0.05)
        moto = MotoEndpoint(url=f"http://127.0.0.1:{port}", port=port)
        iam_service = moto.client("iam", account=SERVICE_ACCOUNT)
        iam_service.create_user(UserName="kms-service")
        iam_service.put_user_policy(
            UserName="kms-service",
            PolicyName="assume-customer-roles",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}],
                }
            ),
        )
        access_key = iam_service.create_access_key(UserName="kms-service")["AccessKey"]
        service_principal = f"arn:aws:iam::{SERVICE_ACCOUNT}:user/kms-service"

        def role(account: str, name: str, actions: list[str]) -> str:
            iam = moto.client("iam", account=account)
            trust = onboarding_policies(
                service_principal_arn=service_principal, external_id=EXTERNAL_ID, key_arn=None, tenant="acme"
            )["trust_policy"]
            arn: str = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"][
                "Arn"
            ]
            iam.put_role_policy(
                RoleName=name,
                PolicyName="kms",
                PolicyDocument=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
                    }
                ),
            )
            return arn

        all_actions = ["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"]
        environment = IamMoto(
            url=moto.url,
            service_key_id=access_key["AccessKeyId"],
            service_secret=access_key["SecretAccessKey"],
            same_account_role=role(SERVICE_ACCOUNT, "customer-same-account", all_actions),
            same_account_key=moto.client("kms", account=SERVICE_ACCOUNT).create_key(
                KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT"
            )["KeyMetadata"]["Arn"],
            no_decrypt_role=role(CUSTOMER_ACCOUNT, "customer-no-decrypt", ["kms:Encrypt", "kms:DescribeKey"]),
            customer_key=moto.client("kms", account=CUSTOMER_ACCOUNT).create_key(
                KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT"
            )["KeyMetadata"]["Arn"],
        )
        request = urllib.request.Request(
            f"{moto.url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["status"] == "ok"
        yield environment
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_iam_server_rejects_unknown_credentials(iam_moto: IamMoto) -> None:
    """Sanity check of the peer (IAM checks are really on) and of the 403-with-XML translation."""
    config = iam_moto.config(role_arn=iam_moto.same_account_role, key_arn=iam_moto.same_account_key)
    bogus = config.model_copy(update={"secret_access_key": SecretStr("not-the-secret")})
    provider = await bogus.connect()
    try:
        with pytest.raises(ProviderAccessDenied, match="rejected the credentials"):
            await provider.wrap(os.urandom(32), context=CTX)
    finally:
        await provider.close()


async def test_validate_passes_with_the_right_external_id(iam_moto: IamMoto) -> None:
    checks = await validate(
        iam_moto.config(role_arn=iam_moto.same_account_role, key_arn=iam_moto.same_account_key), tenant="acme"
    )
    assert_checks(checks, failed=None)


async def test_validate_wrong_external_id_fails_assume_role(iam_moto: IamMoto) -> None:
    config = iam_moto.config(
        role_arn=iam_moto.same_account_role, key_arn=iam_moto.same_account_key, external_id="not-the-one"
    )
    check = assert_checks(await validate(config, tenant="acme"), failed="assume_role")
    assert check is not None
    assert "refused sts:AssumeRole on " + iam_moto.same_account_role in check.detail
    assert '"sts:ExternalId": "not-the-one"' in check.detail
    assert "trust policy" in check.detail
    # The provider itself reports the same denial on first use.
    provider = await config.connect()
    try:
        with pytest.raises(ProviderAccessDenied, match="refused sts:AssumeRole"):
            await provider.wrap(os.urandom(32), context=CTX)
    finally:
        await provider.close()


async def test_validate_role_without_decrypt_fails_round_trip(iam_moto: IamMoto) -> None:
    config = iam_moto.config(role_arn=iam_moto.no_decrypt_role, key_arn=iam_moto.customer_key)
    check = assert_checks(await validate(config, tenant="acme"), failed="round_trip")
    assert check is not None
    assert check.detail.startswith(f"AWS denied kms:Decrypt on {iam_moto.customer_key}")
    assert f"for role {iam_moto.no_decrypt_role}" in check.detail
    assert "HTTP 403" in check.detail
    assert "allow kms:Decrypt" in check.detail


# --------------------------------------------------------------------------------------------------
# Stubbed: what moto does not implement or enforce


def describe_only(metadata: dict[str, Any]) -> Stubs:
    def prepare(service: str, stubber: Stubber) -> None:
        if service == "kms":
            stubber.add_response("describe_key", {"KeyMetadata": metadata}, {"KeyId": KEY_ARN})

    return Stubs(prepare)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"KeyState": "Disabled", "Enabled": False}, "is Disabled, not Enabled: enable it"),
        ({"KeyState": "PendingDeletion", "Enabled": False}, "cancel its deletion"),
        ({"KeyState": "PendingImport", "Enabled": False, "Origin": "EXTERNAL"}, "import its key material"),
        (
            {
                "KeySpec": "RSA_2048",
                "CustomerMasterKeySpec": "RSA_2048",
                "EncryptionAlgorithms": ["RSAES_OAEP_SHA_256"],
            },
            "has key spec RSA_2048",
        ),
        (
            {"KeySpec": "HMAC_256", "CustomerMasterKeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"},
            "HMAC_256",
        ),
        ({"KeyUsage": "SIGN_VERIFY"}, "has key usage SIGN_VERIFY"),
    ],
)
async def test_validate_describe_key_problems_via_stubber(overrides: dict[str, Any], reason: str) -> None:
    """moto does not enforce key state, so the DescribeKey answers are stubbed (API reference shapes)."""
    stubs = describe_only(key_metadata(**overrides))
    check = assert_checks(await validate(stubbed_config(), on_client=stubs), failed="describe_key")
    assert check is not None
    assert KEY_ARN in check.detail
    assert reason in check.detail
    stubs.assert_all_used()


@pytest.mark.parametrize(
    ("overrides", "hsm_backed"),
    [
        (
            {
                "Origin": "AWS_CLOUDHSM",
                "CustomKeyStoreId": "cks-1234567890abcdef0",
                "CloudHsmClusterId": "cluster-1a23b4cdefg",
            },
            True,
        ),
        ({"Origin": "EXTERNAL_KEY_STORE", "CustomKeyStoreId": "cks-0987654321fedcba0"}, True),
        ({"Origin": "EXTERNAL"}, False),
        ({}, False),
    ],
)
async def test_hsm_backed_from_describe_key_via_stubber(overrides: dict[str, Any], hsm_backed: bool) -> None:
    """Custom key stores are not implemented by moto (HTTP 500): DescribeKey is stubbed."""
    metadata = key_metadata(**overrides)
    stubs = describe_only(metadata)
    provider = await AwsKmsProvider.create(stubbed_config(), on_client=stubs)
    try:
        info = await provider.describe()
    finally:
        await provider.close()
    assert info.hsm_backed is hsm_backed
    assert info.key_ref == KEY_ARN
    assert info.details == {
        "key_state": "Enabled",
        "key_spec": "SYMMETRIC_DEFAULT",
        "origin": metadata["Origin"],
        "custom_key_store_id": metadata.get("CustomKeyStoreId"),
    }
    stubs.assert_all_used()


async def test_byok_import_helpers_via_stubber() -> None:
    """GetParametersForImport and ImportKeyMaterial are not implemented by moto (HTTP 500): stubbed
    with the API reference shapes; the helpers' parameters and encodings are what is checked."""
    wrapping_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_der = wrapping_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = os.urandom(64)
    valid_to = datetime(2026, 12, 1, tzinfo=UTC)
    material = os.urandom(512)
    key_id = KEY_ARN.rsplit("/", 1)[1]

    def prepare(service: str, stubber: Stubber) -> None:
        stubber.add_response(
            "get_parameters_for_import",
            {"KeyId": KEY_ARN, "ImportToken": token, "PublicKey": public_der, "ParametersValidTo": valid_to},
            {"KeyId": KEY_ARN, "WrappingAlgorithm": "RSAES_OAEP_SHA_256", "WrappingKeySpec": "RSA_4096"},
        )

    params = await get_parameters_for_import(stubbed_config(), on_client=Stubs(prepare))
    assert params["parameters_valid_to"] == valid_to
    assert base64.b64decode(params["import_token"]) == token
    loaded = serialization.load_der_public_key(base64.b64decode(params["public_key"]))
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.public_numbers() == wrapping_key.public_key().public_numbers()

    for expires, expiry_params in (
        (valid_to, {"ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": valid_to}),
        (None, {"ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"}),
    ):

        def prepare_import(service: str, stubber: Stubber, expiry: dict[str, Any] = expiry_params) -> None:
            stubber.add_response(
                "import_key_material",
                {"KeyId": key_id},
                {"KeyId": KEY_ARN, "ImportToken": token, "EncryptedKeyMaterial": material, **expiry},
            )

        stubs = Stubs(prepare_import)
        await import_key_material(stubbed_config(), token, material, expires, on_client=stubs)
        stubs.assert_all_used()

    def expired_token(service: str, stubber: Stubber) -> None:
        stubber.add_client_error("import_key_material", "ExpiredImportTokenException", http_status_code=400)

    with pytest.raises(ProviderError, match="ExpiredImportTokenException"):
        await import_key_material(stubbed_config(), token, material, None, on_client=Stubs(expired_token))


# The translation table: (operation, AWS error code, HTTP status, provider error, text in the message)
TRANSLATIONS = [
    ("decrypt", "NotFoundException", 400, ProviderKeyNotFound, "does not exist"),
    ("encrypt", "DisabledException", 400, ProviderKeyDisabled, "is disabled"),
    ("decrypt", "KMSInvalidStateException", 400, ProviderKeyDisabled, "current state"),
    ("encrypt", "KeyUnavailableException", 500, ProviderKeyDisabled, "unavailable"),
    ("decrypt", "AccessDeniedException", 400, ProviderAccessDenied, "denied kms:Decrypt"),
    ("encrypt", "AccessDeniedException", 400, ProviderAccessDenied, "denied kms:Encrypt"),
    ("describe_key", "AccessDenied", 403, ProviderAccessDenied, "denied kms:DescribeKey"),
    ("encrypt", "UnrecognizedClientException", 400, ProviderAccessDenied, "rejected the credentials"),
    ("encrypt", "InvalidSignatureException", 400, ProviderAccessDenied, "rejected the credentials"),
    ("decrypt", "ExpiredTokenException", 400, ProviderAccessDenied, "rejected the credentials"),
    ("decrypt", "InvalidCiphertextException", 400, ProviderCryptoError, "refused to unwrap"),
    ("decrypt", "IncorrectKeyException", 400, ProviderCryptoError, "refused to unwrap"),
    ("encrypt", "ThrottlingException", 400, ProviderUnavailable, "retry later"),
    ("decrypt", "KMSInternalException", 500, ProviderUnavailable, "retry later"),
    ("encrypt", "DependencyTimeoutException", 503, ProviderUnavailable, "retry later"),
    ("encrypt", "SomethingNew", 503, ProviderUnavailable, "retry later"),
    ("encrypt", "InvalidKeyUsageException", 400, ProviderError, "SYMMETRIC_DEFAULT"),
]


@pytest.mark.parametrize(("operation", "code", "status", "error", "text"), TRANSLATIONS)
async def test_error_translation_via_stubber(
    operation: str, code: str, status: int, error: type[ProviderError], text: str
) -> None:
    config = stubbed_config(role_arn=ROLE_ARN, external_id=EXTERNAL_ID)
    secret = os.urandom(32)

    def prepare(service: str, stubber: Stubber) -> None:
        # The Stubber answers before the request is signed, so STS is never asked for credentials.
        if service == "kms":
            stubber.add_client_error(
                operation,
                service_error_code=code,
                service_message="User: arn:aws:sts::x:assumed-role/r/s is not authorized to perform it",
                http_status_code=status,
            )

    stubs = Stubs(prepare)
    provider = await AwsKmsProvider.create(config, on_client=stubs)
    try:
        calls = {
            "encrypt": lambda: provider.wrap(secret, context=CTX),
            "decrypt": lambda: provider.unwrap(b"\x01" * 64, context=CTX),
            "describe_key": provider.describe,
        }
        with pytest.raises(ProviderError) as err:
            await calls[operation]()
    finally:
        await provider.close()
    assert type(err.value) is error
    message = str(err.value)
    assert text in message
    assert KEY_ARN in message or "credentials" in message
    assert secret.hex() not in message
    assert err.value.__cause__ is None  # SDK exceptions (which may carry parameters) are not chained
    stubs.assert_all_used()
    if error is ProviderAccessDenied and code.startswith("AccessDenied"):
        assert f"role {ROLE_ARN}" in message


@pytest.mark.parametrize(
    ("message", "error"),
    [
        # KMS: the blob names a key other than (or unknown to) the caller; moto sends no message.
        ("The ciphertext refers to a customer master key that does not exist, ...", ProviderCryptoError),
        ("", ProviderCryptoError),
        (
            "User: arn:aws:sts::1:assumed-role/r/s is not authorized to perform: kms:Decrypt",
            ProviderAccessDenied,
        ),
        ("Access to KMS is not allowed", ProviderAccessDenied),
    ],
)
def test_decrypt_access_denied_is_told_apart(message: str, error: type[ProviderError]) -> None:
    exc = botocore.exceptions.ClientError(
        {
            "Error": {"Code": "AccessDeniedException", "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        },
        "Decrypt",
    )
    translated = translate_error(exc, action="kms:Decrypt", key_id=KEY_ARN, principal="p", unwrapping=True)
    assert type(translated) is error


@pytest.mark.parametrize(
    "exc",
    [
        botocore.exceptions.EndpointConnectionError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
        botocore.exceptions.ConnectTimeoutError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
        botocore.exceptions.ConnectionClosedError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
    ],
)
def test_network_errors_are_unavailable(exc: Exception) -> None:
    translated = translate_error(exc, action="kms:Encrypt", key_id=KEY_ARN, principal="p")
    assert isinstance(translated, ProviderUnavailable)
    assert translated.retryable
    assert KEY_ARN in str(translated)


def test_missing_credentials_are_access_denied() -> None:
    translated = translate_error(
        botocore.exceptions.NoCredentialsError(), action="kms:Encrypt", key_id=KEY_ARN, principal="p"
    )
    assert isinstance(translated, ProviderAccessDenied)
    assert "no AWS credentials" in str(translated)


# --------------------------------------------------------------------------------------------------
# Onboarding documents


def test_onboarding_policies() -> None:
    service = f"arn:aws:iam::{SERVICE_ACCOUNT}:role/kms-service"
    policies = onboarding_policies(
        service_principal_arn=service, external_id=EXTERNAL_ID, key_arn=KEY_ARN, tenant="acme"
    )
    assert json.loads(json.dumps(policies)) == policies  # plain JSON
    assert set(policies) == {"trust_policy", "key_policy"}
    assert policies["trust_policy"] == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AllowKmsServiceToAssumeThisRole",
                "Effect": "Allow",
                "Principal": {"AWS": service},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}},
            }
        ],
    }
    key_policy = policies["key_policy"]
    assert key_policy["Version"] == "2012-10-17"
    use, describe = key_policy["Statement"]
    role = f"arn:aws:iam::{CUSTOMER_ACCOUNT}:role/kms-service-access"  # in the key's account
    assert use["Effect"] == describe["Effect"] == "Allow"
    assert use["Principal"] == describe["Principal"] == {"AWS": role}
    assert use["Resource"] == describe["Resource"] == KEY_ARN
    assert sorted(use["Action"]) == ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
    assert use["Condition"] == {"StringEquals": {"kms:EncryptionContext:tenant": "acme"}}
    # DescribeKey has no encryption context: under the tenant condition it would always be denied.
    assert describe["Action"] == "kms:DescribeKey"
    assert "Condition" not in describe
    # Nothing broader than that key and those actions.
    assert "*" not in json.dumps(key_policy)

    explicit = onboarding_policies(
        service_principal_arn=service, external_id=EXTERNAL_ID, key_arn=None, tenant="beta", role_arn=ROLE_ARN
    )["key_policy"]["Statement"]
    assert explicit[0]["Principal"] == {"AWS": ROLE_ARN}
    assert explicit[0]["Resource"] == "*"  # in a key policy: "this key"
    assert explicit[0]["Condition"]["StringEquals"]["kms:EncryptionContext:tenant"] == "beta"
    with pytest.raises(ValueError, match="full KMS key ARN"):
        onboarding_policies(
            service_principal_arn=service, external_id=EXTERNAL_ID, key_arn="alias/x", tenant="a"
        )
