"""The ceiling named in the performance issue: a bare FastAPI endpoint doing one HKDF.

    uvicorn bench.ceiling:app --workers N --loop uvloop --http httptools --no-access-log

No auth, no cache, no audit, no database: JSON body in, one DEK derivation, plain dict out.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from fastapi import FastAPI

from kms_service import crypto

app = FastAPI()
_SECRET = os.urandom(32)


@app.post("/derive")
async def derive(body: dict[str, Any]) -> dict[str, Any]:
    dek = crypto.derive_dek(kek_secret=_SECRET, purpose="volume", dek_id=str(body["id"]), length=32)
    return {"key": base64.b64encode(dek).decode("ascii"), "version": 1, "latest_version": 1}
