"""Maps a provider `type` to its config model. Backends register here; nothing else changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from providers.base import ProviderConfig
from providers.local import LocalProviderConfig

_CONFIGS: dict[str, type[ProviderConfig]] = {
    "local": LocalProviderConfig,
}


class ProviderConfigError(ValueError):
    """A provider config was rejected; the message says which field and why (never values)."""


def provider_types() -> list[str]:
    return sorted(_CONFIGS)


def parse_provider_config(raw: Mapping[str, Any]) -> ProviderConfig:
    """Validate ``raw`` (``{"type": ..., ...}``) into its provider's config model."""
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProviderConfigError("provider.type is required (one of: " + ", ".join(provider_types()) + ")")
    model = _CONFIGS.get(kind)
    if model is None:
        raise ProviderConfigError(
            f"provider.type {kind!r} is not supported (one of: " + ", ".join(provider_types()) + ")"
        )
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"provider.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ProviderConfigError(problems) from None
