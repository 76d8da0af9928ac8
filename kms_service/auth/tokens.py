"""API tokens: 256-bit random, shown once, stored only as SHA-256; cached principals."""

from __future__ import annotations

import base64
import hashlib
import inspect
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from kms_service.audit.chain import Actor, EventDraft
from kms_service.audit.writer import AuditBatcher, Change, Clock, append_events, utcnow
from kms_service.auth.identities import Identities, IdentityDenied, looks_like_jwt
from kms_service.auth.principal import Operation, Principal, Role
from kms_service.db.engine import Database
from kms_service.db.models import Tenant, Token
from kms_service.errors import AuditUnavailable, InvalidRequest, NotFound, Unauthenticated
from kms_service.master import Installation
from kms_service.request import RequestMeta

log = logging.getLogger(__name__)

TOKEN_PREFIX = "kms_"  # noqa: S105 - a prefix, not a secret
_TOKEN_RE = re.compile(r"kms_[A-Za-z0-9_-]{43}")
ANONYMOUS = Actor(type="anonymous", id="-")


def generate_token() -> tuple[str, str, bytes]:
    """A new (token id, token, token hash). The token is 256 bits of randomness."""
    token = TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return "tok_" + secrets.token_hex(8), token, hash_token(token)


def hash_token(token: str) -> bytes:
    # A plain hash suffices: tokens are 256-bit random, so there is nothing to brute-force.
    return hashlib.sha256(token.encode("ascii")).digest()


@dataclass(frozen=True, slots=True)
class TokenRecord:
    principal: Principal
    revoked: bool


@dataclass(frozen=True, slots=True)
class TokenView:
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
    def of(cls, row: Token) -> TokenView:
        return cls(
            row.id,
            row.role,
            row.tenant_id,
            row.keys,
            row.operations,
            row.description,
            row.created_by,
            row.created_at,
            row.expires_at,
            row.revoked_at,
        )


def _principal(row: Token) -> Principal:
    return Principal(
        token_id=row.id,
        role=Role(row.role),
        tenant=row.tenant_id,
        keys=frozenset(row.keys) if row.keys is not None else None,
        operations=frozenset(Operation(o) for o in row.operations) if row.operations is not None else None,
        expires_at=row.expires_at,
    )


class TokenCache:
    """hash -> record, bounded (LRU), with a max age; invalidated through the change feed.

    ``epoch`` counts invalidations so that a fill which read the database before a revocation
    cannot land after it (see :meth:`put_if_current`)."""

    def __init__(self, *, max_entries: int, max_age: float) -> None:
        self._entries: OrderedDict[bytes, tuple[TokenRecord | None, float]] = OrderedDict()
        self._max = max_entries
        self._max_age = max_age
        self.epoch = 0

    def get(self, digest: bytes) -> tuple[bool, TokenRecord | None]:
        hit = self._entries.get(digest)
        if hit is None or time.monotonic() - hit[1] > self._max_age:
            return False, None
        self._entries.move_to_end(digest)
        return True, hit[0]

    def put(self, digest: bytes, record: TokenRecord | None) -> None:
        self._entries[digest] = (record, time.monotonic())
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def put_if_current(self, digest: bytes, record: TokenRecord | None, epoch: int) -> None:
        if epoch == self.epoch:
            self.put(digest, record)

    def invalidate_token(self, token_id: str | None) -> None:
        """Drop the token's entry and every negative entry (a new token may now exist)."""
        self.epoch += 1
        for digest, (record, _) in list(self._entries.items()):
            if record is None or record.principal.token_id == token_id:
                del self._entries[digest]

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()


class TokenService:
    def __init__(
        self,
        db: Database,
        installation: Installation,
        batcher: AuditBatcher,
        cache: TokenCache,
        *,
        clock: Clock = utcnow,
        identities: Identities | None = None,
    ) -> None:
        self._identities = identities or Identities()
        self._db = db
        self._inst = installation
        self._batcher = batcher
        self._cache = cache
        self._clock = clock

    async def authenticate(
        self, authorization: str | None, meta: RequestMeta, *, client_cert_pem: str | None = None
    ) -> Principal:
        """Resolve a ``Bearer`` header (a ``kms_`` token, or a workload JWT) or, without one, the
        verified TLS client certificate to a principal; or audit the denial and raise 401."""
        if not authorization:
            if client_cert_pem is not None and self._identities.certs is not None:
                return await self._external(self._identities.certs.resolve, client_cert_pem, meta)
            await self._deny(ANONYMOUS, "missing", meta)
            raise Unauthenticated("missing bearer token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and self._identities.jwt is not None and looks_like_jwt(token):
            return await self._external(self._identities.jwt.verify, token, meta)
        if scheme.lower() != "bearer" or not _TOKEN_RE.fullmatch(token):
            await self._deny(ANONYMOUS, "malformed", meta)
            raise Unauthenticated("malformed bearer token")
        digest = hash_token(token)
        found, record = self._cache.get(digest)
        if not found:
            epoch = self._cache.epoch
            record = await self._load(digest)
            self._cache.put_if_current(digest, record, epoch)
        if record is None:
            await self._deny(ANONYMOUS, "unknown", meta)
            raise Unauthenticated("invalid or expired token")
        principal = record.principal
        if record.revoked:
            await self._deny(principal.actor, "revoked", meta)
            raise Unauthenticated("invalid or expired token")
        if principal.expires_at is not None and principal.expires_at <= self._clock():
            await self._deny(principal.actor, "expired", meta)
            raise Unauthenticated("invalid or expired token")
        return principal

    async def _external(
        self, resolve: Callable[[str], Principal | Awaitable[Principal]], credential: str, meta: RequestMeta
    ) -> Principal:
        try:
            result = resolve(credential)
            return await result if inspect.isawaitable(result) else result
        except IdentityDenied as exc:
            await self._deny(exc.actor or ANONYMOUS, exc.reason, meta)
            raise Unauthenticated("invalid or expired credentials") from None

    async def _load(self, digest: bytes) -> TokenRecord | None:
        async with self._db.read() as session:
            row = (await session.scalars(select(Token).where(Token.token_hash == digest))).one_or_none()
        if row is None:
            return None
        return TokenRecord(_principal(row), revoked=row.revoked_at is not None)

    async def _deny(self, actor: Actor, reason: str, meta: RequestMeta) -> None:
        await self.record_denial(actor, meta, reason=reason)

    async def record_denial(
        self,
        actor: Actor,
        meta: RequestMeta,
        *,
        reason: str,
        tenant: str | None = None,
        key: str | None = None,
        operation: str | None = None,
    ) -> None:
        """Audit an access denial. A denial changes nothing, so an audit outage is logged but
        does not turn the 4xx into a 5xx."""
        details: dict[str, str] = {"reason": reason}
        if operation:
            details["operation"] = operation
        draft = EventDraft(
            action="auth.denied",
            actor=actor,
            outcome="denied",
            tenant=tenant,
            key=key,
            request_id=meta.request_id,
            source=meta.source,
            details=details,
        )
        try:
            await self._batcher.record(draft)
        except AuditUnavailable:
            log.error("could not audit an access denial (reason=%s)", reason)

    async def create(
        self,
        actor: Actor,
        meta: RequestMeta,
        *,
        role: Role,
        description: str,
        tenant: str | None = None,
        keys: list[str] | None = None,
        operations: list[Operation] | None = None,
        ttl_seconds: int | None = None,
    ) -> tuple[TokenView, str]:
        """Mint a token. Returns its view and the token itself, which is never shown again."""
        if role is Role.AGENT:
            if tenant is None:
                raise InvalidRequest("an agent token needs a tenant")
        elif tenant is not None or keys is not None or operations is not None:
            raise InvalidRequest("tenant, keys and operations apply to agent tokens only")
        token_id, token, digest = generate_token()
        now = self._clock()
        row = Token(
            id=token_id,
            token_hash=digest,
            role=role.value,
            tenant_id=tenant,
            keys=sorted(set(keys)) if keys is not None else None,
            operations=sorted({o.value for o in operations}) if operations is not None else None,
            description=description,
            created_by=f"{actor.type}:{actor.id}",
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_seconds) if ttl_seconds else None,
            revoked_at=None,
        )
        async with self._db.write() as session:
            if tenant is not None and await session.get(Tenant, tenant) is None:
                raise NotFound(f"tenant {tenant!r} not found")
            session.add(row)
            await session.flush()
            details = {
                "token_id": token_id,
                "role": role.value,
                "description": description,
                "keys": row.keys,
                "operations": row.operations,
                "ttl_seconds": ttl_seconds,
            }
            await append_events(
                session,
                [
                    EventDraft(
                        action="token.created",
                        actor=actor,
                        tenant=tenant,
                        request_id=meta.request_id,
                        source=meta.source,
                        details=details,
                    )
                ],
                audit_key=self._inst.audit_key.reveal(),
                clock=self._clock,
                change=Change(kind="token", tenant=tenant, token_id=token_id),
            )
        self._cache.invalidate_token(token_id)
        return TokenView.of(row), token

    async def list(self) -> list[TokenView]:
        async with self._db.read() as session:
            rows = (await session.scalars(select(Token).order_by(Token.created_at, Token.id))).all()
        return [TokenView.of(r) for r in rows]

    async def revoke(self, actor: Actor, meta: RequestMeta, token_id: str) -> TokenView:
        async with self._db.write() as session:
            row = await session.get(Token, token_id)
            if row is None:
                raise NotFound(f"token {token_id!r} not found")
            if row.revoked_at is None:
                row.revoked_at = self._clock()
                await session.flush()
                await append_events(
                    session,
                    [
                        EventDraft(
                            action="token.revoked",
                            actor=actor,
                            tenant=row.tenant_id,
                            request_id=meta.request_id,
                            source=meta.source,
                            details={"token_id": token_id},
                        )
                    ],
                    audit_key=self._inst.audit_key.reveal(),
                    clock=self._clock,
                    change=Change(kind="token", tenant=row.tenant_id, token_id=token_id),
                )
            view = TokenView.of(row)
        self._cache.invalidate_token(token_id)
        return view
