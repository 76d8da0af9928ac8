"""`POST /v1/tenants/{t}/keys/{k}/{derive|datakey|encrypt|decrypt|rewrap}`, single or batch.

Bodies are validated here rather than by FastAPI so that a batch item that is invalid fails on
its own (`{"error": ...}` in its slot) instead of failing the whole batch.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import BaseModel, Field, StringConstraints, ValidationError, field_validator

from kms_service.auth.principal import Operation
from kms_service.dataplane.service import CiphertextItem, DatakeyItem, DeriveItem, EncryptItem, Item
from kms_service.deps import CurrentPrincipal, MetaDep, ServicesDep
from kms_service.errors import BatchTooLarge, InvalidRequest, ServiceError
from kms_service.routing import StrictJsonRoute
from kms_service.validation import (
    DekId,
    DekLength,
    EncryptionContext,
    KeyName,
    Purpose,
    StrictModel,
    TenantId,
    Version,
)

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/tenants/{tenant}/keys/{key}", tags=["data plane"])

MAX_PLAINTEXT = 64 * 1024
MAX_CIPHERTEXT_CHARS = 4 * ((16 + 12 + MAX_PLAINTEXT + 16 + 2) // 3) + 32


class DeriveIn(StrictModel):
    id: DekId
    purpose: Purpose = "volume"
    length: DekLength = 32
    version: Version | None = None


class DatakeyIn(StrictModel):
    length: DekLength = 32
    context: EncryptionContext | None = None
    plaintext: bool = True


class EncryptIn(StrictModel):
    plaintext: str = Field(description="Standard base64, at most 64 KiB decoded")
    context: EncryptionContext | None = None

    @field_validator("plaintext")
    @classmethod
    def _b64(cls, value: str) -> str:
        if len(value) > 4 * ((MAX_PLAINTEXT + 2) // 3):
            raise ValueError("plaintext larger than 64 KiB")
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("plaintext must be standard base64") from None
        if len(decoded) > MAX_PLAINTEXT:
            raise ValueError("plaintext larger than 64 KiB")
        return value


class CiphertextIn(StrictModel):
    ciphertext: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CIPHERTEXT_CHARS)]
    context: EncryptionContext | None = None


class BatchIn(BaseModel):
    batch: list[dict[str, Any]] = Field(description="At most 1000 items, each a single request body")


def _to_item(op: Operation, raw: Any) -> Item:
    try:
        if not isinstance(raw, dict):
            raise InvalidRequest("the request body must be a JSON object")
        if op is Operation.DERIVE:
            d = DeriveIn.model_validate(raw)
            return DeriveItem(id=d.id, purpose=d.purpose, length=d.length, version=d.version)
        if op is Operation.DATAKEY:
            k = DatakeyIn.model_validate(raw)
            return DatakeyItem(length=k.length, context=k.context, plaintext=k.plaintext)
        if op is Operation.ENCRYPT:
            e = EncryptIn.model_validate(raw)
            return EncryptItem(plaintext=base64.b64decode(e.plaintext), context=e.context)
        c = CiphertextIn.model_validate(raw)
        return CiphertextItem(ciphertext=c.ciphertext, context=c.context)
    except ValidationError as exc:
        raise InvalidRequest(
            "the request body is invalid", extra={"errors": validation_errors(exc)}
        ) from None


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors without the offending input (it may be a secret)."""
    return [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in exc.errors()]


_MODELS: dict[Operation, type[BaseModel]] = {
    Operation.DERIVE: DeriveIn,
    Operation.DATAKEY: DatakeyIn,
    Operation.ENCRYPT: EncryptIn,
    Operation.DECRYPT: CiphertextIn,
    Operation.REWRAP: CiphertextIn,
}


def _register(op: Operation, summary: str) -> None:
    single = _MODELS[op].model_json_schema()
    batch = BatchIn.model_json_schema()
    extra = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"oneOf": [single, batch]}}},
        }
    }

    async def endpoint(
        tenant: TenantId,
        key: KeyName,
        principal: CurrentPrincipal,
        services: ServicesDep,
        meta: MetaDep,
        body: Annotated[Any, Body()],
    ) -> dict[str, Any]:
        if isinstance(body, dict) and "batch" in body:
            if set(body) != {"batch"}:
                raise InvalidRequest("a batch request has only the field 'batch'")
            raw_items = body["batch"]
            if not isinstance(raw_items, list) or not raw_items:
                raise InvalidRequest("'batch' must be a non-empty list of request objects")
            limit = services.settings.max_batch_items
            if len(raw_items) > limit:
                raise BatchTooLarge(f"a batch holds at most {limit} items, got {len(raw_items)}")
            items: list[Item | ServiceError] = []
            for raw in raw_items:
                try:
                    items.append(_to_item(op, raw))
                except ServiceError as exc:
                    items.append(exc)
            results = await services.dataplane.run_batch(principal, meta, tenant, key, op, items)
            return {"results": results}
        item = _to_item(op, body)
        return await services.dataplane.run(principal, meta, tenant, key, op, item)

    endpoint.__name__ = f"{op.value}_endpoint"
    router.add_api_route(
        f"/{op.value}", endpoint, methods=["POST"], summary=summary, openapi_extra=extra, name=op.value
    )


_register(Operation.DERIVE, "Derive a deterministic DEK → {key, version, latest_version}")
_register(Operation.DATAKEY, "Generate a random data key → {ciphertext, plaintext?, version}")
_register(Operation.ENCRYPT, "Encrypt up to 64 KiB → {ciphertext, version}")
_register(Operation.DECRYPT, "Decrypt a ciphertext → {plaintext, version}")
_register(Operation.REWRAP, "Re-encrypt under the primary version → {ciphertext, version}")
