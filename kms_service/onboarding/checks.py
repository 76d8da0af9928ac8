"""Validation of a key's provider: each check reported as {name, ok, detail}.

aws-kms has its own, more precise checks (ARN, AssumeRole with the ExternalId, DescribeKey...);
every other provider gets the generic ones: describe, a wrap/unwrap round trip bound to a context,
and refusal of another context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from providers import KeyProvider, ProviderConfig, ProviderCryptoError, ProviderError


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


PROBE_CONTEXT = {"tenant": "kms-validation", "key": "probe", "version": "0"}


async def generic_checks(config: ProviderConfig, *, local_wrapping_key: bytes) -> list[Check]:
    checks: list[Check] = []
    try:
        provider: KeyProvider = await config.connect(local_wrapping_key=local_wrapping_key)
    except ProviderError as exc:
        return [Check("connect", False, str(exc))]
    try:
        try:
            info = await provider.describe()
            checks.append(Check("describe", True, f"{info.key_ref} (hsm_backed={info.hsm_backed})"))
        except ProviderError as exc:
            return [*checks, Check("describe", False, str(exc))]
        probe = os.urandom(32)
        try:
            blob = await provider.wrap(probe, context=PROBE_CONTEXT)
            ok = await provider.unwrap(blob, context=PROBE_CONTEXT) == probe
            checks.append(
                Check("round_trip", ok, "wrap and unwrap agree" if ok else "unwrap returned other bytes")
            )
        except ProviderError as exc:
            return [*checks, Check("round_trip", False, str(exc))]
        try:
            await provider.unwrap(blob, context={**PROBE_CONTEXT, "tenant": "another"})
            checks.append(Check("context_binding", False, "a blob unwrapped under another context"))
        except ProviderCryptoError:
            checks.append(Check("context_binding", True, "another context is refused"))
        except ProviderError as exc:
            checks.append(Check("context_binding", False, f"unexpected error: {exc}"))
        return checks
    finally:
        await provider.close()


async def validate_config(config: ProviderConfig, *, local_wrapping_key: bytes, tenant: str) -> list[Check]:
    if config.type == "aws-kms":
        from providers import aws_kms  # the backend's own, more precise checks

        assert isinstance(config, aws_kms.AwsKmsConfig)
        results: list[Any] = await aws_kms.validate(config, tenant=tenant)
        return [Check(c.name, c.ok, c.detail) for c in results]
    return await generic_checks(config, local_wrapping_key=local_wrapping_key)
