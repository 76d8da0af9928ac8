"""Typed exceptions for kms-service errors.

The service answers every failure with RFC 9457 ``application/problem+json`` carrying a stable
machine ``code``. :func:`error_from_problem` maps that code (or, for codes this client does not
know yet, the HTTP status) to one exception class per code family, all subclasses of
:class:`KmsError`::

    try:
        client.decrypt("acme", "volumes", ciphertext, context={"app": "billing"})
    except DecryptionFailed:
        ...  # wrong context, tampered ciphertext, wrong key: all look alike on purpose
    except KmsError as exc:
        print(exc.status, exc.code, exc.detail)
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "AlreadyExists",
    "Conflict",
    "DecryptionFailed",
    "Forbidden",
    "InvalidRequest",
    "InvalidStateTransition",
    "KeyDisabled",
    "KeyVersionBelowMinimum",
    "KeyVersionDisabled",
    "KmsError",
    "KmsTransportError",
    "NoEnabledVersion",
    "NotConfigured",
    "NotFound",
    "ProviderError",
    "ProviderUnavailable",
    "ProviderValidationFailed",
    "RateLimited",
    "ServerError",
    "TokenFileError",
    "Unauthenticated",
    "Unavailable",
    "UnexpectedResponse",
    "WouldCutOffIds",
    "error_from_problem",
    "parse_retry_after",
]


class KmsError(Exception):
    """Any failure of a kms-service call.

    ``status`` is the HTTP status (0 when no HTTP answer was received), ``code`` the service's
    stable machine code, ``detail`` the human explanation, ``problem`` the whole problem document
    and ``retry_after`` the server's ``Retry-After`` in seconds, when it sent one.
    """

    default_code = "error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int = 0,
        problem: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.detail = detail
        self.code = code or self.default_code
        self.status = status
        self.problem: dict[str, Any] = dict(problem or {})
        self.retry_after = retry_after
        super().__init__(f"{self.status} {self.code}: {detail}" if status else f"{self.code}: {detail}")

    @property
    def title(self) -> str | None:
        title = self.problem.get("title")
        return title if isinstance(title, str) else None


# -- answered by the service -----------------------------------------------------------------


class InvalidRequest(KmsError):
    """The request was rejected as malformed or out of bounds (400, 405, 413, 415). Never retried."""

    default_code = "invalid_request"


class DecryptionFailed(KmsError):
    """``decryption_failed``: bad tag, wrong context, wrong key or unknown version; opaque on purpose."""

    default_code = "decryption_failed"


class Unauthenticated(KmsError):
    """``unauthenticated`` (401): missing, unknown, expired or revoked bearer token."""

    default_code = "unauthenticated"


class Forbidden(KmsError):
    """``forbidden`` (403): the token's role may not do this."""

    default_code = "forbidden"


class NotFound(KmsError):
    """``not_found`` (404): it does not exist, or the token may not see it (indistinguishable)."""

    default_code = "not_found"


class Conflict(KmsError):
    """409: the request is valid but the resource's state forbids it."""

    default_code = "conflict"


class AlreadyExists(Conflict):
    default_code = "already_exists"


class KeyVersionDisabled(Conflict):
    """``key_version_disabled``: the version is disabled, scheduled for destruction or destroyed."""

    default_code = "key_version_disabled"


class KeyVersionBelowMinimum(Conflict):
    """``key_version_below_minimum``: the version is below the key's ``min_decryption_version``."""

    default_code = "key_version_below_minimum"


class NoEnabledVersion(Conflict):
    """``no_enabled_version``: the key (or all its versions) is disabled."""

    default_code = "no_enabled_version"


class InvalidStateTransition(Conflict):
    default_code = "invalid_state_transition"


class KeyDisabled(Conflict):
    """``key_disabled``: the whole key is disabled; nothing derives or decrypts."""

    default_code = "key_disabled"


class WouldCutOffIds(Conflict):
    """``would_cut_off_ids``: raising min_decryption_version would strand DEK ids still on older
    versions (``extra["cut_off"]``); re-key them, or repeat with ``force=True``."""

    default_code = "would_cut_off_ids"


class ProviderError(Conflict):
    """The key's provider (cloud KMS, HSM, KMIP) refused; ``code`` is the provider's own code."""

    default_code = "provider_error"


class ProviderValidationFailed(Conflict):
    default_code = "provider_validation_failed"


class NotConfigured(Conflict):
    default_code = "not_configured"


class RateLimited(KmsError):
    """429: slow down. Retried automatically (honouring ``Retry-After``) before being raised."""

    default_code = "rate_limited"


class Unavailable(KmsError):
    """503: the service or a dependency is temporarily unavailable and nothing was done.

    Retried automatically (honouring ``Retry-After``) before being raised."""

    default_code = "service_unavailable"


class ProviderUnavailable(Unavailable):
    default_code = "provider_unavailable"


class ServerError(KmsError):
    """Any other 5xx. Not retried: the service may have done part of the work."""

    default_code = "internal_error"


# -- raised by the client itself -------------------------------------------------------------


class KmsTransportError(KmsError):
    """No HTTP answer. ``status`` is 0; ``code`` is ``connect_error`` (no connection; retried),
    ``tls_error`` (handshake or certificate failure; not retried) or ``transport_error``
    (timeout or connection lost after sending; not retried)."""

    default_code = "transport_error"


class TokenFileError(KmsError):
    """The bearer token file cannot be read or is empty."""

    default_code = "token_file_error"


class UnexpectedResponse(KmsError):
    """A success status with a body this client cannot understand."""

    default_code = "unexpected_response"


_BY_CODE: dict[str, type[KmsError]] = {
    "invalid_request": InvalidRequest,
    "malformed_json": InvalidRequest,
    "batch_too_large": InvalidRequest,
    "unsupported_provider": InvalidRequest,
    "payload_too_large": InvalidRequest,
    "unsupported_media_type": InvalidRequest,
    "method_not_allowed": InvalidRequest,
    "decryption_failed": DecryptionFailed,
    "unauthenticated": Unauthenticated,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "already_exists": AlreadyExists,
    "key_version_disabled": KeyVersionDisabled,
    "key_version_below_minimum": KeyVersionBelowMinimum,
    "no_enabled_version": NoEnabledVersion,
    "invalid_state_transition": InvalidStateTransition,
    "key_disabled": KeyDisabled,
    "would_cut_off_ids": WouldCutOffIds,
    "provider_error": ProviderError,
    "provider_validation_failed": ProviderValidationFailed,
    "not_configured": NotConfigured,
    "service_unavailable": Unavailable,
    "database_unavailable": Unavailable,
    "audit_unavailable": Unavailable,
    "provider_unavailable": ProviderUnavailable,
    "internal_error": ServerError,
}


def _class_for_status(status: int) -> type[KmsError]:
    if status == 401:
        return Unauthenticated
    if status == 403:
        return Forbidden
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status == 429:
        return RateLimited
    if status == 503:
        return Unavailable
    if 400 <= status < 500:
        return InvalidRequest
    if status >= 500:
        return ServerError
    return KmsError


def error_from_problem(
    problem: Mapping[str, Any], *, status: int | None = None, retry_after: float | None = None
) -> KmsError:
    """The typed exception for a problem document (or a batch item's ``{"error": ...}``).

    >>> err = error_from_problem({"status": 404, "code": "not_found", "detail": "no such key"})
    >>> type(err).__name__, err.status, err.code
    ('NotFound', 404, 'not_found')
    """
    raw_status = problem.get("status")
    if status is None:
        status = raw_status if isinstance(raw_status, int) else 0
    raw_code = problem.get("code")
    code = raw_code if isinstance(raw_code, str) and raw_code else f"http_{status}"
    raw_detail = problem.get("detail") or problem.get("title") or code
    cls = _BY_CODE.get(code)
    if cls is None:
        # Provider refusals carry the provider's own code (e.g. "provider_access_denied").
        cls = ProviderError if code.startswith("provider_") and status == 409 else _class_for_status(status)
    # A known code served with an unexpected status keeps its class; an unknown 503 code is still
    # an Unavailable (retryable) and an unknown 429 a RateLimited.
    if status == 503 and not issubclass(cls, Unavailable):
        cls = Unavailable
    if status == 429:
        cls = RateLimited
    return cls(str(raw_detail), code=code, status=status, problem=problem, retry_after=retry_after)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or HTTP-date form); None if absent or invalid.

    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=datetime(2015, 10, 21, 7, 27, 58, tzinfo=UTC))
    2.0
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)
