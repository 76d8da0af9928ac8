"""Agent identities other than `kms_` bearer tokens: client certificates and workload JWTs.

* Client certificates (``KMS_CERT_PRINCIPALS_FILE``): the TLS handshake has already verified the
  certificate against ``KMS_TLS_CLIENT_CA_FILE``; here it is mapped, by the SHA-256 of its
  SubjectPublicKeyInfo or by a DNS/URI SAN, to an agent scope. Principal id ``cert:<16 hex>``.
* Kubernetes projected service-account tokens (``KMS_JWT_*``): a compact JWS, RS256 or ES256 only,
  verified here with ``cryptography`` against a JWKS (file or URL, cached, refetched on an unknown
  ``kid`` at most once per :data:`JWKS_MIN_REFETCH_SECONDS`), then ``iss``, ``aud``, ``exp``,
  ``nbf``, ``iat`` (with :data:`LEEWAY_SECONDS`), and ``sub`` mapped by ``KMS_JWT_SUBJECTS_FILE``.
  Principal id ``sa:<namespace>/<name>``.

A JWT library is not a declared dependency of kms-service (PyJWT is only present transitively,
through an optional provider extra), so the narrow JWS verification is implemented here: fixed
algorithm allow-list, the algorithm must match the key type, no ``crit`` headers, strict base64url.

Denials raise :class:`IdentityDenied` with a stable reason code; the caller audits it. Reasons and
messages never contain the token, the certificate or key material.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import logging
import re
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kms_service.audit.chain import Actor
from kms_service.auth.principal import Operation, Principal, Role
from kms_service.settings import Settings

log = logging.getLogger(__name__)
E = TypeVar("E", bound=BaseModel)

LEEWAY_SECONDS = 30
JWKS_TTL_SECONDS = 300.0
JWKS_MIN_REFETCH_SECONDS = 10.0
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
MAX_JWT_BYTES = 16 * 1024
MAX_JWKS_BYTES = 256 * 1024
ALGORITHMS = frozenset({"RS256", "ES256"})

_B64URL = r"[A-Za-z0-9_-]"
JWT_RE = re.compile(rf"{_B64URL}+\.{_B64URL}+\.{_B64URL}*")
_NS = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_NAME = r"[a-z0-9](?:[-.a-z0-9]*[a-z0-9])?"
_SA_RE = re.compile(rf"system:serviceaccount:({_NS}):({_NAME})")
_SUBJECT_RE = re.compile(rf"system:serviceaccount:{_NS}:(?:\*|{_NAME})")


class IdentityConfigError(Exception):
    """A principals/subjects/JWKS file is unusable; the message names the variable."""


class IdentityDenied(Exception):
    """Authentication by certificate or JWT failed. ``reason`` is the audited code."""

    def __init__(self, reason: str, actor: Actor | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.actor = actor


def looks_like_jwt(token: str) -> bool:
    return len(token) <= MAX_JWT_BYTES and JWT_RE.fullmatch(token) is not None


# -- scope files ------------------------------------------------------------------------------


class _ScopeEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(min_length=1, max_length=64)
    keys: list[str] | None = None
    operations: list[Operation] | None = None
    description: str = ""


class _CertEntry(_ScopeEntry):
    spki_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    san: str | None = Field(default=None, min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _one_selector(self) -> _CertEntry:
        if (self.spki_sha256 is None) == (self.san is None):
            raise ValueError("give exactly one of spki_sha256 and san")
        return self


class _SubjectEntry(_ScopeEntry):
    subject: str = Field(max_length=400)

    @model_validator(mode="after")
    def _check_subject(self) -> _SubjectEntry:
        if not _SUBJECT_RE.fullmatch(self.subject):
            raise ValueError(
                "subject must be system:serviceaccount:<namespace>:<name> "
                "or system:serviceaccount:<namespace>:*"
            )
        return self


def _read_entries(path: Path, variable: str) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise IdentityConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    try:
        data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise IdentityConfigError(f"{variable}: {path} is not valid {path.suffix or 'JSON'}: {exc}") from None
    if isinstance(data, dict):
        data = data.get("principals", data.get("subjects"))
    if not isinstance(data, list):
        raise IdentityConfigError(
            f"{variable}: {path} must hold a list (JSON) or [[principals]] / [[subjects]] tables (TOML)"
        )
    return data


def _validated(model: type[E], items: list[Any], variable: str, path: Path) -> list[E]:
    out: list[E] = []
    for i, item in enumerate(items):
        try:
            out.append(model.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            raise IdentityConfigError(f"{variable}: {path} entry {i}: {where}: {first['msg']}") from None
    return out


def _principal(token_id: str, entry: _ScopeEntry) -> Principal:
    return Principal(
        token_id=token_id,
        role=Role.AGENT,
        tenant=entry.tenant,
        keys=frozenset(entry.keys) if entry.keys is not None else None,
        operations=frozenset(entry.operations) if entry.operations is not None else None,
    )


# -- client certificates ----------------------------------------------------------------------


class CertPrincipals:
    def __init__(self, entries: list[_CertEntry]) -> None:
        self._by_spki = {e.spki_sha256.lower(): e for e in entries if e.spki_sha256}
        self._by_san: dict[str, list[_CertEntry]] = {}
        for e in entries:
            if e.san:
                self._by_san.setdefault(_norm_san(e.san), []).append(e)

    @classmethod
    def load(cls, path: Path) -> CertPrincipals:
        variable = "KMS_CERT_PRINCIPALS_FILE"
        return cls(_validated(_CertEntry, _read_entries(path, variable), variable, path))

    def resolve(self, pem: str) -> Principal:
        identified = _identify(pem)
        if identified is None:
            raise IdentityDenied("cert_malformed")
        fingerprint, sans = identified
        token_id = "cert:" + fingerprint[:16]
        actor = Actor(type="agent", id=token_id)
        entry = self._by_spki.get(fingerprint)
        if entry is None:
            matches = {id(e): e for san in sans for e in self._by_san.get(san, [])}
            if len(matches) > 1:
                raise IdentityDenied("cert_ambiguous", actor)
            if not matches:
                raise IdentityDenied("cert_unknown", actor)
            entry = next(iter(matches.values()))
        return _principal(token_id, entry)


@functools.lru_cache(maxsize=1024)
def _identify(pem: str) -> tuple[str, tuple[str, ...]] | None:
    """(SPKI SHA-256 hex, SANs) of a certificate, or None if it does not parse. Cached: every
    request on a connection presents the same certificate, and parsing it costs more than the
    rest of authentication. The result holds no secret (a public key's digest and names)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except ValueError:
        return None
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest(), tuple(_sans(cert))


def _norm_san(value: str) -> str:
    return value if ":" in value else value.lower()  # URIs as given; DNS names case-insensitive


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [_norm_san(n) for n in ext.get_values_for_type(x509.DNSName)]
    return names + [_norm_san(n) for n in ext.get_values_for_type(x509.UniformResourceIdentifier)]


# -- JWKS -------------------------------------------------------------------------------------

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _b64url_int(value: Any) -> int:
    return int.from_bytes(b64url_decode(value), "big")


def b64url_decode(value: Any) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(rf"{_B64URL}*", value):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def parse_jwks(data: Any) -> dict[str, tuple[str, PublicKey]]:
    """kid -> (alg, public key) for the usable signing keys; other keys are skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("a JWKS is an object with a 'keys' list")
    out: dict[str, tuple[str, PublicKey]] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        try:
            key: PublicKey
            if jwk.get("kty") == "RSA":
                alg = "RS256"
                key = rsa.RSAPublicNumbers(_b64url_int(jwk["e"]), _b64url_int(jwk["n"])).public_key()
                if key.key_size < 2048:
                    continue
            elif jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
                alg = "ES256"
                key = ec.EllipticCurvePublicNumbers(
                    _b64url_int(jwk["x"]), _b64url_int(jwk["y"]), ec.SECP256R1()
                ).public_key()
            else:
                continue
        except (KeyError, ValueError):
            continue
        if jwk.get("alg", alg) != alg:
            continue
        out[jwk["kid"]] = (alg, key)
    return out


Fetcher = Callable[[], Awaitable[Any]]


class JwksCache:
    """The verification keys: refreshed after :data:`JWKS_TTL_SECONDS`, and on an unknown kid at
    most once per :data:`JWKS_MIN_REFETCH_SECONDS` (so a flood of made-up kids costs one fetch)."""

    def __init__(
        self,
        fetch: Fetcher,
        *,
        ttl: float = JWKS_TTL_SECONDS,
        min_refetch: float = JWKS_MIN_REFETCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._min_refetch = min_refetch
        self._clock = clock
        self._keys: dict[str, tuple[str, PublicKey]] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key(self, kid: str) -> tuple[str, PublicKey] | None:
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self._ttl
        if stale or kid not in self._keys:
            await self._refresh()
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        async with self._lock:
            now = self._clock()
            if self._attempted_at is not None and now - self._attempted_at < self._min_refetch:
                return  # rate limit: a fetch (or an attempt) was just made
            self._attempted_at = now
            self.fetches += 1
            try:
                keys = parse_jwks(await self._fetch())
            except Exception as exc:  # any failure keeps the previous keys
                log.warning("could not refresh the JWKS: %s", type(exc).__name__)
                return
            self._keys = keys
            self._fetched_at = now


def jwks_from_file(path: Path) -> Fetcher:
    async def fetch() -> Any:
        data = await asyncio.to_thread(path.read_bytes)
        if len(data) > MAX_JWKS_BYTES:
            raise ValueError("JWKS too large")
        return json.loads(data)

    return fetch


def jwks_from_url(url: str) -> Fetcher:
    async def fetch() -> Any:
        async with httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT_SECONDS, follow_redirects=False) as client:
            response = await client.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            if len(response.content) > MAX_JWKS_BYTES:
                raise ValueError("JWKS too large")
            return response.json()

    return fetch


# -- JWT --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JwtPolicy:
    issuer: str
    audience: str


def _segment_json(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(segment))
    except ValueError:
        raise IdentityDenied("jwt_malformed") from None
    if not isinstance(value, dict):
        raise IdentityDenied("jwt_malformed")
    return value


def _verify_signature(alg: str, key: PublicKey, signing_input: bytes, signature: bytes) -> bool:
    try:
        if alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
            return True
        if alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey) and len(signature) == 64:
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
            return True
    except InvalidSignature:
        return False
    return False


def _number(claims: dict[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise IdentityDenied("jwt_malformed")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise IdentityDenied("jwt_malformed")
    return float(value)


class JwtVerifier:
    def __init__(
        self,
        policy: JwtPolicy,
        jwks: JwksCache,
        subjects: list[_SubjectEntry],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._jwks = jwks
        self._exact = {s.subject: s for s in subjects if not s.subject.endswith(":*")}
        self._namespaces = {s.subject.split(":")[2]: s for s in subjects if s.subject.endswith(":*")}
        self._clock = clock

    @property
    def jwks(self) -> JwksCache:
        return self._jwks

    async def verify(self, token: str) -> Principal:
        if not looks_like_jwt(token):
            raise IdentityDenied("jwt_malformed")
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = _segment_json(header_b64)
        alg = header.get("alg")
        if alg not in ALGORITHMS:  # "none", HS256 (public key as HMAC secret), PS*, ...: never
            raise IdentityDenied("jwt_bad_alg")
        if "crit" in header or "jku" in header or "x5u" in header or "jwk" in header:
            raise IdentityDenied("jwt_bad_header")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise IdentityDenied("jwt_unknown_kid")
        found = await self._jwks.key(kid)
        if found is None:
            raise IdentityDenied("jwt_unknown_kid")
        key_alg, key = found
        if key_alg != alg:
            raise IdentityDenied("jwt_bad_alg")
        try:
            signature = b64url_decode(signature_b64)
        except ValueError:
            raise IdentityDenied("jwt_malformed") from None
        if not _verify_signature(alg, key, f"{header_b64}.{payload_b64}".encode("ascii"), signature):
            raise IdentityDenied("jwt_bad_signature")
        claims = _segment_json(payload_b64)
        return self._check_claims(claims)

    def _check_claims(self, claims: dict[str, Any]) -> Principal:
        subject = claims.get("sub")
        match = _SA_RE.fullmatch(subject) if isinstance(subject, str) else None
        actor = Actor(type="agent", id=f"sa:{match.group(1)}/{match.group(2)}") if match else None
        if claims.get("iss") != self._policy.issuer:
            raise IdentityDenied("jwt_bad_issuer", actor)
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self._policy.audience not in [a for a in audiences if isinstance(a, str)]:
            raise IdentityDenied("jwt_bad_audience", actor)
        now = self._clock()
        exp = _number(claims, "exp", required=True)
        nbf = _number(claims, "nbf", required=False)
        iat = _number(claims, "iat", required=False)
        if exp is not None and now >= exp + LEEWAY_SECONDS:
            raise IdentityDenied("jwt_expired", actor)
        if nbf is not None and now < nbf - LEEWAY_SECONDS:
            raise IdentityDenied("jwt_not_yet_valid", actor)
        if iat is not None and iat > now + LEEWAY_SECONDS:
            raise IdentityDenied("jwt_not_yet_valid", actor)
        if match is None or actor is None:
            raise IdentityDenied("jwt_unknown_subject")
        entry = self._exact.get(str(subject)) or self._namespaces.get(match.group(1))
        if entry is None:
            raise IdentityDenied("jwt_unknown_subject", actor)
        return _principal(actor.id, entry)


# -- together ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identities:
    certs: CertPrincipals | None = None
    jwt: JwtVerifier | None = None


def load_identities(settings: Settings) -> Identities:
    """Read the principals and subjects files (at start: a bad file stops the process)."""
    certs = CertPrincipals.load(settings.cert_principals_file) if settings.cert_principals_file else None
    jwt = None
    if settings.jwt_issuer and settings.jwt_audience and settings.jwt_subjects_file:
        variable = "KMS_JWT_SUBJECTS_FILE"
        path = settings.jwt_subjects_file
        subjects = _validated(_SubjectEntry, _read_entries(path, variable), variable, path)
        if settings.jwt_jwks_file is not None:
            try:
                parse_jwks(json.loads(settings.jwt_jwks_file.read_bytes()))
            except OSError as exc:
                raise IdentityConfigError(
                    f"KMS_JWT_JWKS_FILE: cannot read {settings.jwt_jwks_file}: {exc.strerror}"
                ) from None
            except ValueError as exc:
                raise IdentityConfigError(f"KMS_JWT_JWKS_FILE: {settings.jwt_jwks_file}: {exc}") from None
            fetch = jwks_from_file(settings.jwt_jwks_file)
        else:
            assert settings.jwt_jwks_url is not None
            fetch = jwks_from_url(settings.jwt_jwks_url)
        jwt = JwtVerifier(
            JwtPolicy(issuer=settings.jwt_issuer, audience=settings.jwt_audience), JwksCache(fetch), subjects
        )
    return Identities(certs=certs, jwt=jwt)
