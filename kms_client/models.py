"""Typed requests and results of the kms-service API (DESIGN §5).

Binary fields (keys, plaintexts) are ``bytes`` here; the base64 of the wire format is handled by
the client. Fields holding key material are left out of ``repr`` so they do not end up in logs.
Results are parsed leniently (fields this client does not know are ignored) so an older client
keeps working against a newer service.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from kms_client.errors import UnexpectedResponse

__all__ = [
    "AuditPage",
    "AuditVerification",
    "CiphertextRequest",
    "CreatedToken",
    "DataKey",
    "DatakeyRequest",
    "Decrypted",
    "DeriveRequest",
    "DerivedKey",
    "EncryptRequest",
    "Encrypted",
    "Health",
    "Identity",
    "Key",
    "KeyVersion",
    "Tenant",
    "TokenInfo",
]

T = TypeVar("T")


# -- parsing helpers ---------------------------------------------------------------------------


def _obj(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise UnexpectedResponse(f"expected a JSON object, got {type(body).__name__}")
    return body


def _get(body: Mapping[str, Any], name: str, typ: type[T]) -> T:
    value = body.get(name)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UnexpectedResponse(f"field {name!r}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def _opt(body: Mapping[str, Any], name: str, typ: type[T]) -> T | None:
    return None if body.get(name) is None else _get(body, name, typ)


def _b64(body: Mapping[str, Any], name: str) -> bytes:
    try:
        return base64.b64decode(_get(body, name, str), validate=True)
    except (binascii.Error, ValueError):
        raise UnexpectedResponse(f"field {name!r} is not standard base64") from None


def _time(body: Mapping[str, Any], name: str) -> datetime:
    try:
        return datetime.fromisoformat(_get(body, name, str))
    except ValueError:
        raise UnexpectedResponse(f"field {name!r} is not an ISO 8601 time") from None


def _opt_time(body: Mapping[str, Any], name: str) -> datetime | None:
    return None if body.get(name) is None else _time(body, name)


def _strs(body: Mapping[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UnexpectedResponse(f"field {name!r}: expected a list of strings")
    return list(value)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- data plane requests (batch items) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeriveRequest:
    """One item of :meth:`KmsClient.derive_batch`."""

    id: str
    purpose: str = "volume"
    length: int = 32
    version: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "purpose": self.purpose, "length": self.length}
        if self.version is not None:
            body["version"] = self.version
        return body


@dataclass(frozen=True, slots=True)
class DatakeyRequest:
    length: int = 32
    context: Mapping[str, str] | None = None
    plaintext: bool = True

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"length": self.length, "plaintext": self.plaintext}
        if self.context is not None:
            body["context"] = dict(self.context)
        return body


@dataclass(frozen=True, slots=True)
class EncryptRequest:
    plaintext: bytes = field(repr=False)
    context: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"plaintext": b64encode(self.plaintext)}
        if self.context is not None:
            body["context"] = dict(self.context)
        return body


@dataclass(frozen=True, slots=True)
class CiphertextRequest:
    """One item of :meth:`KmsClient.decrypt_batch` or :meth:`KmsClient.rewrap_batch`."""

    ciphertext: str
    context: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ciphertext": self.ciphertext}
        if self.context is not None:
            body["context"] = dict(self.context)
        return body


# -- data plane results ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DerivedKey:
    """A derived DEK: ``key`` of ``version``; ``latest_version`` is the key's primary version
    (greater than ``version`` means the caller should re-key)."""

    key: bytes = field(repr=False)
    version: int
    latest_version: int | None

    @classmethod
    def from_json(cls, body: Any) -> DerivedKey:
        b = _obj(body)
        return cls(
            key=_b64(b, "key"), version=_get(b, "version", int), latest_version=_opt(b, "latest_version", int)
        )


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh random data key: ``ciphertext`` (store it) and, unless refused, ``plaintext``."""

    ciphertext: str
    plaintext: bytes | None = field(repr=False)
    version: int

    @classmethod
    def from_json(cls, body: Any) -> DataKey:
        b = _obj(body)
        plaintext = _b64(b, "plaintext") if b.get("plaintext") is not None else None
        return cls(
            ciphertext=_get(b, "ciphertext", str), plaintext=plaintext, version=_get(b, "version", int)
        )


@dataclass(frozen=True, slots=True)
class Encrypted:
    """A ciphertext in the text form ``kms:v<version>:...`` (also the result of rewrap)."""

    ciphertext: str
    version: int

    @classmethod
    def from_json(cls, body: Any) -> Encrypted:
        b = _obj(body)
        return cls(ciphertext=_get(b, "ciphertext", str), version=_get(b, "version", int))


@dataclass(frozen=True, slots=True)
class Decrypted:
    plaintext: bytes = field(repr=False)
    version: int

    @classmethod
    def from_json(cls, body: Any) -> Decrypted:
        b = _obj(body)
        return cls(plaintext=_b64(b, "plaintext"), version=_get(b, "version", int))


# -- management --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    created_at: datetime

    @classmethod
    def from_json(cls, body: Any) -> Tenant:
        b = _obj(body)
        return cls(id=_get(b, "id", str), name=_get(b, "name", str), created_at=_time(b, "created_at"))


@dataclass(frozen=True, slots=True)
class KeyVersion:
    version: int
    state: str
    created_at: datetime
    destroy_at: datetime | None = None

    @classmethod
    def from_json(cls, body: Any) -> KeyVersion:
        b = _obj(body)
        return cls(
            version=_get(b, "version", int),
            state=_get(b, "state", str),
            created_at=_time(b, "created_at"),
            destroy_at=_opt_time(b, "destroy_at"),
        )


@dataclass(frozen=True, slots=True)
class Key:
    tenant: str
    name: str
    provider: dict[str, Any]
    state: str
    primary_version: int | None
    latest_version: int
    min_decryption_version: int
    rotation_period_days: int | None
    next_rotation_at: datetime | None
    created_at: datetime
    versions: list[KeyVersion]

    def version(self, number: int) -> KeyVersion:
        """The version numbered ``number`` (KeyError if the key has none)."""
        for v in self.versions:
            if v.version == number:
                return v
        raise KeyError(number)

    @classmethod
    def from_json(cls, body: Any) -> Key:
        b = _obj(body)
        versions = b.get("versions")
        if not isinstance(versions, list):
            raise UnexpectedResponse("field 'versions': expected a list")
        return cls(
            tenant=_get(b, "tenant", str),
            name=_get(b, "name", str),
            provider=dict(_get(b, "provider", dict)),
            state=_get(b, "state", str),
            primary_version=_opt(b, "primary_version", int),
            latest_version=_get(b, "latest_version", int),
            min_decryption_version=_get(b, "min_decryption_version", int),
            rotation_period_days=_opt(b, "rotation_period_days", int),
            next_rotation_at=_opt_time(b, "next_rotation_at"),
            created_at=_time(b, "created_at"),
            versions=[KeyVersion.from_json(v) for v in versions],
        )


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What the service shows of a token (never the secret, except once in :class:`CreatedToken`)."""

    id: str
    role: str
    tenant: str | None
    keys: list[str] | None
    operations: list[str] | None
    description: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def _fields(cls, b: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": _get(b, "id", str),
            "role": _get(b, "role", str),
            "tenant": _opt(b, "tenant", str),
            "keys": _strs(b, "keys"),
            "operations": _strs(b, "operations"),
            "description": _get(b, "description", str),
            "created_by": _get(b, "created_by", str),
            "created_at": _time(b, "created_at"),
            "expires_at": _opt_time(b, "expires_at"),
            "revoked_at": _opt_time(b, "revoked_at"),
        }

    @classmethod
    def from_json(cls, body: Any) -> TokenInfo:
        return cls(**cls._fields(_obj(body)))


@dataclass(frozen=True, slots=True)
class CreatedToken:
    """A new token: ``token`` is the bearer secret, shown by the service this once."""

    token: str = field(repr=False)
    info: TokenInfo

    @property
    def id(self) -> str:
        return self.info.id

    @classmethod
    def from_json(cls, body: Any) -> CreatedToken:
        b = _obj(body)
        return cls(token=_get(b, "token", str), info=TokenInfo.from_json(b))


@dataclass(frozen=True, slots=True)
class AuditPage:
    events: list[dict[str, Any]]
    next_after_seq: int | None

    @classmethod
    def from_json(cls, body: Any) -> AuditPage:
        b = _obj(body)
        events = b.get("events")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise UnexpectedResponse("field 'events': expected a list of objects")
        return cls(events=events, next_after_seq=_opt(b, "next_after_seq", int))


@dataclass(frozen=True, slots=True)
class AuditVerification:
    valid: bool
    checked: int
    head_seq: int
    head_hash: str
    first_invalid_seq: int | None
    reason: str | None = None

    @classmethod
    def from_json(cls, body: Any) -> AuditVerification:
        b = _obj(body)
        return cls(
            valid=_get(b, "valid", bool),
            checked=_get(b, "checked", int),
            head_seq=_get(b, "head_seq", int),
            head_hash=_get(b, "head_hash", str),
            first_invalid_seq=_opt(b, "first_invalid_seq", int),
            reason=_opt(b, "reason", str),
        )


@dataclass(frozen=True, slots=True)
class Health:
    """``GET /v1/sys/health``: ``status`` is "ok" or "degraded"; ``http_status`` 503 when the
    database is unreachable."""

    status: str
    database: dict[str, Any]
    providers: list[dict[str, Any]]
    http_status: int = 200

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_json(cls, body: Any, http_status: int = 200) -> Health:
        b = _obj(body)
        providers = b.get("providers") or []
        if not isinstance(providers, list):
            raise UnexpectedResponse("field 'providers': expected a list")
        return cls(
            status=_get(b, "status", str),
            database=dict(b.get("database") or {}),
            providers=[dict(p) for p in providers if isinstance(p, Mapping)],
            http_status=http_status,
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """``GET /v1/sys/identity``: the installation's ``cluster_id`` and the server version."""

    cluster_id: str
    version: str

    @classmethod
    def from_json(cls, body: Any) -> Identity:
        b = _obj(body)
        return cls(cluster_id=_get(b, "cluster_id", str), version=_get(b, "version", str))


def item_list(body: Any, name: str) -> Sequence[Any]:
    value = _obj(body).get(name)
    if not isinstance(value, list):
        raise UnexpectedResponse(f"field {name!r}: expected a list")
    return value
