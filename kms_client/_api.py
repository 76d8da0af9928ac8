"""The API of DESIGN §5 as operation specs, shared by the sync and the async client."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from kms_client._core import Op
from kms_client.errors import KmsError, error_from_problem
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
    Tenant,
    TokenInfo,
    item_list,
)

T = TypeVar("T")

VersionAction = Literal["disable", "enable", "schedule-destruction", "restore"]
Role = Literal["admin", "operator", "auditor", "agent"]
Operation = Literal["derive", "datakey", "encrypt", "decrypt", "rewrap"]


class Unset(enum.Enum):
    """Marks a PATCH field that is not to be changed (``None`` clears it)."""

    UNSET = "UNSET"


UNSET = Unset.UNSET


def _seg(value: str) -> str:
    return quote(value, safe="")


def _key_path(tenant: str, key: str) -> str:
    return f"/v1/tenants/{_seg(tenant)}/keys/{_seg(key)}"


def _one(parse: Callable[[Any], T]) -> Callable[[Any, int], T]:
    return lambda body, _status: parse(body)


def _batch(parse: Callable[[Any], T]) -> Callable[[Any, int], list[T | KmsError]]:
    def run(body: Any, _status: int) -> list[T | KmsError]:
        out: list[T | KmsError] = []
        for item in item_list(body, "results"):
            if isinstance(item, Mapping) and isinstance(item.get("error"), Mapping):
                out.append(error_from_problem(item["error"]))
            else:
                out.append(parse(item))
        return out

    return run


def _context(body: dict[str, Any], context: Mapping[str, str] | None) -> dict[str, Any]:
    if context is not None:
        body["context"] = dict(context)
    return body


# -- data plane --------------------------------------------------------------------------------


def derive(tenant: str, key: str, id: str, purpose: str, length: int, version: int | None) -> Op[DerivedKey]:
    body = DeriveRequest(id=id, purpose=purpose, length=length, version=version).to_json()
    return Op("POST", _key_path(tenant, key) + "/derive", _one(DerivedKey.from_json), json=body)


def derive_batch(tenant: str, key: str, items: Iterable[DeriveRequest]) -> Op[list[DerivedKey | KmsError]]:
    body = {"batch": [i.to_json() for i in items]}
    return Op("POST", _key_path(tenant, key) + "/derive", _batch(DerivedKey.from_json), json=body)


def datakey(
    tenant: str, key: str, length: int, context: Mapping[str, str] | None, plaintext: bool
) -> Op[DataKey]:
    body = DatakeyRequest(length=length, context=context, plaintext=plaintext).to_json()
    return Op("POST", _key_path(tenant, key) + "/datakey", _one(DataKey.from_json), json=body)


def datakey_batch(tenant: str, key: str, items: Iterable[DatakeyRequest]) -> Op[list[DataKey | KmsError]]:
    body = {"batch": [i.to_json() for i in items]}
    return Op("POST", _key_path(tenant, key) + "/datakey", _batch(DataKey.from_json), json=body)


def encrypt(tenant: str, key: str, plaintext: bytes, context: Mapping[str, str] | None) -> Op[Encrypted]:
    body = EncryptRequest(plaintext=plaintext, context=context).to_json()
    return Op("POST", _key_path(tenant, key) + "/encrypt", _one(Encrypted.from_json), json=body)


def encrypt_batch(tenant: str, key: str, items: Iterable[EncryptRequest]) -> Op[list[Encrypted | KmsError]]:
    body = {"batch": [i.to_json() for i in items]}
    return Op("POST", _key_path(tenant, key) + "/encrypt", _batch(Encrypted.from_json), json=body)


def decrypt(tenant: str, key: str, ciphertext: str, context: Mapping[str, str] | None) -> Op[Decrypted]:
    body = CiphertextRequest(ciphertext=ciphertext, context=context).to_json()
    return Op("POST", _key_path(tenant, key) + "/decrypt", _one(Decrypted.from_json), json=body)


def decrypt_batch(
    tenant: str, key: str, items: Iterable[CiphertextRequest]
) -> Op[list[Decrypted | KmsError]]:
    body = {"batch": [i.to_json() for i in items]}
    return Op("POST", _key_path(tenant, key) + "/decrypt", _batch(Decrypted.from_json), json=body)


def rewrap(tenant: str, key: str, ciphertext: str, context: Mapping[str, str] | None) -> Op[Encrypted]:
    body = CiphertextRequest(ciphertext=ciphertext, context=context).to_json()
    return Op("POST", _key_path(tenant, key) + "/rewrap", _one(Encrypted.from_json), json=body)


def rewrap_batch(tenant: str, key: str, items: Iterable[CiphertextRequest]) -> Op[list[Encrypted | KmsError]]:
    body = {"batch": [i.to_json() for i in items]}
    return Op("POST", _key_path(tenant, key) + "/rewrap", _batch(Encrypted.from_json), json=body)


# -- tenants and keys --------------------------------------------------------------------------


def create_tenant(id: str, name: str) -> Op[Tenant]:
    return Op("POST", "/v1/tenants", _one(Tenant.from_json), json={"id": id, "name": name})


def list_tenants() -> Op[list[Tenant]]:
    return Op("GET", "/v1/tenants", _one(lambda b: [Tenant.from_json(t) for t in item_list(b, "tenants")]))


def get_tenant(id: str) -> Op[Tenant]:
    return Op("GET", f"/v1/tenants/{_seg(id)}", _one(Tenant.from_json))


def create_key(
    tenant: str, name: str, provider: Mapping[str, Any] | None, rotation_period_days: int | None
) -> Op[Key]:
    body: dict[str, Any] = {"name": name, "provider": dict(provider or {"type": "local"})}
    if rotation_period_days is not None:
        body["rotation_period_days"] = rotation_period_days
    return Op("POST", f"/v1/tenants/{_seg(tenant)}/keys", _one(Key.from_json), json=body)


def list_keys(tenant: str) -> Op[list[Key]]:
    return Op(
        "GET",
        f"/v1/tenants/{_seg(tenant)}/keys",
        _one(lambda b: [Key.from_json(k) for k in item_list(b, "keys")]),
    )


def get_key(tenant: str, key: str) -> Op[Key]:
    return Op("GET", _key_path(tenant, key), _one(Key.from_json))


def update_key(
    tenant: str,
    key: str,
    min_decryption_version: int | Unset,
    rotation_period_days: int | Unset | None,
    force: bool = False,
) -> Op[Key]:
    body: dict[str, Any] = {}
    if not isinstance(min_decryption_version, Unset):
        body["min_decryption_version"] = min_decryption_version
    if not isinstance(rotation_period_days, Unset):
        body["rotation_period_days"] = rotation_period_days
    if not body:
        raise ValueError("update_key: nothing to change")
    if force:
        body["force"] = True
    return Op("PATCH", _key_path(tenant, key), _one(Key.from_json), json=body)


def rotate_key(tenant: str, key: str, reason: str | None) -> Op[Key]:
    body = {"reason": reason} if reason is not None else {}
    return Op("POST", _key_path(tenant, key) + "/rotate", _one(Key.from_json), json=body)


def transition_version(
    tenant: str,
    key: str,
    version: int,
    action: VersionAction,
    reason: str | None,
    waiting_period_days: int | None = None,
) -> Op[Key]:
    body: dict[str, Any] = {}
    if reason is not None:
        body["reason"] = reason
    if waiting_period_days is not None:
        body["waiting_period_days"] = waiting_period_days
    path = f"{_key_path(tenant, key)}/versions/{int(version)}/{action}"
    return Op("POST", path, _one(Key.from_json), json=body)


# -- tokens, audit, system ---------------------------------------------------------------------


def create_token(
    role: Role,
    description: str,
    tenant: str | None,
    keys: Sequence[str] | None,
    operations: Sequence[Operation] | None,
    ttl_seconds: int | None,
) -> Op[CreatedToken]:
    body: dict[str, Any] = {"role": role, "description": description}
    if tenant is not None:
        body["tenant"] = tenant
    if keys is not None:
        body["keys"] = list(keys)
    if operations is not None:
        body["operations"] = list(operations)
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    return Op("POST", "/v1/tokens", _one(CreatedToken.from_json), json=body)


def list_tokens() -> Op[list[TokenInfo]]:
    return Op("GET", "/v1/tokens", _one(lambda b: [TokenInfo.from_json(t) for t in item_list(b, "tokens")]))


def revoke_token(token_id: str) -> Op[TokenInfo]:
    return Op("DELETE", f"/v1/tokens/{_seg(token_id)}", _one(TokenInfo.from_json))


def list_audit(tenant: str | None, action: str | None, after_seq: int, limit: int) -> Op[AuditPage]:
    params: dict[str, str | int] = {"after_seq": after_seq, "limit": limit}
    if tenant is not None:
        params["tenant"] = tenant
    if action is not None:
        params["action"] = action
    return Op("GET", "/v1/audit", _one(AuditPage.from_json), params=params)


def verify_audit() -> Op[AuditVerification]:
    return Op("GET", "/v1/audit/verify", _one(AuditVerification.from_json))


def health() -> Op[Health]:
    return Op(
        "GET",
        "/v1/sys/health",
        lambda body, status: Health.from_json(body, status),
        authenticated=False,
        retry=False,
        ok_statuses=frozenset({503}),
    )


def identity() -> Op[Identity]:
    return Op("GET", "/v1/sys/identity", _one(Identity.from_json))
