"""The `pkcs11` provider: S wrapped inside a PKCS#11 HSM by a non-extractable AES-256 key.

Any PKCS#11 v2.40+ module works in principle (AWS CloudHSM, Thales Luna, Entrust nShield,
SoftHSM2); it is reached through python-pkcs11 (the `pkcs11` extra), imported lazily in
`connect()`. Only SoftHSM2 is exercised by the test suite.

HSM requirements
----------------
* The key: one AES-256 secret key object, found by ``key_label`` (unique among the token's AES
  keys) in the token labelled ``token_label``, with CKA_TOKEN=true, CKA_PRIVATE=true,
  **CKA_SENSITIVE=true and CKA_EXTRACTABLE=false** (the provider refuses any other key), and
  - mechanism ``aes-gcm`` (default): CKA_ENCRYPT=true and CKA_DECRYPT=true; the token must offer
    CKM_AES_GCM. Blob: ``0x01 || IV (12 random bytes) || ciphertext || tag (16)``, AAD = the
    encoded context (see `encode_context`).
  - mechanism ``aes-key-wrap-pad``: CKA_WRAP=true and CKA_UNWRAP=true; the token must offer
    RFC 5649 as CKM_AES_KEY_WRAP_KWP (0x210B, preferred) or CKM_AES_KEY_WRAP_PAD (0x210A), and
    must let the user create and read non-sensitive *session* objects (C_CreateObject of a
    CKK_GENERIC_SECRET with CKA_VALUE; C_UnwrapKey into one and reading its CKA_VALUE). HSMs with a
    "no clear secrets" policy (typical FIPS modes) refuse that: use ``aes-gcm`` there.
    Blob: ``0x02 || RFC 5649 wrap of (S || pad || HMAC-SHA256(S, context))``.
  If the key lacks the attribute for its mechanism, calls fail with ProviderKeyDisabled naming it.
* The role: a normal user (CKU_USER, the "crypto user") whose PIN is ``pin``. Wrap/unwrap need
  only a read-only session and that user's right to use the key; the security officer PIN is never
  used. BYOK (`create_import_key`, `import_wrapped_key`) also needs read/write sessions and the
  right to create token objects.
* Tokens must exist when the module is first loaded by the process: PKCS#11 modules (SoftHSM
  included) do not show tokens initialised afterwards until the service restarts.

Setup
-----
SoftHSM2 (development, CI)::

    export SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf   # directories.tokendir = /var/lib/softhsm/tokens
    softhsm2-util --init-token --free --label kek-token --so-pin <SO PIN> --pin <user PIN>
    python - <<'EOF'    # python-pkcs11; the attributes the provider requires
    import pkcs11
    from pkcs11 import Attribute as A, KeyType
    token = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so").get_token(token_label="kek-token")
    with token.open(rw=True, user_pin="<user PIN>") as session:
        session.generate_key(KeyType.AES, 256, label="tenant-kek", store=True, template={
            A.SENSITIVE: True, A.EXTRACTABLE: False, A.ENCRYPT: True, A.DECRYPT: True,
            A.WRAP: True, A.UNWRAP: True, A.SIGN: False, A.VERIFY: False})
    EOF
    # config: {"type": "pkcs11", "token_label": "kek-token", "key_label": "tenant-kek", "pin": "<user PIN>"}

  The slot number is random: the provider always opens the token by label. SoftHSM 2.6 quirks
  (see tests/providers/test_pkcs11.py): RFC 5649 is exposed as CKM_AES_KEY_WRAP_PAD, not _KWP,
  and its *wrap* zero-pads input to 8 bytes first (wrong MLI for unaligned input); the provider
  only ever wraps 8-byte-aligned payloads, so its blobs are exact RFC 5649 anyway. RSA-OAEP is
  SHA-1 only (BYOK with ``oaep_hash="sha1"``).

The vendor commands below follow the vendors' documentation and were not run here.

AWS CloudHSM (Client SDK 5): module ``/opt/cloudhsm/lib/libcloudhsm_pkcs11.so``; ``pin`` is
  ``<crypto user name>:<password>`` of a crypto user (CU) created with ``cloudhsm-cli user create
  --role crypto-user``; the token label is the one ``pkcs11-tool --module ... --list-slots`` shows.
  Create the key as that CU, e.g. ``cloudhsm-cli key generate-symmetric aes --label tenant-kek
  --key-length-bytes 32 --attributes encrypt=true decrypt=true wrap=true unwrap=true
  extractable=false``. CloudHSM generates AES-GCM IVs itself and writes them into the parameter
  buffer; the provider records the IV from that buffer, but this is untested here: validate the
  key (POST /v1/tenants/{t}/keys/{k}/validate) before production. CloudHSM offers several padded
  AES key wraps (RFC 5649 zero padding, PKCS #5 padding): check which one its
  CKM_AES_KEY_WRAP_PAD is before relying on ``aes-key-wrap-pad`` blobs being RFC 5649.
Thales Luna: module ``/usr/safenet/lunaclient/lib/libCryptoki2_64.so``; the token is the
  partition (its label); ``pin`` is the partition's Crypto User (use only) or Crypto Officer
  (needed to create keys and for BYOK) password. Create the key with e.g. ``cmu generatekey
  -keyType=AES -keySize=32 -label=tenant-kek -sensitive=1 -extractable=0 -encrypt=1 -decrypt=1
  -wrap=1 -unwrap=1``. Prefer ``aes-gcm``: partitions in FIPS-approved mode refuse the clear
  session objects ``aes-key-wrap-pad`` needs.
YubiHSM 2: not supported. Its PKCS#11 module offers AES-ECB/CBC and its own AES-CCM wrap keys but
  neither CKM_AES_GCM nor RFC 5649 for AES keys; `connect()` refuses with Pkcs11Unsupported.

Concurrency
-----------
python-pkcs11 initialises modules with ``C_Initialize(NULL)`` (no CKF_OS_LOCKING_OK), which allows
a module to assume a single thread: SoftHSM then disables its own mutexes and crashes under
concurrent calls. So every call into one module is serialised by a per-module lock, taken with
the caller's deadline; each provider keeps up to ``pool_size`` open sessions (opening one is
costly), handed out one per call, and runs calls on its own ``pool_size`` worker threads so a hung
HSM cannot starve the process's default executor. PKCS#11 login state is per process and token
(C_Logout in one session logs out every session), so one login per token is shared by every
provider and admin session of the process (`_Login`); a config whose PIN differs from the one that
logged in is refused. Connect providers after forking worker processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator

from providers.base import (
    KeyProvider,
    ProviderAccessDenied,
    ProviderConfig,
    ProviderCryptoError,
    ProviderError,
    ProviderHealth,
    ProviderInfo,
    ProviderKeyDisabled,
    ProviderKeyNotFound,
    ProviderUnavailable,
    WrapContext,
    context_mac,
    encode_context,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"

CKM_AES_GCM = 0x1087
CKM_AES_KEY_WRAP_PAD = 0x210A
CKM_AES_KEY_WRAP_KWP = 0x210B
_MECHANISM_NAMES = {
    CKM_AES_GCM: "CKM_AES_GCM",
    CKM_AES_KEY_WRAP_PAD: "CKM_AES_KEY_WRAP_PAD",
    CKM_AES_KEY_WRAP_KWP: "CKM_AES_KEY_WRAP_KWP",
}
_FORMAT_GCM = b"\x01"
_FORMAT_KWP = b"\x02"
_IV_LEN = 12
_TAG_LEN = 16
_MAC_LEN = 32
_ALIGN = 8
_UNWRAP_FAILED = "wrapped secret could not be unwrapped"

# python-pkcs11 exception class names, by what they mean to the caller.
_PIN_ERRORS = {
    "PinIncorrect": "PIN incorrect",
    "PinInvalid": "PIN has invalid characters",
    "PinLenRange": "PIN length out of range",
    "PinExpired": "PIN expired",
    "PinLocked": "PIN locked",
    "UserPinNotInitialized": "user PIN not initialised",
}
_LOGIN_CONFLICT = {"UserAlreadyLoggedIn", "AnotherUserAlreadyLoggedIn", "UserTooManyTypes"}
_SESSION_LOST = {
    "SessionHandleInvalid",
    "SessionClosed",
    "UserNotLoggedIn",
    "DeviceRemoved",
    "TokenNotPresent",
    "TokenNotRecognised",
}
_STALE_HANDLE = {
    "KeyHandleInvalid",
    "ObjectHandleInvalid",
    "WrappingKeyHandleInvalid",
    "UnwrappingKeyHandleInvalid",
}
_KEY_REFUSED = {
    "KeyTypeInconsistent",
    "WrappingKeyTypeInconsistent",
    "UnwrappingKeyTypeInconsistent",
    "KeySizeRange",
    "WrappingKeySizeRange",
    "UnwrappingKeySizeRange",
    "MechanismInvalid",
}
_CRYPTO = {
    "EncryptedDataInvalid",
    "EncryptedDataLenRange",
    "WrappedKeyInvalid",
    "WrappedKeyLenRange",
    "DataInvalid",
    "DataLenRange",
    "GeneralError",  # SoftHSM's answer to a bad GCM tag
    "FunctionFailed",
    "MechanismParamInvalid",
}
_POLICY = {
    "AttributeSensitive",
    "AttributeValueInvalid",
    "AttributeTypeInvalid",
    "AttributeReadOnly",
    "TemplateInconsistent",
    "TemplateIncomplete",
    "KeyUnextractable",
    "KeyNotWrappable",
}


def _p11() -> Any:
    """python-pkcs11, imported on first use (the config validates without it)."""
    try:
        import pkcs11
    except ImportError:
        raise ProviderUnavailable(
            "python-pkcs11 is not installed: install the service with its 'pkcs11' extra"
        ) from None
    return pkcs11


def _key_function_not_permitted(exc: BaseException) -> bool:
    # python-pkcs11 has no class for CKR_KEY_FUNCTION_NOT_PERMITTED (0x68): it raises
    # PKCS11Error("Unmapped error code 0x68").
    return type(exc).__name__ == "PKCS11Error" and str(exc).endswith(" 0x68")


def _not_initialised(exc: BaseException) -> bool:
    return type(exc).__name__ == "PKCS11Error" and "not initialized" in str(exc)


# --- context binding -----------------------------------------------------------------------------


_KWP_MAC_LABEL = ("kms/pkcs11/v1", "aes-key-wrap-pad context")


def _context_mac(secret: bytes, context: WrapContext) -> bytes:
    return context_mac(secret, context, *_KWP_MAC_LABEL)


# RFC 5649 (AES key wrap with padding) authenticates what it wraps but takes no associated data,
# so for ``aes-key-wrap-pad`` the context is bound inside the wrapped payload:
#
#     P = S || pad || HMAC-SHA256(key=S, msg=label || encode_context(context))
#
# and the HSM wraps P. Unwrapping checks RFC 5649's integrity value first (any change to the blob
# fails there, inside the HSM), then recomputes the MAC under the recovered S with the caller's
# context and compares in constant time: another context gives another MAC. Forging a blob for
# another context needs S to compute its MAC and the HSM key to wrap it. `pad` is 1..8 bytes of
# its own length, so len(P) is always a multiple of 8: RFC 5649's own padding is never used, which
# makes SoftHSM 2.6's faulty padding harmless and keeps blobs byte-identical across HSMs.
def _kwp_payload(secret: bytes, context: WrapContext) -> bytes:
    pad = _ALIGN - len(secret) % _ALIGN
    return secret + bytes([pad]) * pad + _context_mac(secret, context)


def _kwp_open(payload: bytes, context: WrapContext) -> bytes:
    if len(payload) < _ALIGN + _MAC_LEN or len(payload) % _ALIGN:
        raise ProviderCryptoError(_UNWRAP_FAILED)
    body, mac = payload[:-_MAC_LEN], payload[-_MAC_LEN:]
    pad = body[-1]
    if not 1 <= pad <= _ALIGN or body[-pad:] != bytes([pad]) * pad:
        raise ProviderCryptoError(_UNWRAP_FAILED)
    secret = body[:-pad]
    if not hmac.compare_digest(mac, _context_mac(secret, context)):
        raise ProviderCryptoError(_UNWRAP_FAILED)
    return secret


# --- config --------------------------------------------------------------------------------------


class Pkcs11Config(ProviderConfig):
    """`{"type": "pkcs11", "token_label": ..., "key_label": ..., "pin": ...}`: an AES-256 key
    inside a PKCS#11 token. ``pin`` is write-only."""

    type: Literal["pkcs11"] = "pkcs11"
    module_path: str = SOFTHSM_MODULE
    """Absolute path of the vendor's PKCS#11 module (shared library)."""
    token_label: Annotated[str, Field(min_length=1, max_length=32)]
    key_label: Annotated[str, Field(min_length=1, max_length=128)]
    """Label (CKA_LABEL) of a sensitive, non-extractable AES-256 key in that token."""
    pin: Annotated[SecretStr, Field(min_length=1, max_length=255)]
    """PIN of the token's normal user (the crypto user)."""
    mechanism: Literal["aes-key-wrap-pad", "aes-gcm"] = "aes-gcm"
    pool_size: Annotated[int, Field(ge=1, le=32)] = 4
    """Sessions (and worker threads) this provider keeps open."""

    secret_fields: ClassVar[frozenset[str]] = frozenset({"pin"})

    @field_validator("module_path")
    @classmethod
    def _absolute_module_path(cls, value: str) -> str:
        if "\x00" in value or not os.path.isabs(value) or os.path.normpath(value) != value:
            raise ValueError("must be an absolute, normalised path to the PKCS#11 module")
        return value

    @field_validator("token_label", "key_label")
    @classmethod
    def _printable_label(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("must contain printable characters only")
        if len(value.encode("utf-8")) > 128:
            raise ValueError("must be at most 128 bytes of UTF-8")
        return value

    @field_validator("token_label")
    @classmethod
    def _token_label_fits(cls, value: str) -> str:
        if len(value.encode("utf-8")) > 32:
            raise ValueError("must be at most 32 bytes of UTF-8 (the PKCS#11 token label size)")
        return value

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # Secret fields are left out altogether, not even masked.
        return [(name, value) for name, value in super().__repr_args__() if name not in self.secret_fields]

    async def connect(self, *, local_wrapping_key: bytes | None = None) -> KeyProvider:
        return await Pkcs11Provider.open(self)


class Pkcs11Unsupported(ProviderError):
    """The HSM does not offer what this configuration needs (a mechanism or its parameters)."""

    code = "provider_unsupported"


class Pkcs11LabelInUse(ProviderError):
    """BYOK: the token already holds a key with the requested label."""

    code = "provider_key_label_in_use"


# --- process-wide module and login state ---------------------------------------------------------


def _pin_mac(pin: str) -> bytes:
    return hmac.new(_PIN_MAC_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


_PIN_MAC_KEY = os.urandom(32)


@dataclass(frozen=True, slots=True)
class _Names:
    """What error messages may name: labels and the module path, never the PIN or data."""

    module_path: str
    token_label: str
    key_label: str

    def translate(self, exc: BaseException, *, doing: str, unwrapping: bool = False) -> ProviderError:
        """Map a python-pkcs11 (or other) exception to the provider error the caller acts on."""
        if isinstance(exc, ProviderError):
            return exc
        name = type(exc).__name__
        token, key = self.token_label, self.key_label
        if name == "NoSuchToken":
            return ProviderKeyNotFound(f"no token labelled {token!r} in PKCS#11 module {self.module_path}")
        if name == "MultipleTokensReturned":
            return ProviderError(f"several tokens are labelled {token!r}: token labels must be unique")
        if name == "NoSuchKey":
            return ProviderKeyNotFound(f"no AES secret key labelled {key!r} in token {token!r}")
        if name == "MultipleObjectsReturned":
            return ProviderError(
                f"several AES keys are labelled {key!r} in token {token!r}: labels must be unique"
            )
        if name in _PIN_ERRORS:
            return ProviderAccessDenied(f"token {token!r} refused the user login: {_PIN_ERRORS[name]}")
        if name in _LOGIN_CONFLICT:
            return ProviderAccessDenied(
                f"token {token!r} is already logged in by other code in this process, so the PIN "
                "cannot be verified; log in only through providers.pkcs11"
            )
        if _key_function_not_permitted(exc) or name in _KEY_REFUSED:
            return ProviderKeyDisabled(
                f"the HSM refused to {doing} with key {key!r} in token {token!r}: the key must be an "
                "AES key with CKA_ENCRYPT/CKA_DECRYPT (aes-gcm) or CKA_WRAP/CKA_UNWRAP "
                "(aes-key-wrap-pad) set to true, and the mechanism among its CKA_ALLOWED_MECHANISMS"
            )
        if name in _STALE_HANDLE:
            return ProviderKeyNotFound(f"key {key!r} in token {token!r} disappeared (destroyed?)")
        if unwrapping and name in _CRYPTO:
            return ProviderCryptoError(_UNWRAP_FAILED)
        if name in _POLICY:
            return ProviderKeyDisabled(
                f"the HSM policy of token {token!r} refused a session object needed to {doing} "
                f"({name}); HSMs that forbid clear secret objects need mechanism 'aes-gcm'"
            )
        if name in _SESSION_LOST or _not_initialised(exc):
            return ProviderUnavailable(f"token {token!r} is unavailable ({name})")
        return ProviderUnavailable(f"the HSM failed to {doing} on token {token!r} ({name})")


class _Module:
    """One loaded PKCS#11 module: its lock (every call into it holds it) and its logins."""

    def __init__(self, path: str, lib: Any) -> None:
        self.path = path
        self.lib = lib
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self._logins: dict[str, _Login] = {}

    @contextmanager
    def locked(self, deadline: float) -> Iterator[None]:
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ProviderUnavailable(
                f"the PKCS#11 module {self.path} stayed busy past the timeout (a call is stuck in it)"
            )
        try:
            yield
        finally:
            self.lock.release()

    def login_for(self, token_label: str) -> _Login:
        """The token's shared login (call with the lock held)."""
        login = self._logins.get(token_label)
        if login is None:
            login = self._logins[token_label] = _Login(self, token_label)
        return login


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()


def _module_for(path: str) -> _Module:
    with _MODULES_LOCK:
        module = _MODULES.get(path)
        if module is None:
            p11 = _p11()
            try:
                lib = p11.lib(path)
            except p11.PKCS11Error as exc:  # dlopen or C_Initialize failed; the text names the file
                raise ProviderUnavailable(f"could not load the PKCS#11 module: {exc}") from None
            module = _MODULES[path] = _Module(path, lib)
    if module.pid != os.getpid():
        raise ProviderUnavailable(
            f"the PKCS#11 module {path} was initialised in a parent process; connect after forking"
        )
    return module


class _Login:
    """The process's one C_Login on a token, shared by reference count.

    PKCS#11 keeps login state per application and token: a second C_Login answers
    CKR_USER_ALREADY_LOGGED_IN without checking the PIN, and C_Logout (which python-pkcs11 runs
    when closing a session opened with a PIN) logs out every session. So one "anchor" session
    holds the login while anyone uses the token; all other sessions are opened without a PIN and
    inherit it. A later user must present the PIN that logged in (compared as an HMAC under a
    per-process random key). All methods run with the module lock held.
    """

    def __init__(self, module: _Module, token_label: str) -> None:
        self.module = module
        self.token_label = token_label
        self.token: Any = None
        self._anchor: Any = None
        self._pin_mac: bytes | None = None
        self._users = 0

    def acquire(self, pin: str, names: _Names) -> Any:
        mac = _pin_mac(pin)
        if self._anchor is None:
            self._log_in(pin, mac)
        elif self._pin_mac is None or not hmac.compare_digest(mac, self._pin_mac):
            raise ProviderAccessDenied(f"token {names.token_label!r} refused the user login: PIN incorrect")
        self._users += 1
        return self.token

    def ensure(self, pin: str) -> bool:
        """Probe the login with C_Login: False if it holds, True if it had been lost (HSM reset,
        failover, a C_Logout elsewhere) and is restored now. PKCS#11 offers no other portable
        probe: a lost login shows up as private objects (our key) vanishing from C_FindObjects."""
        if self._pin_mac is None or not hmac.compare_digest(_pin_mac(pin), self._pin_mac):
            raise ProviderAccessDenied(f"token {self.token_label!r} refused the user login: PIN incorrect")
        try:
            probe = self.token.open(user_pin=pin)
        except Exception as exc:
            if type(exc).__name__ != "UserAlreadyLoggedIn":
                raise
            return False
        # The old anchor is abandoned, not closed: closing it would C_Logout this new login.
        self._anchor = probe
        log.warning("pkcs11: the login to token %r had been lost; logged in again", self.token_label)
        return True

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self._users = 0
            self._close_anchor()
            self._pin_mac = None

    def _log_in(self, pin: str, mac: bytes) -> None:
        token = self.module.lib.get_token(token_label=self.token_label)
        self._anchor = token.open(user_pin=pin)
        self.token, self._pin_mac = token, mac
        log.debug("pkcs11: logged in to token %r", self.token_label)

    def _close_anchor(self) -> None:
        anchor, self._anchor = self._anchor, None
        if anchor is not None:
            try:
                anchor.close()  # C_Logout + C_CloseSession
            except Exception as exc:
                log.debug(
                    "pkcs11: closing the login session of %r failed: %s", self.token_label, type(exc).__name__
                )


@contextmanager
def token_session(config: Pkcs11Config, *, rw: bool = False, timeout: float | None = None) -> Iterator[Any]:
    """A python-pkcs11 session on ``config``'s token, logged in as its user through the shared
    login, holding the module lock for the whole block. For administration (BYOK, tests): it
    blocks, so call it from a worker thread in async code. Errors while opening are translated
    to provider errors; errors inside the block are the caller's."""
    names = _Names(config.module_path, config.token_label, config.key_label)
    deadline = time.monotonic() + (config.timeout_seconds if timeout is None else timeout)
    module = _module_for(config.module_path)
    with module.locked(deadline):
        login = module.login_for(config.token_label)
        try:
            token = login.acquire(config.pin.get_secret_value(), names)
        except Exception as exc:
            raise names.translate(exc, doing="log in") from None
        try:
            try:
                session = token.open(rw=rw)
            except Exception as exc:
                raise names.translate(exc, doing="open a session") from None
            try:
                yield session
            finally:
                _close_quietly(session)
        finally:
            login.release()


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except Exception as exc:
        log.debug("pkcs11: closing a session failed: %s", type(exc).__name__)


def _destroy_quietly(obj: Any) -> None:
    try:
        obj.destroy()
    except Exception as exc:
        log.warning("pkcs11: could not destroy a session object: %s", type(exc).__name__)


async def _in_thread(fn: Callable[[], T], *, limit: float, doing: str) -> T:
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn), limit)
    except TimeoutError:
        raise ProviderUnavailable(f"the HSM did not {doing} within {limit:g} s") from None


# --- the provider --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    """A pooled session and the key object found through it."""

    session: Any = None
    key: Any = None


class Pkcs11Provider(KeyProvider):
    type: ClassVar[str] = "pkcs11"

    def __init__(
        self,
        config: Pkcs11Config,
        *,
        module: _Module,
        login: _Login,
        mechanism_id: int,
        token_info: dict[str, str],
    ) -> None:
        self._config = config
        self._names = _Names(config.module_path, config.token_label, config.key_label)
        self._module = module
        self._login = login
        self._mechanism_id = mechanism_id
        self._token_info = token_info
        self._executor = ThreadPoolExecutor(max_workers=config.pool_size, thread_name_prefix="pkcs11")
        self._idle: list[_Slot] = []
        self._slots_lock = threading.Lock()
        self._closed = False
        self._released = False
        self.sessions_opened = 0
        """Sessions this provider has opened so far; a healthy pool opens at most pool_size."""

    @classmethod
    async def open(cls, config: Pkcs11Config) -> Pkcs11Provider:
        names = _Names(config.module_path, config.token_label, config.key_label)
        deadline = time.monotonic() + config.timeout_seconds

        def connect() -> Pkcs11Provider:
            module = _module_for(config.module_path)
            with module.locked(deadline):
                login = module.login_for(config.token_label)
                try:
                    token = login.acquire(config.pin.get_secret_value(), names)
                except Exception as exc:
                    raise names.translate(exc, doing="log in") from None
                try:
                    mechanism_id = _choose_mechanism(token, config.mechanism, names)
                    info = {"token_manufacturer": token.manufacturer_id, "token_model": token.model}
                except BaseException as exc:
                    login.release()
                    raise names.translate(exc, doing="list mechanisms") from None
            return cls(config, module=module, login=login, mechanism_id=mechanism_id, token_info=info)

        return await _in_thread(connect, limit=config.timeout_seconds, doing="connect")

    def __repr__(self) -> str:
        return (
            f"Pkcs11Provider(token={self._config.token_label!r}, key={self._config.key_label!r}, "
            f"mechanism={self._config.mechanism!r})"
        )

    # The contract ----------------------------------------------------------------------------

    async def wrap(self, secret: bytes, *, context: WrapContext) -> bytes:
        p11 = _p11()
        mechanism = p11.Mechanism(self._mechanism_id)
        if self._mechanism_id == CKM_AES_GCM:
            aad = encode_context(context)

            def gcm_wrap(key: Any) -> bytes:
                # A fresh object: HSMs that generate GCM IVs themselves (CloudHSM) write theirs
                # into this buffer, which python-pkcs11 hands over as pIv.
                iv = os.urandom(_IV_LEN)
                sealed = key.encrypt(secret, mechanism=mechanism, mechanism_param=p11.GCMParams(iv, aad))
                return _FORMAT_GCM + iv + bytes(sealed)

            return await self._call(gcm_wrap, doing="wrap")

        payload = _kwp_payload(secret, context)

        def kwp_wrap(key: Any) -> bytes:
            A = p11.Attribute  # noqa: N806
            plain = key.session.create_object(
                {
                    A.CLASS: p11.ObjectClass.SECRET_KEY,
                    A.KEY_TYPE: p11.KeyType.GENERIC_SECRET,
                    A.VALUE: payload,
                    A.TOKEN: False,
                    A.PRIVATE: True,
                    A.SENSITIVE: False,
                    A.EXTRACTABLE: True,
                }
            )
            try:
                return _FORMAT_KWP + bytes(key.wrap_key(plain, mechanism=mechanism))
            finally:
                _destroy_quietly(plain)

        return await self._call(kwp_wrap, doing="wrap")

    async def unwrap(self, blob: bytes, *, context: WrapContext) -> bytes:
        p11 = _p11()
        mechanism = p11.Mechanism(self._mechanism_id)
        if self._mechanism_id == CKM_AES_GCM:
            if len(blob) < 1 + _IV_LEN + _TAG_LEN or blob[:1] != _FORMAT_GCM:
                raise ProviderCryptoError(_UNWRAP_FAILED)
            iv, sealed, aad = blob[1 : 1 + _IV_LEN], blob[1 + _IV_LEN :], encode_context(context)

            def gcm_unwrap(key: Any) -> bytes:
                return bytes(key.decrypt(sealed, mechanism=mechanism, mechanism_param=p11.GCMParams(iv, aad)))

            return await self._call(gcm_unwrap, doing="unwrap", unwrapping=True)

        wrapped = blob[1:]
        if blob[:1] != _FORMAT_KWP or len(wrapped) < _ALIGN + _ALIGN + _MAC_LEN or len(wrapped) % _ALIGN:
            raise ProviderCryptoError(_UNWRAP_FAILED)

        def kwp_unwrap(key: Any) -> bytes:
            A = p11.Attribute  # noqa: N806
            plain = key.unwrap_key(
                p11.ObjectClass.SECRET_KEY,
                p11.KeyType.GENERIC_SECRET,
                wrapped,
                mechanism=mechanism,
                template={A.TOKEN: False, A.PRIVATE: True, A.SENSITIVE: False, A.EXTRACTABLE: True},
            )
            try:
                return bytes(plain[A.VALUE])
            finally:
                _destroy_quietly(plain)

        payload = await self._call(kwp_unwrap, doing="unwrap", unwrapping=True)
        return _kwp_open(payload, context)

    async def describe(self) -> ProviderInfo:
        return ProviderInfo(
            type=self.type,
            key_ref=f"{self._config.token_label}/{self._config.key_label}",
            hsm_backed=True,
            details={
                "mechanism": self._config.mechanism,
                "pkcs11_mechanism": _MECHANISM_NAMES.get(self._mechanism_id, hex(self._mechanism_id)),
                "module": self._config.module_path,
                **self._token_info,
            },
        )

    async def health(self) -> ProviderHealth:
        start = time.perf_counter()
        try:
            await self._call(lambda key: None, doing="find the key", refresh_key=True)
        except ProviderError as exc:
            return ProviderHealth(ok=False, latency_ms=(time.perf_counter() - start) * 1000, detail=str(exc))
        except Exception as exc:  # never raises
            detail = f"unexpected {type(exc).__name__}"
            return ProviderHealth(ok=False, latency_ms=(time.perf_counter() - start) * 1000, detail=detail)
        return ProviderHealth(ok=True, latency_ms=(time.perf_counter() - start) * 1000)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + self._config.timeout_seconds

        def release() -> None:
            with self._module.locked(deadline):
                with self._slots_lock:
                    idle, self._idle = self._idle, []
                for slot in idle:
                    self._discard(slot)
                if not self._released:
                    self._released = True
                    self._login.release()

        try:
            await _in_thread(release, limit=self._config.timeout_seconds, doing="close")
        except ProviderError as exc:  # close never raises; sessions then end with the process
            log.warning("pkcs11: closing %r left sessions open: %s", self, exc)

    # Machinery -------------------------------------------------------------------------------

    async def _call(
        self, op: Callable[[Any], T], *, doing: str, unwrapping: bool = False, refresh_key: bool = False
    ) -> T:
        """Run ``op(key)`` on a pooled session in a worker thread, within timeout_seconds."""
        if self._closed:
            raise ProviderUnavailable("the pkcs11 provider is closed")
        timeout = self._config.timeout_seconds
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(
                self._executor, self._work, op, deadline, doing, unwrapping, refresh_key
            )
        except RuntimeError:  # executor shut down by close()
            raise ProviderUnavailable("the pkcs11 provider is closed") from None
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ProviderUnavailable(
                f"the HSM did not {doing} within {timeout:g} s (token {self._config.token_label!r})"
            ) from None

    def _work(
        self, op: Callable[[Any], T], deadline: float, doing: str, unwrapping: bool, refresh_key: bool
    ) -> T:
        if time.monotonic() >= deadline:  # queued behind a stuck call; the caller has given up
            raise ProviderUnavailable(f"the HSM did not {doing} in time")
        with self._slots_lock:
            slot = self._idle.pop() if self._idle else _Slot()
        try:
            with self._module.locked(deadline):
                if time.monotonic() >= deadline:  # got the module too late: the caller is gone
                    raise ProviderUnavailable(f"the HSM did not {doing} in time")
                try:
                    if refresh_key:
                        slot.key = None
                    return self._attempt(slot, op, doing, unwrapping)
                finally:
                    if self._closed:
                        self._discard(slot)
        finally:
            if slot.session is not None and not self._closed:
                with self._slots_lock:
                    self._idle.append(slot)

    def _attempt(self, slot: _Slot, op: Callable[[Any], T], doing: str, unwrapping: bool) -> T:
        refound = relogged = False
        while True:
            try:
                if slot.session is None:
                    slot.session = self._login.token.open()
                    self.sessions_opened += 1
                if slot.key is None:
                    slot.key = self._find_key(slot.session)
                return op(slot.key)
            except ProviderError:
                raise
            except Exception as exc:
                name = type(exc).__name__
                if name in _STALE_HANDLE and not refound:
                    refound = True  # the object was replaced, or the handle belongs to a lost login
                    slot.key = None
                    continue
                lost_session = name in _SESSION_LOST or _not_initialised(exc)
                if not relogged and (lost_session or name in _STALE_HANDLE or name == "NoSuchKey"):
                    relogged = True
                    if lost_session:
                        self._discard(slot)
                    try:
                        restored = self._login.ensure(self._config.pin.get_secret_value())
                    except Exception as again:
                        raise self._names.translate(again, doing="log in") from None
                    if restored or lost_session:
                        slot.key = None
                        continue
                error = self._names.translate(exc, doing=doing, unwrapping=unwrapping)
                log.debug("pkcs11: %s failed: %s -> %s", doing, name, error.code)
                raise error from None

    def _find_key(self, session: Any) -> Any:
        p11 = _p11()
        A = p11.Attribute  # noqa: N806
        key = session.get_key(
            object_class=p11.ObjectClass.SECRET_KEY, key_type=p11.KeyType.AES, label=self._config.key_label
        )
        uses = (A.ENCRYPT, A.DECRYPT) if self._mechanism_id == CKM_AES_GCM else (A.WRAP, A.UNWRAP)
        attrs = key.get_attributes([A.SENSITIVE, A.EXTRACTABLE, *uses])
        where = f"key {self._config.key_label!r} in token {self._config.token_label!r}"
        if not attrs[A.SENSITIVE] or attrs[A.EXTRACTABLE]:
            raise ProviderKeyDisabled(
                f"{where} is extractable or not sensitive; this provider only uses keys with "
                "CKA_SENSITIVE=true and CKA_EXTRACTABLE=false"
            )
        missing = [f"CKA_{attr.name}" for attr in uses if not attrs[attr]]
        if missing:
            raise ProviderKeyDisabled(
                f"{where} cannot be used with mechanism {self._config.mechanism!r}: "
                f"set {' and '.join(missing)} to true"
            )
        return key

    def _discard(self, slot: _Slot) -> None:
        if slot.session is not None:
            _close_quietly(slot.session)  # opened without a PIN: no C_Logout
        slot.session = slot.key = None


def _choose_mechanism(token: Any, mechanism: str, names: _Names) -> int:
    offered = {int(m) for m in token.slot.get_mechanisms()}
    if mechanism == "aes-gcm":
        if CKM_AES_GCM in offered:
            return CKM_AES_GCM
        raise Pkcs11Unsupported(
            f"token {names.token_label!r} does not offer CKM_AES_GCM: use 'aes-key-wrap-pad'"
        )
    for candidate in (CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_PAD):
        if candidate in offered:
            return candidate
    raise Pkcs11Unsupported(
        f"token {names.token_label!r} offers neither CKM_AES_KEY_WRAP_KWP nor CKM_AES_KEY_WRAP_PAD: "
        "use 'aes-gcm'"
    )


# --- BYOK: customer key material unwrapped inside the HSM ----------------------------------------


def import_key_label(public_key_der: bytes) -> str:
    """The label `create_import_key` gives the import key pair whose public key is this DER."""
    return "kms-import-" + hashlib.sha256(public_key_der).hexdigest()[:32]


async def create_import_key(config: Pkcs11Config, *, bits: Literal[3072, 4096] = 3072) -> bytes:
    """Generate an RSA import key pair inside ``config``'s token and return its public key
    (SubjectPublicKeyInfo DER). The private key is a token object with CKA_SENSITIVE=true,
    CKA_EXTRACTABLE=false and CKA_UNWRAP=true only; both halves are labelled
    ``import_key_label(der)``. The customer wraps their 32-byte AES key to it with RSA-OAEP
    and hands the result to `import_wrapped_key`."""
    names = _Names(config.module_path, config.token_label, config.key_label)

    def generate() -> bytes:
        p11 = _p11()
        A = p11.Attribute  # noqa: N806
        with token_session(config, rw=True, timeout=_BYOK_TIMEOUT) as session:
            try:
                public, private = session.generate_keypair(
                    p11.KeyType.RSA,
                    bits,
                    label="kms-import-pending-" + os.urandom(8).hex(),
                    store=True,
                    public_template={A.ENCRYPT: True, A.WRAP: True, A.VERIFY: False},
                    private_template={
                        A.PRIVATE: True,
                        A.SENSITIVE: True,
                        A.EXTRACTABLE: False,
                        A.UNWRAP: True,
                        A.DECRYPT: False,
                        A.SIGN: False,
                        A.DERIVE: False,
                    },
                )
            except Exception as exc:
                raise names.translate(exc, doing="generate the import key pair") from None
            try:
                der = _rsa_public_der(public[A.MODULUS], public[A.PUBLIC_EXPONENT])
                label = import_key_label(der)
                public[A.LABEL] = label
                private[A.LABEL] = label
            except Exception as exc:
                _destroy_quietly(public)
                _destroy_quietly(private)
                raise names.translate(exc, doing="label the import key pair") from None
            log.info("pkcs11: created import key %s in token %r", label, config.token_label)
            return der

    return await _in_thread(generate, limit=_BYOK_TIMEOUT, doing="create the import key")


async def import_wrapped_key(
    config: Pkcs11Config,
    *,
    import_key_label: str,
    wrapped_key: bytes,
    new_key_label: str,
    oaep_hash: Literal["sha256", "sha1"] = "sha256",
) -> Pkcs11Config:
    """Unwrap customer key material (32 bytes, RSA-OAEP-wrapped to the public key of the import
    key labelled ``import_key_label``, MGF1 with the same hash, no label) inside the token into a
    new AES-256 token key ``new_key_label``: sensitive, non-extractable, usable for ENCRYPT,
    DECRYPT, WRAP and UNWRAP. The plaintext never leaves the HSM. Returns ``config`` pointed at
    the new key. Raises Pkcs11LabelInUse if the label is taken, ProviderKeyNotFound without the
    import key, ProviderCryptoError if the material does not unwrap, Pkcs11Unsupported if the HSM
    lacks OAEP with ``oaep_hash`` (SoftHSM 2.6 implements SHA-1 only)."""
    try:
        new_config = Pkcs11Config.model_validate({**config.model_dump(), "key_label": new_key_label})
    except ValidationError as exc:  # its text would echo the config; the messages alone are safe
        problems = "; ".join(str(error["msg"]) for error in exc.errors())
        raise ValueError(f"new_key_label is not a valid key label: {problems}") from None
    names = _Names(config.module_path, config.token_label, new_key_label)

    def unwrap() -> None:
        p11 = _p11()
        A = p11.Attribute  # noqa: N806
        with token_session(config, rw=True, timeout=_BYOK_TIMEOUT) as session:
            try:
                private = session.get_key(
                    object_class=p11.ObjectClass.PRIVATE_KEY, key_type=p11.KeyType.RSA, label=import_key_label
                )
                taken = any(
                    True
                    for _ in session.get_objects(
                        {A.CLASS: p11.ObjectClass.SECRET_KEY, A.LABEL: new_key_label}
                    )
                )
            except Exception as exc:
                if type(exc).__name__ == "NoSuchKey":
                    raise ProviderKeyNotFound(
                        f"no RSA import key labelled {import_key_label!r} in token {config.token_label!r}"
                    ) from None
                raise names.translate(exc, doing="find the import key") from None
            if taken:
                raise Pkcs11LabelInUse(
                    f"token {config.token_label!r} already holds a key labelled {new_key_label!r}"
                )
            digest, mgf = (
                (p11.Mechanism.SHA256, p11.MGF.SHA256)
                if oaep_hash == "sha256"
                else (p11.Mechanism.SHA_1, p11.MGF.SHA1)
            )
            try:
                key = private.unwrap_key(
                    p11.ObjectClass.SECRET_KEY,
                    p11.KeyType.AES,
                    wrapped_key,
                    label=new_key_label,
                    store=True,
                    mechanism=p11.Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=(digest, mgf, None),
                    template={
                        A.TOKEN: True,
                        A.PRIVATE: True,
                        A.SENSITIVE: True,
                        A.EXTRACTABLE: False,
                        A.ENCRYPT: True,
                        A.DECRYPT: True,
                        A.WRAP: True,
                        A.UNWRAP: True,
                        A.SIGN: False,
                        A.VERIFY: False,
                        A.DERIVE: False,
                    },
                )
            except Exception as exc:
                name = type(exc).__name__
                if name in {"ArgumentsBad", "MechanismParamInvalid"}:
                    raise Pkcs11Unsupported(
                        f"token {config.token_label!r} does not support RSA-OAEP with {oaep_hash.upper()} "
                        "for C_UnwrapKey; wrap the key material with another OAEP hash and pass "
                        "that as oaep_hash"
                    ) from None
                if name in _CRYPTO:
                    raise ProviderCryptoError(
                        "the key material did not unwrap with the import key (other public key, "
                        "OAEP hash or corrupted data)"
                    ) from None
                raise names.translate(exc, doing="unwrap the key material") from None
            try:
                length = int(key[A.VALUE_LEN])
            except Exception:
                length = 0
            if length not in (0, 32):  # 0: the HSM does not report it (SoftHSM 2.6 after C_UnwrapKey)
                _destroy_quietly(key)
                raise ProviderCryptoError(
                    f"the key material is {length} bytes; an AES-256 key (32 bytes) is required"
                )
            log.info("pkcs11: imported key %r into token %r", new_key_label, config.token_label)

    await _in_thread(unwrap, limit=_BYOK_TIMEOUT, doing="import the key material")
    return new_config


_BYOK_TIMEOUT = 60.0  # RSA key generation in an HSM can take seconds; admin operations only


def _rsa_public_der(modulus: bytes, exponent: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    numbers = RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big"))
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
