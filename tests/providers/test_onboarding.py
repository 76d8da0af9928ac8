"""Customer-key onboarding through the API, against moto (AWS KMS + STS over HTTP)."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from tests.conftest import Api
from tests.providers.peers.aws_kms import DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, REGION, MotoEndpoint

SERVICE_ROLE = "arn:aws:iam::111111111111:role/kms-service"
CUSTOMER = "222222222222"


@pytest.fixture
def onboarding_api(api: Api) -> Api:
    object.__setattr__(api.services.onboarding._settings, "aws_service_principal_arn", SERVICE_ROLE)
    return api


def customer_key_and_role(moto: MotoEndpoint) -> tuple[str, str]:
    # KeyUsage and KeySpec explicit: this moto leaves them unset by default, which the
    # describe_key check rightly refuses.
    kms = moto.client("kms", account=CUSTOMER)
    key_arn = kms.create_key(
        Description="customer key", KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT"
    )["KeyMetadata"]["Arn"]
    iam = moto.client("iam", account=CUSTOMER)
    role = iam.create_role(
        RoleName=f"kms-access-{uuid.uuid4().hex[:6]}",
        AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []}),
    )
    return key_arn, role["Role"]["Arn"]


def provider(moto: MotoEndpoint, key_arn: str, role_arn: str) -> dict[str, object]:
    return {
        "type": "aws-kms",
        "key_id": key_arn,
        "region": REGION,
        "role_arn": role_arn,
        "endpoint_url": moto.url,
        "sts_endpoint_url": moto.url,
        "timeout_seconds": 3,
        "access_key_id": DUMMY_ACCESS_KEY_ID,
        "secret_access_key": DUMMY_SECRET_ACCESS_KEY,
    }


async def test_onboarding_then_customer_key(onboarding_api: Api, aws_moto_endpoint: MotoEndpoint) -> None:
    api = onboarding_api
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    key_arn, role_arn = customer_key_and_role(aws_moto_endpoint)

    # Without onboarding there is no ExternalId yet: refused with what to do.
    r = await api.post(
        "/v1/tenants/acme/keys", {"name": "byok", "provider": provider(aws_moto_endpoint, key_arn, role_arn)}
    )
    assert r.status_code == 400
    assert "onboarding/aws" in r.json()["detail"]

    r = await api.post("/v1/tenants/acme/onboarding/aws", {"key_arn": key_arn})
    assert r.status_code == 200, r.text
    first = r.json()
    ext = first["external_id"]
    assert len(ext) >= 32
    trust = json.dumps(first["trust_policy"])
    assert ext in trust and SERVICE_ROLE in trust and "sts:ExternalId" in trust
    key_policy = json.dumps(first["key_policy"])
    assert key_arn in key_policy or "Resource" in key_policy
    assert "kms:EncryptionContext:tenant" in key_policy and "acme" in key_policy
    assert first["steps"]
    again = (await api.post("/v1/tenants/acme/onboarding/aws", {})).json()
    assert again["external_id"] == ext  # generated once, stored

    # The ExternalId is the service's, never the client's.
    bad = provider(aws_moto_endpoint, key_arn, role_arn) | {"external_id": "guessable"}
    r = await api.post("/v1/tenants/acme/keys", {"name": "byok", "provider": bad})
    assert r.status_code == 400

    # A key that does not exist: creation runs the checks first and refuses with the failing one.
    missing = key_arn.rsplit("/", 1)[0] + "/" + str(uuid.uuid4())
    r = await api.post(
        "/v1/tenants/acme/keys", {"name": "byok", "provider": provider(aws_moto_endpoint, missing, role_arn)}
    )
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["code"] == "provider_validation_failed"
    failed = [c for c in body["checks"] if not c["ok"]]
    assert failed and failed[0]["name"] == "describe_key"
    assert (await api.get("/v1/tenants/acme/keys")).json()["keys"] == []

    r = await api.post(
        "/v1/tenants/acme/keys", {"name": "byok", "provider": provider(aws_moto_endpoint, key_arn, role_arn)}
    )
    assert r.status_code == 201, r.text
    shown = r.json()["provider"]
    assert shown["external_id"] == ext
    assert "secret_access_key" not in shown

    r = await api.post("/v1/tenants/acme/keys/byok/validate")
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["ok"] is True
    assert [c["name"] for c in result["checks"]] == [
        "arn",
        "assume_role",
        "describe_key",
        "round_trip",
        "context_binding",
    ]

    r = await api.post("/v1/tenants/acme/keys/byok/derive", {"id": "vol-1"})
    assert r.status_code == 200, r.text
    events = (await api.get("/v1/audit?action=key.validated")).json()["events"]
    assert events and events[-1]["outcome"] == "success"


async def test_onboarding_needs_the_service_principal_setting(api: Api) -> None:
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    r = await api.post("/v1/tenants/acme/onboarding/aws", {})
    assert r.status_code == 409
    assert r.json()["code"] == "not_configured"
    assert "KMS_AWS_SERVICE_PRINCIPAL_ARN" in r.json()["detail"]


async def test_validate_a_local_key(api: Api) -> None:
    await api.tenant_and_key()
    r = await api.post("/v1/tenants/acme/keys/volumes/validate")
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True
    assert [c["name"] for c in r.json()["checks"]] == ["describe", "round_trip", "context_binding"]


async def test_byok_import_endpoints(
    onboarding_api: Api, aws_moto_endpoint: MotoEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The BYOK endpoints' plumbing: config checked and given the tenant's ExternalId, results
    shaped, audited without key material. moto answers GetParametersForImport/ImportKeyMaterial
    with HTTP 500, so the AWS calls themselves are covered with botocore's Stubber in
    test_aws_kms.py; here they are replaced at the provider module's functions."""
    from datetime import UTC, datetime, timedelta

    import providers.aws_kms as aws_kms

    api = onboarding_api
    assert (await api.post("/v1/tenants", {"id": "acme", "name": "Acme"})).status_code == 201
    key_arn, role_arn = customer_key_and_role(aws_moto_endpoint)
    ext = (await api.post("/v1/tenants/acme/onboarding/aws", {})).json()["external_id"]
    seen: dict[str, object] = {}
    valid_to = datetime.now(UTC) + timedelta(hours=24)

    async def fake_params(config: aws_kms.AwsKmsConfig, algorithm: str, spec: str) -> dict[str, object]:
        seen["params"] = (config.external_id, config.key_id, algorithm, spec)
        return {"public_key": "UFVCTElD", "import_token": "VE9LRU4=", "parameters_valid_to": valid_to}

    async def fake_import(config: aws_kms.AwsKmsConfig, token: bytes, material: bytes, to: object) -> None:
        seen["import"] = (config.external_id, token, material, to)

    monkeypatch.setattr(aws_kms, "get_parameters_for_import", fake_params)
    monkeypatch.setattr(aws_kms, "import_key_material", fake_import)
    prov = provider(aws_moto_endpoint, key_arn, role_arn)
    r = await api.post("/v1/tenants/acme/onboarding/aws/import-parameters", {"provider": prov})
    assert r.status_code == 200, r.text
    assert r.json()["public_key"] == "UFVCTElD"
    assert r.json()["wrapping_algorithm"] == "RSAES_OAEP_SHA_256"
    assert seen["params"] == (ext, key_arn, "RSAES_OAEP_SHA_256", "RSA_4096")

    material = b"wrapped-customer-key-material"
    r = await api.post(
        "/v1/tenants/acme/onboarding/aws/import",
        {
            "provider": prov,
            "import_token": "VE9LRU4=",
            "encrypted_key_material": base64.b64encode(material).decode(),
            "valid_to": valid_to.isoformat(),
        },
    )
    assert r.status_code == 204, r.text
    assert seen["import"] == (ext, b"TOKEN", material, valid_to)
    audit = (await api.get("/v1/audit?tenant=acme")).text
    assert "key_material_imported" in audit
    assert base64.b64encode(material).decode() not in audit

    r = await api.post(
        "/v1/tenants/acme/onboarding/aws/import",
        {"provider": prov, "import_token": "not base64!", "encrypted_key_material": "eA=="},
    )
    assert r.status_code == 400
    r = await api.post("/v1/tenants/acme/onboarding/aws/import-parameters", {"provider": {"type": "local"}})
    assert r.status_code == 400
