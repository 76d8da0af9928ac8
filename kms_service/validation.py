"""Input grammar of DESIGN §2, as pydantic types. Anything else is rejected, never normalised."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
DEK_ID_PATTERN = r"^[A-Za-z0-9._:/@+=-]{1,256}$"
PURPOSE_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"

TenantId = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
KeyName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
DekId = Annotated[str, StringConstraints(pattern=DEK_ID_PATTERN)]
Purpose = Annotated[str, StringConstraints(pattern=PURPOSE_PATTERN)]
DekLength = Annotated[int, Field(ge=16, le=64)]
Version = Annotated[int, Field(ge=1, le=2_147_483_647)]
# Free text that is stored and shown (names, descriptions, reasons): no control characters, which
# PostgreSQL cannot store (NUL) or which would forge lines in logs and consoles.
DisplayText = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Reason = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^\x00-\x1f\x7f]*$")]

MAX_CONTEXT_ENTRIES = 64
MAX_CONTEXT_BYTES = 8192


def _check_context(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_CONTEXT_ENTRIES:
        raise ValueError(f"at most {MAX_CONTEXT_ENTRIES} context entries")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in value.items())
    if size > MAX_CONTEXT_BYTES:
        raise ValueError(f"context larger than {MAX_CONTEXT_BYTES} bytes")
    return value


EncryptionContext = Annotated[dict[str, str], AfterValidator(_check_context)]


class StrictModel(BaseModel):
    """Request bodies: unknown fields and type coercion ("32" for 32) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def is_name(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(NAME_PATTERN, value) is not None
