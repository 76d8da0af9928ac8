"""`gcp-kms` against a fake Cloud KMS speaking the real gRPC protocol (tests/providers/fakes).

One fake server per test session on 127.0.0.1:<free port>; each test gets a fresh key in it,
granted only to a service account whose generated JSON key the config carries as
`credentials_json`: every call authenticates with the self-signed JWT google-auth makes from it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from providers.gcp_kms import GcpKmsConfig
from tests.conftest import peer_missing
from tests.providers.conftest import Peer

if TYPE_CHECKING:
    from tests.providers.fakes.gcp_kms import FakeCloudKms

TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class ServiceAccount:
    email: str
    key_json: str  # the JSON key file's contents, as a customer downloads it
    private_key_pem: str


def make_service_account(name: str = "kms-service") -> tuple[ServiceAccount, rsa.RSAPrivateKey]:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    email = f"{name}@fake-project.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": "fake-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": email,
        "client_id": "100000000000000000001",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return ServiceAccount(email=email, key_json=json.dumps(info), private_key_pem=pem), private_key


@pytest.fixture(scope="session", name="gcp_kms_fake")
def fixture_gcp_kms_fake() -> Iterator[FakeCloudKms]:
    try:
        from tests.providers.fakes.gcp_kms import FakeCloudKms
    except ImportError as exc:  # the gcp extra is not installed
        peer_missing(f"gcp-kms peer needs google-cloud-kms, grpcio, google-crc32c: {exc.name} missing")
    with FakeCloudKms() as fake:
        yield fake


@pytest.fixture(scope="session", name="gcp_kms_account")
def fixture_gcp_kms_account(gcp_kms_fake: FakeCloudKms) -> ServiceAccount:
    """The service's own service account, trusted by the fake."""
    account, private_key = make_service_account()
    gcp_kms_fake.trust_service_account(account.email, private_key.public_key())
    return account


def gcp_kms_config(fake: FakeCloudKms, key_name: str, **overrides: object) -> GcpKmsConfig:
    fields: dict[str, object] = {
        "key_name": key_name,
        "endpoint": fake.address,
        "insecure_endpoint": True,
        "timeout_seconds": TIMEOUT_SECONDS,
        **overrides,
    }
    return GcpKmsConfig.model_validate(fields)


@pytest.fixture
def peer_gcp_kms(gcp_kms_fake: FakeCloudKms, gcp_kms_account: ServiceAccount) -> Peer:
    fake = gcp_kms_fake
    key_name = fake.create_key(members={gcp_kms_account.email})
    credentials = {"credentials_json": gcp_kms_account.key_json}

    async def disable() -> None:
        fake.disable_primary(key_name)

    @contextlib.asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        with fake.paused():
            yield

    return Peer(
        name="gcp-kms",
        config=gcp_kms_config(fake, key_name, **credentials),
        unknown_key=gcp_kms_config(fake, fake.unknown_key_name(), **credentials),
        disable=disable,
        outage=outage,
        notes="fake Cloud KMS over real gRPC; outage holds calls past the deadline",
    )
