"""AWS onboarding: the tenant's ExternalId (generated once, unguessable, stored) and the policy
documents the customer pastes; validation of any key's provider."""

from __future__ import annotations

import secrets
from dataclasses import asdict
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kms_service.audit.chain import EventDraft
from kms_service.audit.writer import Change, Clock, append_events, utcnow
from kms_service.db.engine import Database
from kms_service.db.models import Tenant
from kms_service.errors import InvalidRequest, NotConfigured, NotFound, UnsupportedProvider
from kms_service.keys.material import KeyMaterial, provider_error
from kms_service.keys.service import KeyService
from kms_service.master import Installation
from kms_service.onboarding.checks import Check, validate_config
from kms_service.request import Actx
from kms_service.settings import Settings
from providers import ProviderError

BYOK_STEPS = [
    "Create a KMS key with origin EXTERNAL (no key material) in your account.",
    "Wrap your 256-bit key material with public_key using the wrapping_algorithm (e.g. openssl pkeyutl "
    "-encrypt -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256).",
    "POST the wrapped material and import_token to .../onboarding/aws/import before parameters_valid_to.",
    "Then create the tenant key with that key's ARN; the service validates it first.",
]

AWS_STEPS = [
    "Create (or choose) a symmetric KMS key (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT) in your account.",
    "Create an IAM role with the trust_policy below: it lets this service assume the role, only with "
    "your ExternalId.",
    "Add the key_policy statement to the key's policy (replace ROLE_ARN with the role's ARN): the role "
    "may use this key only, and only for this tenant's encryption context.",
    "Create the tenant key with provider {type: aws-kms, key_id: <full key ARN>, region, role_arn}; the "
    "service runs every check first and tells you which one fails and why.",
]


def new_external_id() -> str:
    return "kms-" + secrets.token_urlsafe(24)


class OnboardingService:
    def __init__(
        self,
        db: Database,
        installation: Installation,
        settings: Settings,
        keys: KeyService,
        material: KeyMaterial,
        *,
        clock: Clock = utcnow,
    ) -> None:
        self._db = db
        self._inst = installation
        self._settings = settings
        self._keys = keys
        self._material = material
        self._clock = clock

    async def aws(self, ctx: Actx, *, tenant: str, key_arn: str | None) -> dict[str, Any]:
        principal = self._settings.aws_service_principal_arn
        if not principal:
            raise NotConfigured(
                "set KMS_AWS_SERVICE_PRINCIPAL_ARN to the IAM role or user this service runs as"
            )
        async with self._db.write() as session:
            row = await session.get(Tenant, tenant, with_for_update=True)
            if row is None:
                raise NotFound(f"tenant {tenant!r} not found")
            if row.aws_external_id is None:
                row.aws_external_id = new_external_id()
                await session.flush()
                await append_events(
                    session,
                    [
                        EventDraft(
                            action="tenant.onboarding.aws_external_id_created",
                            actor=ctx.actor,
                            tenant=tenant,
                            request_id=ctx.meta.request_id,
                            source=ctx.meta.source,
                            details={},
                        )
                    ],
                    audit_key=self._inst.audit_key.reveal(),
                    clock=self._clock,
                    change=Change(kind="tenant", tenant=tenant),
                )
            external_id = row.aws_external_id
        from providers.aws_kms import onboarding_policies

        policies = onboarding_policies(
            service_principal_arn=principal, external_id=external_id, key_arn=key_arn, tenant=tenant
        )
        return {
            "external_id": external_id,
            "service_principal_arn": principal,
            "trust_policy": policies["trust_policy"],
            "key_policy": policies["key_policy"],
            "steps": AWS_STEPS,
        }

    async def _aws_config(self, tenant: str, provider: dict[str, Any]) -> Any:
        from providers.aws_kms import AwsKmsConfig

        if provider.get("type") != "aws-kms":
            raise InvalidRequest("key material import is for provider type aws-kms")
        raw = await self._keys.with_external_id(tenant, provider)
        try:
            return AwsKmsConfig.model_validate(raw)
        except ValidationError as exc:
            raise UnsupportedProvider(
                "; ".join(f"provider.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            ) from None

    async def _audit(self, ctx: Actx, action: str, tenant: str, details: dict[str, Any]) -> None:
        async with self._db.write() as session:
            await append_events(
                session,
                [
                    EventDraft(
                        action=action,
                        actor=ctx.actor,
                        tenant=tenant,
                        request_id=ctx.meta.request_id,
                        source=ctx.meta.source,
                        details=details,
                    )
                ],
                audit_key=self._inst.audit_key.reveal(),
                clock=self._clock,
            )

    async def aws_import_parameters(
        self,
        ctx: Actx,
        *,
        tenant: str,
        provider: dict[str, Any],
        wrapping_algorithm: str,
        wrapping_key_spec: str,
    ) -> dict[str, Any]:
        """BYOK step 1: the RSA public key and import token for the customer's EXTERNAL-origin key."""
        from providers import aws_kms

        config = await self._aws_config(tenant, provider)
        try:
            params = await aws_kms.get_parameters_for_import(config, wrapping_algorithm, wrapping_key_spec)
        except ProviderError as exc:
            raise provider_error(exc) from None
        await self._audit(
            ctx,
            "tenant.byok.import_parameters",
            tenant,
            {
                "key_id": config.key_id,
                "wrapping_algorithm": wrapping_algorithm,
                "wrapping_key_spec": wrapping_key_spec,
            },
        )
        return {
            **params,
            "wrapping_algorithm": wrapping_algorithm,
            "wrapping_key_spec": wrapping_key_spec,
            "steps": BYOK_STEPS,
        }

    async def aws_import(
        self,
        ctx: Actx,
        *,
        tenant: str,
        provider: dict[str, Any],
        import_token: bytes,
        encrypted_key_material: bytes,
        valid_to: datetime | None,
    ) -> None:
        """BYOK step 2: hand the wrapped key material to AWS KMS (it never passes through us in clear)."""
        from providers import aws_kms

        config = await self._aws_config(tenant, provider)
        try:
            await aws_kms.import_key_material(config, import_token, encrypted_key_material, valid_to)
        except ProviderError as exc:
            raise provider_error(exc) from None
        await self._audit(
            ctx,
            "tenant.byok.key_material_imported",
            tenant,
            {"key_id": config.key_id, "valid_to": valid_to.isoformat() if valid_to else None},
        )

    async def validate_key(self, ctx: Actx, *, tenant: str, key: str) -> tuple[bool, list[Check]]:
        meta = await self._keys.get(tenant, key)
        config = self._material.config_of(meta.provider_config, meta.provider_secrets, tenant=tenant, key=key)
        checks = await validate_config(
            config, local_wrapping_key=self._inst.local_wrapping_key.reveal(), tenant=tenant
        )
        ok = all(c.ok for c in checks)
        async with self._db.write() as session:
            await append_events(
                session,
                [
                    EventDraft(
                        action="key.validated",
                        actor=ctx.actor,
                        tenant=tenant,
                        key=key,
                        outcome="success" if ok else "failure",
                        request_id=ctx.meta.request_id,
                        source=ctx.meta.source,
                        details={"checks": [asdict(c) | {"detail": c.detail[:300]} for c in checks]},
                    )
                ],
                audit_key=self._inst.audit_key.reveal(),
                clock=self._clock,
            )
        return ok, checks
