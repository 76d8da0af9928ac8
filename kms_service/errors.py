"""The error taxonomy. Every client-visible failure is a ServiceError with its own status and
stable machine `code`; one handler renders it as RFC 9457 problem+json. Routes never build
HTTPException.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_BASE = "https://kms-service.dev/problems/"


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.detail = detail or self.title
        self.extra = extra or {}
        self.headers = headers or {}
        super().__init__(self.detail)

    def problem(self, *, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code.replace("_", "-"),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


# 4xx: the caller's mistake. Nothing was changed.
class InvalidRequest(ServiceError):
    status, code, title = 400, "invalid_request", "Invalid request"


class MalformedJson(ServiceError):
    status, code, title = 400, "malformed_json", "Request body is not valid JSON"


class BatchTooLarge(ServiceError):
    status, code, title = 400, "batch_too_large", "Too many batch items"


class DecryptionFailedError(ServiceError):
    """Opaque on purpose: bad tag, wrong context, truncation, unknown version all look alike."""

    status, code, title = 400, "decryption_failed", "Decryption failed"


class UnsupportedProvider(ServiceError):
    status, code, title = 400, "unsupported_provider", "Unsupported key provider"


class Unauthenticated(ServiceError):
    status, code, title = 401, "unauthenticated", "Authentication required"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="kms"'})


class Forbidden(ServiceError):
    status, code, title = 403, "forbidden", "Not allowed for this role"


class NotFound(ServiceError):
    status, code, title = 404, "not_found", "Not found"


class MethodNotAllowed(ServiceError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class AlreadyExists(ServiceError):
    status, code, title = 409, "already_exists", "Already exists"


class KeyVersionDisabled(ServiceError):
    status, code, title = 409, "key_version_disabled", "Key version is not enabled"


class KeyVersionBelowMinimum(ServiceError):
    status, code, title = 409, "key_version_below_minimum", "Key version is below min_decryption_version"


class NoPrimaryVersion(ServiceError):
    status, code, title = 409, "no_enabled_version", "Key has no enabled version"


class InvalidStateTransition(ServiceError):
    status, code, title = 409, "invalid_state_transition", "Invalid key version state transition"


class KeyDisabled(ServiceError):
    status, code, title = 409, "key_disabled", "Key is disabled"


class WouldCutOffIds(ServiceError):
    """Raising min_decryption_version would strand DEK ids still last derived under older versions."""

    status, code, title = 409, "would_cut_off_ids", "DEK ids are still on versions below the new minimum"


class PayloadTooLarge(ServiceError):
    status, code, title = 413, "payload_too_large", "Request body too large"


class UnsupportedMediaType(ServiceError):
    status, code, title = 415, "unsupported_media_type", "Content-Type must be application/json"


# 5xx: ours or a dependency's. Safe to retry where Retry-After is given.
class ServiceUnavailable(ServiceError):
    status, code, title = 503, "service_unavailable", "Service temporarily unavailable"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class DatabaseUnavailable(ServiceUnavailable):
    code, title = "database_unavailable", "Database unavailable"


class AuditUnavailable(ServiceUnavailable):
    code, title = "audit_unavailable", "Audit log unavailable; nothing was done"


class ProviderUnavailableError(ServiceUnavailable):
    code, title = "provider_unavailable", "Key provider unavailable"


class ProviderFailure(ServiceError):
    """The provider answered but refused (access denied, key disabled, key not found, a blob it
    cannot unwrap). The key cannot be used in its provider's current state: 409, with the
    provider's code, and a detail that says what the key's owner must fix."""

    status, code, title = 409, "provider_error", "Key provider refused the operation"

    def __init__(self, detail: str, *, code: str, status: int | None = None) -> None:
        super().__init__(detail)
        self._code = code
        if status is not None:
            self.status = status  # type: ignore[misc]

    def problem(self, *, instance: str | None = None) -> dict[str, Any]:
        body = super().problem(instance=instance)
        body["code"] = self._code
        body["type"] = PROBLEM_BASE + self._code.replace("_", "-")
        return body


class ProviderValidationFailed(ServiceError):
    """A customer key failed its validation checks; `checks` says which and how to fix it."""

    status, code, title = 409, "provider_validation_failed", "The customer key failed validation"


class NotConfigured(ServiceError):
    """A feature needs a setting the operator has not made."""

    status, code, title = 409, "not_configured", "Not configured on this service"
