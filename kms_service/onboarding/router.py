from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from kms_service.deps import KeyManager, MetaDep, ServicesDep, actx
from kms_service.routing import StrictJsonRoute
from kms_service.validation import KeyName, StrictModel, TenantId

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/tenants/{tenant}", tags=["onboarding"])

KeyArn = Annotated[
    str, StringConstraints(pattern=r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[0-9a-f-]{36}$")
]


def _base64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be standard base64") from None
    return value


Base64 = Annotated[str, StringConstraints(min_length=1, max_length=16384), AfterValidator(_base64)]


class AwsOnboardingIn(StrictModel):
    key_arn: KeyArn | None = None


class AwsOnboardingOut(BaseModel):
    external_id: str
    service_principal_arn: str
    trust_policy: dict[str, Any]
    key_policy: dict[str, Any]
    steps: list[str]


class CheckOut(BaseModel):
    name: str
    ok: bool
    detail: str


class ValidateOut(BaseModel):
    ok: bool
    checks: list[CheckOut]


@router.post("/onboarding/aws", response_model=AwsOnboardingOut)
async def onboard_aws(
    tenant: TenantId,
    principal: KeyManager,
    services: ServicesDep,
    meta: MetaDep,
    body: Annotated[AwsOnboardingIn | None, Body()] = None,
) -> AwsOnboardingOut:
    """The tenant's ExternalId (created once) and the IAM trust and key policies to paste."""
    out = await services.onboarding.aws(
        actx(principal, meta), tenant=tenant, key_arn=body.key_arn if body else None
    )
    return AwsOnboardingOut(**out)


class ImportParametersIn(StrictModel):
    provider: dict[str, Any]
    wrapping_algorithm: Literal["RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_256"] = "RSAES_OAEP_SHA_256"
    wrapping_key_spec: Literal["RSA_2048", "RSA_3072", "RSA_4096"] = "RSA_4096"


class ImportParametersOut(BaseModel):
    public_key: str
    import_token: str
    parameters_valid_to: datetime
    wrapping_algorithm: str
    wrapping_key_spec: str
    steps: list[str]


class ImportIn(StrictModel):
    provider: dict[str, Any]
    import_token: Base64
    encrypted_key_material: Base64
    valid_to: Annotated[datetime, Field(strict=False)] | None = None


@router.post("/onboarding/aws/import-parameters", response_model=ImportParametersOut)
async def aws_import_parameters(
    tenant: TenantId, body: ImportParametersIn, principal: KeyManager, services: ServicesDep, meta: MetaDep
) -> ImportParametersOut:
    """BYOK step 1: the public key to wrap your key material with, and the import token."""
    out = await services.onboarding.aws_import_parameters(
        actx(principal, meta),
        tenant=tenant,
        provider=body.provider,
        wrapping_algorithm=body.wrapping_algorithm,
        wrapping_key_spec=body.wrapping_key_spec,
    )
    return ImportParametersOut(**out)


@router.post("/onboarding/aws/import", status_code=204)
async def aws_import(
    tenant: TenantId, body: ImportIn, principal: KeyManager, services: ServicesDep, meta: MetaDep
) -> None:
    """BYOK step 2: the key material, wrapped under the public key of step 1."""
    await services.onboarding.aws_import(
        actx(principal, meta),
        tenant=tenant,
        provider=body.provider,
        import_token=base64.b64decode(body.import_token),
        encrypted_key_material=base64.b64decode(body.encrypted_key_material),
        valid_to=body.valid_to,
    )


@router.post("/keys/{key}/validate", response_model=ValidateOut)
async def validate_key(
    tenant: TenantId, key: KeyName, principal: KeyManager, services: ServicesDep, meta: MetaDep
) -> ValidateOut:
    """Run every check of the key's provider and report each, with what to fix."""
    ok, checks = await services.onboarding.validate_key(actx(principal, meta), tenant=tenant, key=key)
    return ValidateOut(ok=ok, checks=[CheckOut(name=c.name, ok=c.ok, detail=c.detail) for c in checks])
