"""Maps a provider `type` to its config model. Backends register here; nothing else changes.

Config modules import no SDK at module level (SDKs are imported in `connect()`), so every
config validates even where its SDK extra is not installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from providers.base import ProviderConfig

# type -> "module:ConfigClass"
_CONFIGS: dict[str, str] = {
    "local": "providers.local:LocalProviderConfig",
    "aws-kms": "providers.aws_kms:AwsKmsConfig",
    "gcp-kms": "providers.gcp_kms:GcpKmsConfig",
    "azure-keyvault": "providers.azure_keyvault:AzureKeyVaultConfig",
    "kmip": "providers.kmip:KmipConfig",
    "pkcs11": "providers.pkcs11:Pkcs11Config",
}


class ProviderConfigError(ValueError):
    """A provider config was rejected; the message says which field and why (never values)."""


def _load(kind: str) -> type[ProviderConfig] | None:
    target = _CONFIGS.get(kind)
    if target is None:
        return None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:  # this build does not ship the backend
            return None
        raise
    model: type[ProviderConfig] = getattr(module, class_name)
    return model


def provider_types() -> list[str]:
    """The provider types this build can validate."""
    return sorted(kind for kind in _CONFIGS if _load(kind) is not None)


def parse_provider_config(raw: Mapping[str, Any]) -> ProviderConfig:
    """Validate ``raw`` (``{"type": ..., ...}``) into its provider's config model."""
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProviderConfigError("provider.type is required (one of: " + ", ".join(provider_types()) + ")")
    model = _load(kind)
    if model is None:
        raise ProviderConfigError(
            f"provider.type {kind[:40]!r} is not supported (one of: " + ", ".join(provider_types()) + ")"
        )
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"provider.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ProviderConfigError(problems) from None
