"""Python SDK for kms-service: :class:`KmsClient` (sync) and :class:`AsyncKmsClient` (asyncio).

>>> from kms_client import KmsClient, DecryptionFailed
>>> with KmsClient("http://127.0.0.1:8400", token_file=".kms/admin-token") as kms:
...     ct = kms.encrypt("acme", "volumes", b"db-password", context={"app": "billing"})
...     kms.decrypt("acme", "volumes", ct.ciphertext, context={"app": "billing"}).plaintext
b'db-password'

Every method maps to one call of the HTTP API (DESIGN §5); problem+json errors are raised as
:class:`KmsError` subclasses carrying ``code``, ``status`` and ``detail``.
"""

from kms_client._api import UNSET, Unset
from kms_client._core import RetryPolicy, TokenSource, ssl_context
from kms_client.aio import AsyncKmsClient
from kms_client.client import KmsClient
from kms_client.errors import (
    AlreadyExists,
    Conflict,
    DecryptionFailed,
    Forbidden,
    InvalidRequest,
    InvalidStateTransition,
    KeyDisabled,
    KeyVersionBelowMinimum,
    KeyVersionDisabled,
    KmsError,
    KmsTransportError,
    NoEnabledVersion,
    NotConfigured,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    ProviderValidationFailed,
    RateLimited,
    ServerError,
    TokenFileError,
    Unauthenticated,
    Unavailable,
    UnexpectedResponse,
    WouldCutOffIds,
)
from kms_client.models import (
    AuditPage,
    AuditVerification,
    CiphertextRequest,
    CreatedToken,
    DataKey,
    DatakeyRequest,
    Decrypted,
    DerivedKey,
    DeriveRequest,
    Encrypted,
    EncryptRequest,
    Health,
    Identity,
    Key,
    KeyVersion,
    Tenant,
    TokenInfo,
)

__version__ = "0.1.0"

__all__ = [
    "UNSET",
    "AlreadyExists",
    "AsyncKmsClient",
    "AuditPage",
    "AuditVerification",
    "CiphertextRequest",
    "Conflict",
    "CreatedToken",
    "DataKey",
    "DatakeyRequest",
    "Decrypted",
    "DecryptionFailed",
    "DeriveRequest",
    "DerivedKey",
    "EncryptRequest",
    "Encrypted",
    "Forbidden",
    "Health",
    "Identity",
    "InvalidRequest",
    "InvalidStateTransition",
    "Key",
    "KeyDisabled",
    "KeyVersion",
    "KeyVersionBelowMinimum",
    "KeyVersionDisabled",
    "KmsClient",
    "KmsError",
    "KmsTransportError",
    "NoEnabledVersion",
    "NotConfigured",
    "NotFound",
    "ProviderError",
    "ProviderUnavailable",
    "ProviderValidationFailed",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "Tenant",
    "TokenFileError",
    "TokenInfo",
    "TokenSource",
    "Unauthenticated",
    "Unavailable",
    "UnexpectedResponse",
    "Unset",
    "WouldCutOffIds",
    "ssl_context",
]
