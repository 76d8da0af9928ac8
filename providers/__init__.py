"""Key providers: adapters that protect a version's 32-byte KEK secret S.

Importable without kms_service; each backend module depends only on `cryptography` and its SDK.
"""

from providers.base import (
    KeyProvider,
    ProviderAccessDenied,
    ProviderConfig,
    ProviderCryptoError,
    ProviderError,
    ProviderHealth,
    ProviderInfo,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderUnavailable,
    WrapContext,
)
from providers.registry import ProviderConfigError, parse_provider_config, provider_types

__all__ = [
    "KeyProvider",
    "ProviderAccessDenied",
    "ProviderConfig",
    "ProviderConfigError",
    "ProviderCryptoError",
    "ProviderError",
    "ProviderHealth",
    "ProviderInfo",
    "ProviderKeyDisabled",
    "ProviderKeyNotFound",
    "ProviderUnavailable",
    "WrapContext",
    "parse_provider_config",
    "provider_types",
]
