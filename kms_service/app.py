"""The app factory and lifespan: they own the engine, caches, providers and background tasks.

Nothing is created at import time. Start-up refuses to run on a schema other than head, on a
missing installation, or with a master secret that does not match the installation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import kms_service
from kms_service.audit.checkpoints import Checkpointer, DirectorySink, signing_key
from kms_service.audit.router import router as audit_router
from kms_service.audit.writer import AuditBatcher
from kms_service.auth.identities import IdentityConfigError, load_identities
from kms_service.auth.router import router as tokens_router
from kms_service.auth.tokens import TokenCache, TokenService
from kms_service.changes import ChangeFeed
from kms_service.dataplane.router import router as dataplane_router
from kms_service.dataplane.service import DataPlane
from kms_service.db.engine import Database
from kms_service.db.migrate import check_schema
from kms_service.db.models import Cluster
from kms_service.deps import request_id_of
from kms_service.errors import (
    BatchTooLarge,
    InvalidRequest,
    MalformedJson,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from kms_service.keys.cache import KekSecretCache, KeyMetaCache
from kms_service.keys.material import KeyMaterial, ProviderPool
from kms_service.keys.router import router as keys_router
from kms_service.keys.service import KeyService
from kms_service.keys.usage import UsageRecorder
from kms_service.master import Installation, MasterSecretError
from kms_service.onboarding.router import router as onboarding_router
from kms_service.onboarding.service import OnboardingService
from kms_service.scheduler import Scheduler
from kms_service.seal import load_master
from kms_service.settings import Settings, load_settings
from kms_service.sys.router import router as sys_router
from kms_service.tenants.router import router as tenants_router
from kms_service.tenants.service import TenantService

log = logging.getLogger("kms_service")

PROBLEM_JSON = "application/problem+json"

REQUESTS = Counter("kms_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "kms_http_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


class StartupError(Exception):
    """The service cannot start; the message says what to do."""


@dataclass
class Services:
    settings: Settings
    db: Database
    installation: Installation
    batcher: AuditBatcher
    pool: ProviderPool
    token_cache: TokenCache
    meta_cache: KeyMetaCache
    kek_cache: KekSecretCache
    tokens: TokenService
    tenants: TenantService
    keys: KeyService
    dataplane: DataPlane
    onboarding: OnboardingService
    changes: ChangeFeed
    checkpoint_sink: DirectorySink
    checkpoint_key: Ed25519PrivateKey
    checkpointer: Checkpointer
    usage: UsageRecorder
    scheduler: Scheduler


async def load_installation(db: Database, settings: Settings) -> Installation:
    async with db.read() as session:
        cluster = (await session.scalars(select(Cluster))).one_or_none()
    if cluster is None:
        raise StartupError("this database has no installation yet: run `kms init`")
    try:
        master = await load_master(settings)
    except MasterSecretError as exc:
        raise StartupError(str(exc)) from None
    installation = Installation.derive(master=master, cluster_salt=cluster.cluster_salt)
    if installation.cluster_id != cluster.cluster_id:
        raise StartupError(
            "the master secret does not belong to this database "
            f"(cluster {cluster.cluster_id}): refusing to start"
        )
    return installation


async def build_services(settings: Settings) -> Services:
    try:
        identities = load_identities(settings)  # certificate and workload-JWT agents
    except IdentityConfigError as exc:
        raise StartupError(str(exc)) from None
    db = Database(
        settings.resolved_database_url, pool_size=settings.db_pool_size, timeout=settings.db_timeout_seconds
    )
    try:
        await check_schema(db.engine)
        installation = await load_installation(db, settings)
    except Exception:
        await db.dispose()
        raise
    batcher = AuditBatcher(
        db, audit_key=installation.audit_key.reveal(), max_events=settings.audit_batch_max_events
    )
    pool = ProviderPool(
        installation,
        resilience={
            "attempts": settings.provider_retry_attempts,
            "deadline": settings.provider_deadline_seconds,
            "failure_threshold": settings.provider_breaker_failures,
            "reset_after": settings.provider_breaker_reset_seconds,
        },
    )
    token_cache = TokenCache(
        max_entries=settings.token_cache_max_entries, max_age=settings.metadata_cache_max_age_seconds
    )
    meta_cache = KeyMetaCache(max_entries=1_000_000, ttl=settings.metadata_cache_max_age_seconds)
    kek_cache = KekSecretCache(max_entries=settings.kek_cache_max_entries, ttl=settings.kek_cache_ttl_seconds)
    material = KeyMaterial(installation, pool, kek_cache)
    tokens = TokenService(db, installation, batcher, token_cache, identities=identities)
    keys = KeyService(
        db, installation, material, meta_cache, pkcs11_allowed_modules=settings.pkcs11_allowed_modules
    )
    usage = UsageRecorder(
        db, interval=settings.usage_flush_interval_seconds, max_items=settings.usage_flush_max_items
    )
    checkpoint_key = signing_key(installation.master, installation.cluster_salt)
    checkpoint_sink = DirectorySink(settings.resolved_audit_checkpoint_dir)
    return Services(
        checkpoint_sink=checkpoint_sink,
        checkpoint_key=checkpoint_key,
        checkpointer=Checkpointer(
            db,
            checkpoint_sink,
            checkpoint_key,
            installation.cluster_id,
            every_events=settings.audit_checkpoint_every_events,
            interval=settings.audit_checkpoint_interval_seconds,
        ),
        settings=settings,
        db=db,
        installation=installation,
        batcher=batcher,
        pool=pool,
        token_cache=token_cache,
        meta_cache=meta_cache,
        kek_cache=kek_cache,
        tokens=tokens,
        tenants=TenantService(db, installation),
        keys=keys,
        dataplane=DataPlane(keys, material, batcher, tokens, usage=usage),
        usage=usage,
        scheduler=Scheduler(keys, interval=settings.scheduler_interval_seconds),
        onboarding=OnboardingService(db, installation, settings, keys, material),
        changes=ChangeFeed(
            db,
            interval=settings.change_poll_interval_seconds,
            meta=meta_cache,
            tokens=token_cache,
        ),
    )


def problem_response(exc: ServiceError, request: Request) -> JSONResponse:
    headers = dict(exc.headers)
    rid = getattr(request.state, "request_id", None)
    if rid:
        headers["X-Request-ID"] = rid
    return JSONResponse(
        exc.problem(instance=request.url.path),
        status_code=exc.status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


def _validation_problem(exc: RequestValidationError) -> ServiceError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return MalformedJson("the request body is not valid JSON")
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        return InvalidRequest("a JSON request body is required")
    for e in errors:
        if e.get("type") == "too_long" and tuple(e.get("loc", ()))[-1:] == ("batch",):
            return BatchTooLarge("too many batch items")
    safe = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors
    ]
    return InvalidRequest("the request is invalid", extra={"errors": safe})


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class BodyLimit:
    """Guards bodies before parsing: over the limit -> 413 (by Content-Length at once, else while
    reading); a body that is not declared as JSON -> 415."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            await _send_problem(scope, send, InvalidRequest("Content-Length must be a decimal number"))
            return
        if declared is not None and int(declared) > self.max_bytes:
            await _send_problem(scope, send, PayloadTooLarge(f"the body exceeds {self.max_bytes} bytes"))
            return
        content_type = headers.get(b"content-type")
        has_body = (declared not in (None, b"0")) or b"transfer-encoding" in headers
        if has_body and (content_type is None or not _is_json(content_type)):
            await _send_problem(
                scope, send, UnsupportedMediaType("send the body with Content-Type: application/json")
            )
            return
        received = 0
        too_large = False
        started = False

        async def limited() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            # Once the limit is hit, whatever the app answers (FastAPI turns a failed body read
            # into a 400) is replaced by one 413.
            nonlocal started
            if too_large:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_problem(
                        scope, send, PayloadTooLarge(f"the body exceeds {self.max_bytes} bytes")
                    )
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except _BodyTooLarge:
            if not started:
                await _send_problem(scope, send, PayloadTooLarge(f"the body exceeds {self.max_bytes} bytes"))


class _BodyTooLarge(Exception):
    pass


async def _send_problem(scope: Scope, send: Send, exc: ServiceError) -> None:
    body = json.dumps(exc.problem(instance=scope.get("path"))).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def allowed_methods(request: Request) -> list[str]:
    """The methods some route serves at this path (for the Allow header of a 405)."""
    allowed = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    """Build the ASGI app. With ``services`` given (tests), the lifespan does not build its own."""
    settings = services.settings if services is not None else (settings or load_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = services or await build_services(settings)
        svc.batcher.start()
        await svc.changes.start()
        svc.checkpointer.start()
        svc.usage.start()
        svc.scheduler.start()
        app.state.services = svc
        log.info(
            "kms-service %s ready (cluster %s, database %s)",
            kms_service.__version__,
            svc.installation.cluster_id,
            svc.db.dialect,
        )
        try:
            yield
        finally:
            await svc.scheduler.stop()
            await svc.usage.stop()
            await svc.changes.stop()
            await svc.batcher.stop()
            await svc.checkpointer.stop()
            with contextlib.suppress(Exception):  # a last checkpoint of what was written
                await svc.checkpointer.checkpoint_now()
            if services is None:
                await svc.pool.close()
                await svc.db.dispose()

    app = FastAPI(
        title="kms-service",
        version=kms_service.__version__,
        description="Key management for envelope encryption. "
        "Errors are RFC 9457 problem+json with a stable `code`.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        redirect_slashes=False,
    )
    for router in (
        tenants_router,
        keys_router,
        dataplane_router,
        onboarding_router,
        tokens_router,
        audit_router,
        sys_router,
    ):
        app.include_router(router)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.code)
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(_validation_problem(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        mapped: ServiceError
        if exc.status_code == 404:
            mapped = NotFound("no such endpoint")
        elif exc.status_code == 405:
            mapped = MethodNotAllowed(
                f"{request.method} is not allowed here",
                headers={"Allow": ", ".join(allowed_methods(request))},
            )
        else:
            mapped = InvalidRequest(str(exc.detail))
        return problem_response(mapped, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(ServiceError("an internal error occurred; it has been logged"), request)

    @app.middleware("http")
    async def _request_context(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        request.state.request_id = request_id_of(request.headers.get("x-request-id"))
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        LATENCY.labels(path).observe(time.perf_counter() - start)
        return response

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
