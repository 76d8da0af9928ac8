"""What the sync and async clients share: the operation specs, retries, auth, TLS, errors."""

from __future__ import annotations

import os
import random
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import certifi
import httpx

from kms_client.errors import (
    KmsError,
    KmsTransportError,
    RateLimited,
    TokenFileError,
    Unavailable,
    UnexpectedResponse,
    error_from_problem,
    parse_retry_after,
)

T = TypeVar("T")

StrPath = str | os.PathLike[str]
USER_AGENT = "kms-client-python/0.1.0"


@dataclass(frozen=True, slots=True)
class Op(Generic[T]):
    """One HTTP call and how to read its answer."""

    method: str
    path: str
    parse: Callable[[Any, int], T]
    json: Any = None
    params: Mapping[str, str | int] | None = None
    authenticated: bool = True
    retry: bool = True
    # Statuses besides 2xx whose JSON body is a result (health answers 503 with its report).
    ok_statuses: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of 503 and 429 answers (and of connections that could not be made).

    Delays are "full jitter" exponential backoff: attempt ``n`` (1-based) waits a random time in
    ``[0, min(max_backoff, initial_backoff * 2**(n-1))]``; when the server sends ``Retry-After``
    the wait is that many seconds plus such a jitter. At most ``max_attempts`` calls are made and
    no retry is started that would end after ``max_total`` seconds from the first call. Other
    4xx and 5xx answers are never retried.

    >>> RetryPolicy(max_attempts=1).max_attempts  # no retries at all
    1
    >>> 2.0 <= RetryPolicy().delay(3, 2.0, random.Random(7)) <= 2.0 + 0.4
    True
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    max_total: float = 30.0
    retry_connect_errors: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.max_total < 0:
            raise ValueError("backoff times must not be negative")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """The wait before attempt ``attempt + 1`` after attempt ``attempt`` failed retryably."""
        cap = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
        jitter = rng.uniform(0, cap)
        return jitter if retry_after is None else retry_after + jitter


def retryable(exc: KmsError, policy: RetryPolicy) -> bool:
    if isinstance(exc, Unavailable | RateLimited):
        return True
    return policy.retry_connect_errors and exc.code == "connect_error"


def next_delay(
    policy: RetryPolicy,
    exc: KmsError,
    attempt: int,
    elapsed: float,
    rng: random.Random,
) -> float | None:
    """Seconds to wait before retrying after ``exc`` on ``attempt``; None: give up and raise."""
    if attempt >= policy.max_attempts or not retryable(exc, policy):
        return None
    wait = policy.delay(attempt, exc.retry_after, rng)
    if elapsed + wait > policy.max_total:
        return None
    return wait


class TokenSource:
    """The bearer token: given directly, or read from a file and re-read whenever the file
    changes (inode, size or mtime), as Kubernetes does when it rotates a projected
    service-account token by swapping a symlink. Thread-safe."""

    def __init__(self, token: str | None = None, token_file: StrPath | None = None) -> None:
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        if token is not None and not token.strip():
            raise ValueError("token is empty")
        self._token = token.strip() if token is not None else None
        self._file = Path(token_file) if token_file is not None else None
        self._stamp: tuple[int, int, int, int] | None = None
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return self._token is not None or self._file is not None

    def get(self) -> str | None:
        if self._file is None:
            return self._token
        with self._lock:
            try:
                st = os.stat(self._file)
                stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if stamp != self._stamp or self._token is None:
                    token = self._file.read_text(encoding="utf-8").strip()
                    if not token:
                        raise TokenFileError(f"token file {self._file} is empty")
                    self._token, self._stamp = token, stamp
            except OSError as exc:
                raise TokenFileError(f"cannot read token file {self._file}: {exc.strerror or exc}") from None
            return self._token


def ssl_context(
    *,
    verify: bool = True,
    ca_bundle: StrPath | None = None,
    client_cert: StrPath | None = None,
    client_key: StrPath | None = None,
) -> ssl.SSLContext:
    """The TLS context: server verified against ``ca_bundle`` (default: certifi's bundle) unless
    ``verify`` is False; ``client_cert``/``client_key`` (PEM) for mutual TLS."""
    if client_key is not None and client_cert is None:
        raise ValueError("client_key given without client_cert")
    ctx = ssl.create_default_context(cafile=os.fspath(ca_bundle) if ca_bundle else certifi.where())
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        ctx.load_cert_chain(os.fspath(client_cert), os.fspath(client_key) if client_key else None)
    return ctx


def headers(tokens: TokenSource, op: Op[Any]) -> dict[str, str]:
    out = {"Accept": "application/json, application/problem+json", "User-Agent": USER_AGENT}
    if op.authenticated:
        token = tokens.get()
        if token is not None:
            out["Authorization"] = f"Bearer {token}"
    return out


def finish(op: Op[T], response: httpx.Response) -> T:
    """The parsed result of a read response, or the typed error it carries."""
    status = response.status_code
    if 200 <= status < 300 or status in op.ok_statuses:
        try:
            body = response.json()
        except ValueError:
            raise UnexpectedResponse(f"{op.method} {op.path}: response is not JSON", status=status) from None
        try:
            return op.parse(body, status)
        except KmsError as exc:
            exc.status = exc.status or status
            raise
    raise error_from_response(response)


def error_from_response(response: httpx.Response) -> KmsError:
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    body: Any = None
    if "json" in response.headers.get("Content-Type", ""):
        try:
            body = response.json()
        except ValueError:
            body = None
    if not isinstance(body, dict):
        text = response.text.strip()[:200] if response.text else ""
        body = {"status": response.status_code, "detail": text or response.reason_phrase}
    return error_from_problem(body, status=response.status_code, retry_after=retry_after)


def transport_error(exc: httpx.TransportError, op: Op[Any]) -> KmsError:
    if _caused_by_tls(exc):
        code = "tls_error"  # a certificate problem does not fix itself: never retried
    elif isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        code = "connect_error"  # the request never left: safe to retry whatever it was
    else:
        code = "transport_error"  # it may have been received: not retried
    return KmsTransportError(f"{op.method} {op.path}: {type(exc).__name__}: {exc}", code=code)


def _caused_by_tls(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


@dataclass
class ClientConfig:
    base_url: str
    tokens: TokenSource
    timeout: float
    retry: RetryPolicy
    verify: ssl.SSLContext
    rng: random.Random = field(default_factory=random.Random)
