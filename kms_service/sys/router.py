from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

import kms_service
from kms_service.audit.checkpoints import public_key_b64
from kms_service.deps import CurrentPrincipal, ServicesDep
from kms_service.routing import StrictJsonRoute

router = APIRouter(route_class=StrictJsonRoute, tags=["system"])


@router.get("/v1/sys/health")
async def health(services: ServicesDep) -> JSONResponse:
    """Liveness of the database and of every provider in use. No authentication."""
    start = time.perf_counter()
    try:
        async with asyncio.timeout(2.0), services.db.read() as session:
            await session.execute(text("SELECT 1"))
        database: dict[str, Any] = {"ok": True, "latency_ms": round((time.perf_counter() - start) * 1000, 2)}
    except Exception:
        database = {"ok": False, "latency_ms": round((time.perf_counter() - start) * 1000, 2)}
    providers = [{"type": "local", "ok": True, "latency_ms": 0.0}]
    for provider in services.pool.connected():
        if provider.type == "local":
            continue
        h = await provider.health()
        providers.append({"type": provider.type, "ok": h.ok, "latency_ms": round(h.latency_ms, 2)})
    ok = database["ok"] and all(p["ok"] for p in providers)
    body = {"status": "ok" if ok else "degraded", "database": database, "providers": providers}
    return JSONResponse(body, status_code=200 if database["ok"] else 503)


@router.get("/v1/sys/identity")
async def identity(principal: CurrentPrincipal, services: ServicesDep) -> dict[str, str]:
    return {
        "cluster_id": services.installation.cluster_id,
        "version": kms_service.__version__,
        "audit_checkpoint_public_key": public_key_b64(services.checkpoint_key),
    }


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
