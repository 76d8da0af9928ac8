"""The `aws-kms` provider: S wrapped by an AWS KMS symmetric key (the service's own, or a customer's).

wrap = ``kms:Encrypt`` and unwrap = ``kms:Decrypt`` of the 32-byte secret S under one KMS key, with
the wrap context as KMS *encryption context*: a blob only decrypts under the same key and context.
Decrypt always names the key (``KeyId``), so a blob of any other key is refused.

Modes
-----
* **Service-hosted key in the service's own KMS** (no ``role_arn``): the service's credentials (the
  default AWS chain: IRSA, instance profile, environment; or static ``access_key_id`` +
  ``secret_access_key``) call KMS directly. ``key_id`` may be a key ARN, an alias ARN,
  ``alias/<name>`` or a bare key id.
* **Customer-hosted key** (``role_arn`` + ``external_id``): the service assumes a role in the
  customer's account with ``sts:AssumeRole`` + ``ExternalId`` and calls KMS with the temporary
  credentials, refreshed before they expire (botocore's refreshable credentials: from 15 minutes
  before expiry, mandatory from 10 minutes before). ``key_id`` must then be a full *key* ARN: an
  alias or bare id is resolved in the caller's account, i.e. could silently name a key of the
  wrong account.
* **HSM-backed**: a key in a CloudHSM custom key store (or imported key material, BYOK) works
  like any other key; :meth:`AwsKmsProvider.describe` reports ``hsm_backed``.

Permissions needed
------------------
Service key (the service's own principal; identity policy or key policy)::

    kms:Encrypt, kms:Decrypt, kms:DescribeKey   on the key ARN
    kms:GenerateDataKey*                          (granted for parity with the onboarding policy;
                                                   this adapter does not call it today)
    kms:GetParametersForImport, kms:ImportKeyMaterial   only to run the BYOK import helpers

Customer key (cross-account):

* the service's principal: ``sts:AssumeRole`` on the customer's role ARN (the call passes
  ``ExternalId``);
* the customer's role trust policy: allow the service principal ``sts:AssumeRole`` with
  ``Condition: {"StringEquals": {"sts:ExternalId": "<external id the service generated>"}}``;
* the customer's key policy: allow the role ``kms:Encrypt``, ``kms:Decrypt``,
  ``kms:GenerateDataKey`` with ``Condition: {"StringEquals": {"kms:EncryptionContext:tenant":
  "<tenant>"}}`` and ``kms:DescribeKey`` (which carries no encryption context, hence a statement of
  its own). :func:`onboarding_policies` renders both documents.

Customer setup
--------------
1. Ask the service for onboarding material (``POST /v1/tenants/{t}/onboarding/aws``): it returns
   the ``external_id``, the role ``trust_policy`` and the ``key_policy`` statements.
2. Create (or pick) a symmetric KMS key: key spec ``SYMMETRIC_DEFAULT``, usage ``ENCRYPT_DECRYPT``,
   in the region the tenant's data lives in. Optionally in a CloudHSM custom key store, or with
   origin ``EXTERNAL`` and your own key material (BYOK: :func:`get_parameters_for_import`, wrap your
   material with the returned public key, :func:`import_key_material`).
3. Create an IAM role (e.g. ``kms-service-access``) whose trust policy is ``trust_policy``.
4. Add the ``key_policy`` statements to the key's key policy (they name the role).
5. Register the key with ``{"type": "aws-kms", "key_id": "<key ARN>", "region": "<region>",
   "role_arn": "<role ARN>", "external_id": "<external id>"}`` and run validation
   (``POST /v1/tenants/{t}/keys/{k}/validate``, :func:`validate`), which reports each step.
6. Revoking: disable the key or remove the key policy statement / the role. Issuance stops within
   the service's unwrapped-KEK cache TTL.

Errors from botocore are translated at this boundary into the ``providers.base`` errors; messages
name the key, the principal and the permission to check, never key material. boto3/botocore are
imported lazily: the config validates without the SDK installed.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypedDict
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator

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

log = logging.getLogger(__name__)

_PARTITION = r"aws[a-z-]*"
_REGION = r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}"
_KEY_UUID = r"(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})"
REGION_RE = re.compile(rf"^{_REGION}$")
KEY_ARN_RE = re.compile(
    rf"^arn:(?P<partition>{_PARTITION}):kms:(?P<region>{_REGION}):(?P<account>\d{{12}}):key/{_KEY_UUID}$"
)
ALIAS_ARN_RE = re.compile(
    rf"^arn:(?P<partition>{_PARTITION}):kms:(?P<region>{_REGION}):(?P<account>\d{{12}}):alias/[A-Za-z0-9/_-]{{1,250}}$"
)
ALIAS_RE = re.compile(r"^alias/[A-Za-z0-9/_-]{1,250}$")
KEY_ID_RE = re.compile(rf"^{_KEY_UUID}$")
ROLE_ARN_RE = re.compile(
    rf"^arn:(?P<partition>{_PARTITION}):iam::(?P<account>\d{{12}}):role/[A-Za-z0-9+=,.@_/-]{{1,512}}$"
)
EXTERNAL_ID_RE = re.compile(r"^[A-Za-z0-9+=,.@:/_-]{2,1224}$")
ACCESS_KEY_ID_RE = re.compile(r"^[A-Z0-9]{16,128}$")

_ROLE_SESSION_NAME = "kms-service"
_ROLE_SESSION_SECONDS = 3600
_BLOB_OF_ANOTHER_KEY = "The ciphertext refers to"
"""KMS answers Decrypt with AccessDeniedException "The ciphertext refers to a customer master key
that does not exist, does not exist in this region, or you are not allowed to access." when the blob
names another or an unknown key: a fault of the blob, not of our permissions (a policy denial reads
"User: ... is not authorized to perform: kms:Decrypt ..."). moto sends that case with no message."""

Clock = Callable[[], datetime]
ClientHook = Callable[[str, Any], None]
"""Called with (service name, client) after each boto3 client is built: lets tests attach a
botocore ``Stubber``. Production passes nothing."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _sdk(name: str) -> Any:
    """Import an SDK module lazily (boto3 ships no type stubs: its objects are ``Any`` here)."""
    return importlib.import_module(name)


class _DropWireDumps(logging.Filter):
    """botocore logs whole request and response bodies at DEBUG (``Plaintext``, assumed-role
    secrets) and the signed headers (session token).

    Installed on the loggers that do, it drops their DEBUG records so that turning on debug
    logging can never write key material or credentials to a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


def _silence_wire_dumps() -> None:
    for name in ("botocore.endpoint", "botocore.parsers", "botocore.auth"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropWireDumps) for f in logger.filters):
            logger.addFilter(_DropWireDumps())


# --------------------------------------------------------------------------------------------------
# Config


def _check_url(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{field} must be an http(s) URL such as https://kms.eu-west-1.amazonaws.com")
    return value


class AwsKmsConfig(ProviderConfig):
    """``{"type": "aws-kms", "key_id": ..., "region": ..., ...}``: one AWS KMS symmetric key."""

    type: Literal["aws-kms"] = "aws-kms"
    region: str
    """AWS region of the key, e.g. ``eu-west-1``."""
    role_arn: str | None = None
    """IAM role in the customer's account to assume (cross-account). None: the service's own credentials."""
    external_id: Annotated[str | None, Field(validate_default=True)] = None
    """The ExternalId the customer's trust policy requires; required with ``role_arn``."""
    key_id: str
    """Key ARN; without ``role_arn`` also an alias ARN, ``alias/<name>`` or a bare key id."""
    endpoint_url: str | None = None
    """KMS endpoint override (VPC endpoint, FIPS endpoint, a test server)."""
    sts_endpoint_url: str | None = None
    """STS endpoint override for the AssumeRole call (default: the regional STS endpoint)."""
    access_key_id: Annotated[SecretStr | None, Field(repr=False)] = None
    """Static credentials of the service principal (write-only). None: the default AWS chain."""
    secret_access_key: Annotated[SecretStr | None, Field(repr=False, validate_default=True)] = None

    secret_fields: ClassVar[frozenset[str]] = frozenset({"access_key_id", "secret_access_key"})

    @field_validator("region")
    @classmethod
    def _region_syntax(cls, value: str) -> str:
        if not REGION_RE.fullmatch(value):
            raise ValueError("region must be an AWS region code such as us-east-1 or eu-west-1")
        return value

    @field_validator("role_arn")
    @classmethod
    def _role_syntax(cls, value: str | None) -> str | None:
        if value is not None and not ROLE_ARN_RE.fullmatch(value):
            raise ValueError(
                "role_arn must be an IAM role ARN, arn:aws:iam::<12-digit account>:role/<name> "
                "(not a user, group, or assumed-role session ARN)"
            )
        return value

    @field_validator("external_id")
    @classmethod
    def _external_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role_arn")
        if value is None:
            if role is not None:
                raise ValueError(
                    "external_id is required with role_arn: the customer's trust policy must require "
                    "it (sts:ExternalId) so no other customer of the service can make it assume the role"
                )
            return None
        if "role_arn" in info.data and role is None:
            raise ValueError("external_id only applies to role_arn (cross-account); set role_arn or drop it")
        if not EXTERNAL_ID_RE.fullmatch(value):
            raise ValueError("external_id must be 2-1224 characters of letters, digits and +=,.@:/_-")
        return value

    @field_validator("key_id")
    @classmethod
    def _key_id(cls, value: str, info: ValidationInfo) -> str:
        region = info.data.get("region")
        cross_account = info.data.get("role_arn") is not None
        key_arn = KEY_ARN_RE.fullmatch(value)
        if cross_account:
            if key_arn is None:
                raise ValueError(
                    "with role_arn (a customer's key in another account) key_id must be the full key ARN, "
                    "arn:aws:kms:<region>:<account>:key/<key id>: an alias or a bare key id is resolved in "
                    "the caller's account, so it could name a different key than the customer's"
                )
        elif key_arn is None and not (
            ALIAS_ARN_RE.fullmatch(value) or ALIAS_RE.fullmatch(value) or KEY_ID_RE.fullmatch(value)
        ):
            raise ValueError(
                "key_id must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<key id>), an alias ARN, "
                "alias/<name>, or a key id"
            )
        arn = key_arn or ALIAS_ARN_RE.fullmatch(value)
        if arn is not None and region is not None and arn["region"] != region:
            raise ValueError(
                "key_id is an ARN in another region than `region`: KMS keys are regional, set region "
                "to the region in the key ARN"
            )
        role = ROLE_ARN_RE.fullmatch(info.data.get("role_arn") or "")
        if key_arn is not None and role is not None and key_arn["partition"] != role["partition"]:
            raise ValueError("key_id and role_arn are in different AWS partitions")
        return value

    @field_validator("endpoint_url", "sts_endpoint_url")
    @classmethod
    def _urls(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _check_url(value, info.field_name or "endpoint_url")

    @field_validator("access_key_id")
    @classmethod
    def _access_key_syntax(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not ACCESS_KEY_ID_RE.fullmatch(value.get_secret_value()):
            raise ValueError(
                "access_key_id must be an AWS access key id (16-128 upper-case letters and digits)"
            )
        return value

    @field_validator("secret_access_key")
    @classmethod
    def _credentials_pair(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if "access_key_id" not in info.data:  # access_key_id itself was invalid: reported there
            return value
        if (value is None) != (info.data["access_key_id"] is None):
            raise ValueError(
                "access_key_id and secret_access_key go together: set both (static credentials) or "
                "neither (the default AWS credential chain)"
            )
        if value is not None and not value.get_secret_value():
            raise ValueError("secret_access_key must not be empty")
        return value

    async def connect(self, *, local_wrapping_key: bytes | None = None) -> AwsKmsProvider:
        return await AwsKmsProvider.create(self)

    def principal(self) -> str:
        """Who calls KMS, as error messages name it."""
        return f"role {self.role_arn}" if self.role_arn else "the service's AWS credentials"


# --------------------------------------------------------------------------------------------------
# Error translation


_NOT_FOUND = frozenset({"NotFoundException"})
_DISABLED = frozenset({"DisabledException", "KMSInvalidStateException", "KeyUnavailableException"})
_DENIED = frozenset({"AccessDeniedException", "AccessDenied"})
_BAD_CREDENTIALS = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "IncompleteSignature",
    }
)
_CRYPTO = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_UNAVAILABLE = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "DependencyTimeoutException",
        "KMSInternalException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return ""
    return str((response.get("Error") or {}).get("Code") or "")


def translate_error(
    exc: BaseException, *, action: str, key_id: str, principal: str, unwrapping: bool = False
) -> ProviderError:
    """Map a boto3/botocore exception of ``action`` (e.g. ``kms:Decrypt``) to a provider error.

    The message is built here from the error *code*: it names the key, the principal and what to
    check, and never includes request parameters (which could hold key material)."""
    if isinstance(exc, ProviderError):
        return exc
    botocore_exc = _sdk("botocore.exceptions")
    if isinstance(exc, botocore_exc.ClientError):
        response: Mapping[str, Any] = exc.response
        error: Mapping[str, Any] = response.get("Error") or {}
        code = str(error.get("Code") or "")
        message = str(error.get("Message") or "")
        status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        return _from_code(
            code, status, message, action=action, key_id=key_id, principal=principal, unwrapping=unwrapping
        )
    if isinstance(exc, botocore_exc.ConnectTimeoutError | botocore_exc.ReadTimeoutError):
        return ProviderUnavailable(f"AWS {action} on {key_id} timed out: the endpoint did not answer in time")
    if isinstance(exc, botocore_exc.ConnectionError | botocore_exc.HTTPClientError):
        return ProviderUnavailable(
            f"AWS {action} on {key_id} failed: the endpoint is unreachable ({type(exc).__name__}); "
            "check network access to the KMS (and STS) endpoint of the region"
        )
    if isinstance(exc, botocore_exc.NoCredentialsError | botocore_exc.PartialCredentialsError):
        return ProviderAccessDenied(
            f"no AWS credentials for {action}: give the service an IAM role (IRSA / instance profile), "
            "environment credentials or static access_key_id + secret_access_key"
        )
    if isinstance(exc, botocore_exc.ParamValidationError):
        if unwrapping:
            return ProviderCryptoError("the wrapped secret is malformed")
        return ProviderError(f"AWS {action} on {key_id} rejected the request parameters")
    return ProviderError(f"AWS {action} on {key_id} failed unexpectedly ({type(exc).__name__})")


def _from_code(
    code: str, status: int, message: str, *, action: str, key_id: str, principal: str, unwrapping: bool
) -> ProviderError:
    if code.isdigit() or not code:  # no parsable error body (e.g. an XML error from a proxy)
        code = ""
    label = f" ({code})" if code else f" (HTTP {status})"
    if code in _NOT_FOUND:
        return ProviderKeyNotFound(
            f"AWS KMS key {key_id} does not exist or is not visible to {principal}: check the key ARN, "
            "the region and the account"
        )
    if code in _DISABLED:
        state = {
            "DisabledException": "is disabled: enable it (kms:EnableKey) to resume",
            "KeyUnavailableException": "is unavailable: check its custom key store is connected",
        }.get(code, "is not usable in its current state (pending deletion or import?): check its key state")
        return ProviderKeyDisabled(f"AWS KMS key {key_id} {state}")
    if code in _CRYPTO or (
        unwrapping
        and (
            code == "ValidationException"
            or (code in _DENIED and (not message or message.startswith(_BLOB_OF_ANOTHER_KEY)))
        )
    ):
        return ProviderCryptoError(
            f"AWS KMS key {key_id} refused to unwrap the secret: it was wrapped under another key or "
            "encryption context, or it is corrupted"
        )
    if code in _DENIED or (not code and status == 403):
        where = (
            "the role's trust policy" if action == "sts:AssumeRole" else "the key policy and the IAM policy"
        )
        return ProviderAccessDenied(
            f"AWS denied {action} on {key_id} for {principal}{label}: check that {where} allow {action}"
        )
    if code in _BAD_CREDENTIALS or (not code and status == 401):
        return ProviderAccessDenied(
            f"AWS rejected the credentials of {principal} for {action}{label}: they are invalid, "
            "expired or for another partition; check the service's AWS credentials"
        )
    if code in _UNAVAILABLE or status == 429 or status >= 500:
        return ProviderUnavailable(f"AWS {action} on {key_id} is unavailable{label}: retry later")
    if code == "InvalidKeyUsageException":
        return ProviderError(
            f"AWS KMS key {key_id} cannot be used for {action}: it must be a symmetric "
            "(SYMMETRIC_DEFAULT) key with usage ENCRYPT_DECRYPT"
        )
    return ProviderError(f"AWS {action} on {key_id} failed{label}")


# --------------------------------------------------------------------------------------------------
# Clients and credentials


def _client_config(config: AwsKmsConfig) -> Any:
    botocore_config = _sdk("botocore.config")
    # Two attempts in all: botocore's `max_attempts` counts *retries*, `total_max_attempts` attempts.
    # A black-holed endpoint thus fails after about 2 x timeout_seconds (+ a backoff below 1 s).
    return botocore_config.Config(
        connect_timeout=config.timeout_seconds,
        read_timeout=config.timeout_seconds,
        retries={"total_max_attempts": 2, "mode": "standard"},
    )


def _base_session(config: AwsKmsConfig) -> Any:
    """The service principal's session: static credentials, or the default chain."""
    boto3_session = _sdk("boto3.session")
    if config.access_key_id is not None and config.secret_access_key is not None:
        return boto3_session.Session(
            aws_access_key_id=config.access_key_id.get_secret_value(),
            aws_secret_access_key=config.secret_access_key.get_secret_value(),
            region_name=config.region,
        )
    return boto3_session.Session(region_name=config.region)


def assume_role_fetcher(sts: Any, config: AwsKmsConfig) -> Callable[[], dict[str, str]]:
    """A blocking function that assumes ``config.role_arn`` with the ExternalId and returns
    botocore credential metadata. Failures are raised as provider errors."""
    role_arn = config.role_arn
    if role_arn is None:
        raise ValueError("assume_role_fetcher needs a config with role_arn")

    def fetch() -> dict[str, str]:
        try:
            response = sts.assume_role(
                RoleArn=role_arn,
                RoleSessionName=_ROLE_SESSION_NAME,
                ExternalId=config.external_id,
                DurationSeconds=_ROLE_SESSION_SECONDS,
            )
        except Exception as exc:
            error = translate_error(
                exc, action="sts:AssumeRole", key_id=role_arn, principal="the service's AWS credentials"
            )
            if _error_code(exc) in _DENIED:
                error = ProviderAccessDenied(
                    f"AWS STS refused sts:AssumeRole on {role_arn} with the configured external id: check "
                    "that the role's trust policy allows the service's principal with "
                    f'"StringEquals": {{"sts:ExternalId": "{config.external_id}"}}, and that the service\'s '
                    "own IAM policy allows sts:AssumeRole on the role"
                )
            raise error from None
        credentials = response["Credentials"]
        expiration = credentials["Expiration"]
        return {
            "access_key": credentials["AccessKeyId"],
            "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"],
            "expiry_time": expiration.isoformat() if isinstance(expiration, datetime) else str(expiration),
        }

    return fetch


def refreshable_credentials(fetch: Callable[[], dict[str, str]], *, clock: Clock = _utc_now) -> Any:
    """Credentials fetched on first use and refreshed before expiry (botocore: attempted from 15
    minutes before expiry while the old ones stay in use, mandatory from 10 minutes before).
    ``clock`` must return an aware datetime; tests inject one."""
    credentials = _sdk("botocore.credentials")
    return credentials.DeferredRefreshableCredentials(
        refresh_using=fetch, method="sts-assume-role", time_fetcher=clock
    )


class _FixedCredentials:
    """A botocore credential provider (duck-typed) that always yields the same credentials."""

    METHOD = "kms-service-assume-role"
    CANONICAL_NAME = "kms-service-assume-role"

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials

    def load(self) -> Any:
        return self._credentials


def _session_with(credentials: Any, region: str) -> Any:
    """A boto3 session whose only credential source is ``credentials``."""
    botocore_session = _sdk("botocore.session")
    botocore_credentials = _sdk("botocore.credentials")
    boto3_session = _sdk("boto3.session")
    core = botocore_session.Session()
    core.register_component(
        "credential_provider", botocore_credentials.CredentialResolver([_FixedCredentials(credentials)])
    )
    return boto3_session.Session(botocore_session=core, region_name=region)


@dataclass(slots=True)
class _Clients:
    kms: Any
    sts: Any | None
    fetch: Callable[[], dict[str, str]] | None


def _build_clients(config: AwsKmsConfig, *, clock: Clock, on_client: ClientHook | None) -> _Clients:
    _silence_wire_dumps()
    client_config = _client_config(config)
    base = _base_session(config)
    if config.role_arn is None:
        kms = base.client("kms", endpoint_url=config.endpoint_url, config=client_config)
        if on_client is not None:
            on_client("kms", kms)
        return _Clients(kms=kms, sts=None, fetch=None)
    sts = base.client("sts", endpoint_url=config.sts_endpoint_url, config=client_config)
    if on_client is not None:
        on_client("sts", sts)
    fetch = assume_role_fetcher(sts, config)
    session = _session_with(refreshable_credentials(fetch, clock=clock), config.region)
    kms = session.client("kms", endpoint_url=config.endpoint_url, config=client_config)
    if on_client is not None:
        on_client("kms", kms)
    return _Clients(kms=kms, sts=sts, fetch=fetch)


# --------------------------------------------------------------------------------------------------
# The provider


class ImportParameters(TypedDict):
    public_key: str
    """Base64 of the DER (SubjectPublicKeyInfo) RSA wrapping key."""
    import_token: str
    """Base64 of the opaque import token to pass back to :func:`import_key_material`."""
    parameters_valid_to: datetime


class AwsKmsProvider(KeyProvider):
    """One AWS KMS key, connected. boto3 clients are thread-safe; every call runs in a thread."""

    type: ClassVar[str] = "aws-kms"

    def __init__(self, config: AwsKmsConfig, clients: _Clients) -> None:
        self._config = config
        self._clients = clients
        self._kms = clients.kms
        self._closed = False

    @classmethod
    async def create(
        cls, config: AwsKmsConfig, *, clock: Clock = _utc_now, on_client: ClientHook | None = None
    ) -> AwsKmsProvider:
        """Build the clients (no network call: assumed-role credentials are fetched on first use)."""
        try:
            clients = await asyncio.to_thread(_build_clients, config, clock=clock, on_client=on_client)
        except ModuleNotFoundError as exc:
            raise ProviderError("the aws-kms provider needs boto3: install kms-service[aws]") from exc
        except Exception as exc:
            raise translate_error(
                exc, action="client setup", key_id=config.key_id, principal=config.principal()
            ) from None
        return cls(config, clients)

    def __repr__(self) -> str:
        return f"AwsKmsProvider(key_id={self._config.key_id!r}, region={self._config.region!r})"

    async def _call(self, action: str, operation: str, *, unwrapping: bool = False, **params: Any) -> Any:
        method = getattr(self._kms, operation)
        try:
            return await asyncio.to_thread(method, **params)
        except Exception as exc:
            error = translate_error(
                exc,
                action=action,
                key_id=self._config.key_id,
                principal=self._config.principal(),
                unwrapping=unwrapping,
            )
            log.debug("aws-kms %s on %s failed: %s", action, self._config.key_id, type(error).__name__)
            raise error from None

    async def wrap(self, secret: bytes, *, context: WrapContext) -> bytes:
        response = await self._call(
            "kms:Encrypt",
            "encrypt",
            KeyId=self._config.key_id,
            Plaintext=secret,
            EncryptionContext=dict(context),
        )
        blob: bytes = response["CiphertextBlob"]
        return blob

    async def unwrap(self, blob: bytes, *, context: WrapContext) -> bytes:
        if not blob:
            raise ProviderCryptoError("the wrapped secret is empty")
        response = await self._call(
            "kms:Decrypt",
            "decrypt",
            unwrapping=True,
            KeyId=self._config.key_id,
            CiphertextBlob=blob,
            EncryptionContext=dict(context),
        )
        secret: bytes = response["Plaintext"]
        return secret

    async def describe_key(self) -> Mapping[str, Any]:
        """The raw ``KeyMetadata`` of DescribeKey."""
        response = await self._call("kms:DescribeKey", "describe_key", KeyId=self._config.key_id)
        metadata: Mapping[str, Any] = response["KeyMetadata"]
        return metadata

    async def describe(self) -> ProviderInfo:
        metadata = await self.describe_key()
        store = metadata.get("CustomKeyStoreId")
        return ProviderInfo(
            type=self.type,
            key_ref=str(metadata.get("Arn") or self._config.key_id),
            hsm_backed=bool(store) or metadata.get("Origin") == "AWS_CLOUDHSM",
            details={
                "key_state": metadata.get("KeyState"),
                "key_spec": metadata.get("KeySpec") or metadata.get("CustomerMasterKeySpec"),
                "origin": metadata.get("Origin"),
                "custom_key_store_id": store,
            },
        )

    async def health(self) -> ProviderHealth:
        start = time.perf_counter()
        try:
            metadata = await self.describe_key()
        except ProviderError as exc:
            return ProviderHealth(ok=False, latency_ms=(time.perf_counter() - start) * 1000, detail=str(exc))
        except Exception as exc:  # the probe never raises
            return ProviderHealth(
                ok=False, latency_ms=(time.perf_counter() - start) * 1000, detail=type(exc).__name__
            )
        latency = (time.perf_counter() - start) * 1000
        state = metadata.get("KeyState")
        if state != "Enabled":
            return ProviderHealth(ok=False, latency_ms=latency, detail=f"key state is {state}")
        return ProviderHealth(ok=True, latency_ms=latency)

    async def get_parameters_for_import(
        self, *, wrapping_algorithm: str = "RSAES_OAEP_SHA_256", wrapping_key_spec: str = "RSA_4096"
    ) -> ImportParameters:
        response = await self._call(
            "kms:GetParametersForImport",
            "get_parameters_for_import",
            KeyId=self._config.key_id,
            WrappingAlgorithm=wrapping_algorithm,
            WrappingKeySpec=wrapping_key_spec,
        )
        return ImportParameters(
            public_key=base64.b64encode(response["PublicKey"]).decode("ascii"),
            import_token=base64.b64encode(response["ImportToken"]).decode("ascii"),
            parameters_valid_to=response["ParametersValidTo"],
        )

    async def import_key_material(
        self, *, import_token: bytes, encrypted_key_material: bytes, valid_to: datetime | None = None
    ) -> None:
        expiry: dict[str, Any] = (
            {"ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": valid_to}
            if valid_to is not None
            else {"ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"}
        )
        await self._call(
            "kms:ImportKeyMaterial",
            "import_key_material",
            KeyId=self._config.key_id,
            ImportToken=import_token,
            EncryptedKeyMaterial=encrypted_key_material,
            **expiry,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in (self._kms, self._clients.sts):
            if client is not None:
                await asyncio.to_thread(client.close)


# --------------------------------------------------------------------------------------------------
# Onboarding, validation and BYOK helpers (used by the service's onboarding endpoints)


def onboarding_policies(
    *,
    service_principal_arn: str,
    external_id: str,
    key_arn: str | None,
    tenant: str,
    role_arn: str | None = None,
    role_name: str = "kms-service-access",
) -> dict[str, Any]:
    """The two documents a customer installs so the service can use their key.

    ``trust_policy``: the trust policy of the customer's role, letting ``service_principal_arn``
    assume it only with ``external_id``. ``key_policy``: statements to add to the key's policy,
    allowing that role Encrypt/Decrypt/GenerateDataKey on the key only for this ``tenant``'s
    encryption context, and DescribeKey (which carries no encryption context, so it cannot share
    the condition). The role is ``role_arn`` if known, else ``role_name`` in the key's account
    (``ACCOUNT_ID`` as a placeholder when ``key_arn`` is not known yet; the key's own policy may
    then use ``"Resource": "*"``, meaning "this key")."""
    key = KEY_ARN_RE.fullmatch(key_arn or "")
    if key_arn is not None and key is None:
        raise ValueError("key_arn must be a full KMS key ARN")
    if role_arn is None:
        partition = key["partition"] if key else "aws"
        account = key["account"] if key else "ACCOUNT_ID"
        role_arn = f"arn:{partition}:iam::{account}:role/{role_name}"
    resource = key_arn if key_arn is not None else "*"
    trust_policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AllowKmsServiceToAssumeThisRole",
                "Effect": "Allow",
                "Principal": {"AWS": service_principal_arn},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"sts:ExternalId": external_id}},
            }
        ],
    }
    key_policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AllowKmsServiceWrapUnwrapForTenant",
                "Effect": "Allow",
                "Principal": {"AWS": role_arn},
                "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey"],
                "Resource": resource,
                "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": tenant}},
            },
            {
                "Sid": "AllowKmsServiceDescribeKey",
                "Effect": "Allow",
                "Principal": {"AWS": role_arn},
                "Action": "kms:DescribeKey",
                "Resource": resource,
            },
        ],
    }
    return {"trust_policy": trust_policy, "key_policy": key_policy}


@dataclass(frozen=True, slots=True)
class Check:
    """One step of :func:`validate`."""

    name: str
    ok: bool
    detail: str


VALIDATION_CHECKS = ("arn", "assume_role", "describe_key", "round_trip", "context_binding")


def _config_problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors()
    )


async def validate(
    config: AwsKmsConfig | Mapping[str, Any],
    *,
    tenant: str | None = None,
    clock: Clock = _utc_now,
    on_client: ClientHook | None = None,
) -> list[Check]:
    """Check a customer's key end to end, in order: ``arn``, ``assume_role``, ``describe_key``,
    ``round_trip``, ``context_binding``. Stops at the first failure; the later checks are reported
    as not run. Each detail says what is wrong and how to fix it.

    ``config`` may be raw (as submitted): a malformed one fails the ``arn`` check with the reasons.
    ``tenant``, when given, is the encryption context ``tenant`` of the probe, so a key policy
    conditioned on it (see :func:`onboarding_policies`) is exercised as the service will use it."""
    checks: list[Check] = []

    def not_run(failed: str) -> list[Check]:
        done = {c.name for c in checks}
        return [
            Check(name, False, f"not run: the {failed} check failed")
            for name in VALIDATION_CHECKS
            if name not in done
        ]

    # 1. arn
    if not isinstance(config, AwsKmsConfig):
        try:
            config = AwsKmsConfig.model_validate(dict(config))
        except ValidationError as exc:
            checks.append(Check("arn", False, f"invalid configuration: {_config_problems(exc)}"))
            return checks + not_run("arn")
    key_arn = KEY_ARN_RE.fullmatch(config.key_id)
    if key_arn is not None:
        arn_detail = f"key {config.key_id} in region {key_arn['region']}, account {key_arn['account']}"
        role = ROLE_ARN_RE.fullmatch(config.role_arn or "")
        if role is not None and role["account"] != key_arn["account"]:
            arn_detail += (
                f"; the role is in account {role['account']}: the key policy must allow that account's role"
            )
    else:
        arn_detail = f"{config.key_id} resolves in the service's own account, region {config.region}"
    checks.append(Check("arn", True, arn_detail))

    try:
        provider = await AwsKmsProvider.create(config, clock=clock, on_client=on_client)
    except ProviderError as exc:
        checks.append(Check("assume_role", False, str(exc)))
        return checks + not_run("assume_role")
    try:
        # 2. assume_role
        fetch = provider._clients.fetch
        if fetch is None:
            checks.append(
                Check("assume_role", True, "skipped: no role_arn, the service's own credentials are used")
            )
        else:
            try:
                await asyncio.to_thread(fetch)
            except ProviderError as exc:
                checks.append(Check("assume_role", False, str(exc)))
                return checks + not_run("assume_role")
            checks.append(Check("assume_role", True, f"assumed {config.role_arn} with the external id"))

        # 3. describe_key
        try:
            metadata = await provider.describe_key()
        except ProviderError as exc:
            checks.append(Check("describe_key", False, str(exc)))
            return checks + not_run("describe_key")
        problem = _key_metadata_problem(metadata, config.key_id)
        if problem:
            checks.append(Check("describe_key", False, problem))
            return checks + not_run("describe_key")
        checks.append(
            Check(
                "describe_key",
                True,
                f"{metadata.get('Arn')}: Enabled, SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT, "
                f"origin {metadata.get('Origin')}",
            )
        )

        # 4. round_trip
        context = {"tenant": tenant or "kms-service-validation", "key": "validation", "version": "0"}
        probe = os.urandom(32)
        try:
            blob = await provider.wrap(probe, context=context)
            ok = await provider.unwrap(blob, context=context) == probe
        except ProviderError as exc:
            checks.append(Check("round_trip", False, str(exc)))
            return checks + not_run("round_trip")
        if not ok:
            checks.append(Check("round_trip", False, "kms:Decrypt returned other bytes than were encrypted"))
            return checks + not_run("round_trip")
        checks.append(
            Check("round_trip", True, "kms:Encrypt and kms:Decrypt with encryption context succeeded")
        )

        # 5. context_binding
        wrong = {**context, "key": "validation-other"}
        try:
            await provider.unwrap(blob, context=wrong)
        except ProviderCryptoError:
            checks.append(
                Check("context_binding", True, "kms:Decrypt with another encryption context was refused")
            )
        except ProviderError as exc:
            checks.append(
                Check(
                    "context_binding",
                    False,
                    "kms:Decrypt with another encryption context was refused for the wrong reason "
                    f"({exc.code}): {exc}. Only the context may condition Decrypt on this key",
                )
            )
        else:
            checks.append(
                Check(
                    "context_binding",
                    False,
                    "kms:Decrypt succeeded with another encryption context: the endpoint does not bind "
                    "ciphertexts to their context; do not use it",
                )
            )
        return checks
    finally:
        await provider.close()


def _key_metadata_problem(metadata: Mapping[str, Any], key_id: str) -> str:
    state = metadata.get("KeyState")
    if state != "Enabled":
        fix = {
            "Disabled": "enable it (aws kms enable-key --key-id KEY)",
            "PendingDeletion": "cancel its deletion (aws kms cancel-key-deletion) and enable it",
            "PendingImport": "import its key material (BYOK) first",
            "Unavailable": "reconnect its custom key store",
        }.get(str(state), "make it Enabled")
        return f"key {key_id} is {state}, not Enabled: {fix}"
    spec = metadata.get("KeySpec") or metadata.get("CustomerMasterKeySpec")
    if spec != "SYMMETRIC_DEFAULT":
        return (
            f"key {key_id} has key spec {spec}: the service needs a symmetric encryption key "
            "(SYMMETRIC_DEFAULT); create a new key with that spec"
        )
    usage = metadata.get("KeyUsage")
    if usage != "ENCRYPT_DECRYPT":
        return f"key {key_id} has key usage {usage}: create a key with usage ENCRYPT_DECRYPT"
    return ""


async def get_parameters_for_import(
    config: AwsKmsConfig,
    wrapping_algorithm: str = "RSAES_OAEP_SHA_256",
    wrapping_key_spec: str = "RSA_4096",
    *,
    on_client: ClientHook | None = None,
) -> ImportParameters:
    """BYOK step 1 (key created with origin EXTERNAL): the RSA public key to wrap the customer's
    key material with, and the import token. Both expire at ``parameters_valid_to`` (24 h)."""
    provider = await AwsKmsProvider.create(config, on_client=on_client)
    try:
        return await provider.get_parameters_for_import(
            wrapping_algorithm=wrapping_algorithm, wrapping_key_spec=wrapping_key_spec
        )
    finally:
        await provider.close()


async def import_key_material(
    config: AwsKmsConfig,
    import_token: bytes,
    encrypted_key_material: bytes,
    valid_to: datetime | None,
    *,
    on_client: ClientHook | None = None,
) -> None:
    """BYOK step 2: import the wrapped key material. ``valid_to`` None: the material never expires."""
    provider = await AwsKmsProvider.create(config, on_client=on_client)
    try:
        await provider.import_key_material(
            import_token=import_token, encrypted_key_material=encrypted_key_material, valid_to=valid_to
        )
    finally:
        await provider.close()
