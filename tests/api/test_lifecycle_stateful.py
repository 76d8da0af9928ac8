"""Issue 4: a stateful property test of the key lifecycle (DESIGN §4), through the service layer
(KeyService, DataPlane, Scheduler, UsageRecorder), on SQLite and PostgreSQL.

Random sequences of rotate / key disable+enable / version transitions / min_decryption_version
(with and without force) / destroy-due and automatic rotation (by moving the scheduler's injected
clock) / derive / encrypt / decrypt run against a small reference model. After every step the
stored key must equal the model: no illegal transition is accepted, no destroyed or disabled
version derives or decrypts, and the primary is the newest enabled version at or above
min_decryption_version. At the end of each example the audit chain verifies.

One database per test run; each example works on a fresh key in it, so examples stay independent.
The example budget is modest (30 examples x 15 steps per database).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

from kms_service.app import Services, build_services
from kms_service.audit.verify import verify_chain
from kms_service.audit.writer import utcnow
from kms_service.auth.principal import Operation, Principal, Role
from kms_service.dataplane.service import CiphertextItem, DeriveItem, EncryptItem
from kms_service.errors import (
    DecryptionFailedError,
    InvalidRequest,
    InvalidStateTransition,
    KeyDisabled,
    KeyVersionBelowMinimum,
    KeyVersionDisabled,
    NoPrimaryVersion,
    NotFound,
    ServiceError,
    WouldCutOffIds,
)
from kms_service.install import InitResult
from kms_service.keys.service import TRANSITIONS
from kms_service.request import Actx, RequestMeta
from kms_service.settings import Settings

T = TypeVar("T")
TENANT = "prop"
ADMIN = Principal(token_id="prop-admin", role=Role.ADMIN)
CTX = Actx(actor=ADMIN.actor, meta=RequestMeta(request_id=None, source="hypothesis"))
META = RequestMeta(request_id=None, source="hypothesis")
PERIOD_DAYS = 10
IDS = ["vol-a", "vol-b", "vol-c"]


@dataclass
class Model:
    key_enabled: bool = True
    states: dict[int, str] = field(default_factory=lambda: {1: "enabled"})
    destroy_at: dict[int, datetime] = field(default_factory=dict)
    min_version: int = 1
    next_rotation_at: datetime | None = None
    usage: dict[str, int] = field(default_factory=dict)  # id -> newest version derived
    deks: dict[tuple[int, str], str] = field(default_factory=dict)
    ciphertexts: list[tuple[str, int, bytes]] = field(default_factory=list)

    @property
    def latest(self) -> int:
        return max(self.states)

    @property
    def primary(self) -> int | None:
        ok = [v for v, s in self.states.items() if s == "enabled" and v >= self.min_version]
        return max(ok) if ok else None

    def usable_error(self, version: int) -> type[ServiceError] | None:
        """The error a derive/decrypt with ``version`` must fail with, or None if it may succeed."""
        if not self.key_enabled:
            return KeyDisabled
        if self.states[version] != "enabled":
            return KeyVersionDisabled
        if version < self.min_version:
            return KeyVersionBelowMinimum
        return None


def _name(error: type[ServiceError] | None) -> str:
    return "success" if error is None else error.__name__


def run_machine(settings: Settings) -> None:
    loop = asyncio.new_event_loop()

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return loop.run_until_complete(coro)

    async def start() -> Services:
        services = await build_services(settings)
        services.batcher.start()
        await services.tenants.create(CTX, tenant_id=TENANT, name="Property")
        return services

    def outcome(coro: Coroutine[Any, Any, T]) -> tuple[T | None, ServiceError | None]:
        try:
            return run(coro), None
        except ServiceError as exc:
            return None, exc

    svc = run(start())
    names = (f"k{i}" for i in itertools.count())

    class Lifecycle(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.key = next(names)
            self.model = Model()
            self.offset = timedelta(0)
            meta = run(
                svc.keys.create(
                    CTX,
                    tenant=TENANT,
                    name=self.key,
                    provider={"type": "local"},
                    rotation_period_days=PERIOD_DAYS,
                )
            )
            self.model.next_rotation_at = meta.next_rotation_at

        def expect(self, error: type[ServiceError] | None, coro: Coroutine[Any, Any, T]) -> T | None:
            """Run ``coro``; it must raise exactly ``error`` (or succeed when None)."""
            result, exc = outcome(coro)
            got = type(exc) if exc is not None else None
            assert got is error, f"got {_name(got)}, the model expects {_name(error)}"
            return result

        # -- management --------------------------------------------------------------------

        @rule()
        def rotate(self) -> None:
            meta = run(svc.keys.rotate(CTX, tenant=TENANT, key=self.key))
            self.model.states[self.model.latest + 1] = "enabled"
            self.model.next_rotation_at = meta.next_rotation_at

        @rule(enabled=st.booleans())
        def key_state(self, enabled: bool) -> None:
            error = InvalidStateTransition if enabled == self.model.key_enabled else None
            if self.expect(error, svc.keys.set_key_state(CTX, tenant=TENANT, key=self.key, enabled=enabled)):
                self.model.key_enabled = enabled

        @rule(
            pick=st.integers(min_value=1, max_value=8),
            action=st.sampled_from(sorted(TRANSITIONS)),
            days=st.integers(min_value=7, max_value=20),
        )
        def transition(self, pick: int, action: str, days: int) -> None:
            version = min(pick, self.model.latest + 1)
            waiting = days if action == "schedule-destruction" else None
            allowed, target, _ = TRANSITIONS[action]
            current = self.model.states.get(version)
            error: type[ServiceError] | None
            if current is None:
                error = NotFound
            elif current not in {s.value for s in allowed}:
                error = InvalidStateTransition
            else:
                error = None
            meta = self.expect(
                error,
                svc.keys.transition(
                    CTX,
                    tenant=TENANT,
                    key=self.key,
                    version=version,
                    action=action,
                    waiting_period_days=waiting,
                ),
            )
            if meta is not None:
                self.model.states[version] = target.value
                if target.value == "scheduled_for_destruction":
                    destroy_at = meta.versions[version].destroy_at
                    assert destroy_at is not None
                    assert destroy_at >= utcnow() + timedelta(days=days, minutes=-1)
                    self.model.destroy_at[version] = destroy_at
                else:
                    self.model.destroy_at.pop(version, None)

        @rule(pick=st.integers(min_value=1, max_value=8), force=st.booleans())
        def min_decryption_version(self, pick: int, force: bool) -> None:
            value = min(pick, self.model.latest + 1)
            cut_off = sum(1 for v in self.model.usage.values() if v < value)
            error: type[ServiceError] | None = None
            if value > self.model.latest:
                error = InvalidRequest
            elif value > self.model.min_version and cut_off and not force:
                error = WouldCutOffIds
            run(svc.usage.flush())
            changes = {"min_decryption_version": value}
            _, exc = outcome(svc.keys.update(CTX, tenant=TENANT, key=self.key, changes=changes, force=force))
            got = type(exc) if exc is not None else None
            assert got is error, f"got {_name(got)}, the model expects {_name(error)}"
            if exc is not None:
                assert exc.extra == ({"cut_off": cut_off} if error is WouldCutOffIds else {})
            else:
                self.model.min_version = value

        @rule(days=st.integers(min_value=0, max_value=12))
        def advance_and_run_scheduler(self, days: int) -> None:
            self.offset += timedelta(days=days)
            now = utcnow() + self.offset
            svc.scheduler.clock = lambda: now
            result = run(svc.scheduler.run_once())
            due = sorted(v for v, at in self.model.destroy_at.items() if at <= now)
            for version in due:
                self.model.states[version] = "destroyed"
                del self.model.destroy_at[version]
            assert sorted(v for t, k, v in result.destroyed if k == self.key) == due
            rotated = [v for t, k, v in result.rotated if k == self.key]
            nxt = self.model.next_rotation_at
            if self.model.key_enabled and nxt is not None and nxt <= now:
                assert rotated == [self.model.latest + 1]
                self.model.states[self.model.latest + 1] = "enabled"
                self.model.next_rotation_at = now + timedelta(days=PERIOD_DAYS)
            else:
                assert rotated == []
            for version in due:  # crypto-shredded in the database
                row = run(self.version_row(version))
                assert row == ("destroyed", None, None), row

        async def version_row(self, version: int) -> tuple[Any, ...]:
            async with svc.db.engine.connect() as conn:
                row = (
                    await conn.execute(
                        text(
                            "SELECT kv.state, kv.version_salt, kv.wrapped_secret FROM key_versions kv "
                            "JOIN keys k ON k.id = kv.key_id "
                            "WHERE k.tenant_id = :t AND k.name = :k AND kv.version = :v"
                        ),
                        {"t": TENANT, "k": self.key, "v": version},
                    )
                ).one()
            return tuple(row)

        # -- data plane --------------------------------------------------------------------

        @rule(dek_id=st.sampled_from(IDS), pick=st.none() | st.integers(min_value=1, max_value=8))
        def derive(self, dek_id: str, pick: int | None) -> None:
            version = None if pick is None else min(pick, self.model.latest + 1)
            error: type[ServiceError] | None
            if version is not None and version not in self.model.states:
                error = NotFound  # an unknown version is a 404 before anything else
            elif not self.model.key_enabled:
                error = KeyDisabled
            elif version is None:
                error = NoPrimaryVersion if self.model.primary is None else None
            else:
                error = self.model.usable_error(version)
            item = DeriveItem(id=dek_id, version=version)
            result = self.expect(
                error, svc.dataplane.run(ADMIN, META, TENANT, self.key, Operation.DERIVE, item)
            )
            if result is None:
                return
            expected_version = version if version is not None else self.model.primary
            assert result["version"] == expected_version
            assert result["latest_version"] == self.model.primary
            assert self.model.states[result["version"]] == "enabled"
            got = self.model.deks.setdefault((result["version"], dek_id), result["key"])
            assert got == result["key"], "a derived DEK changed"
            self.model.usage[dek_id] = max(self.model.usage.get(dek_id, 0), result["version"])

        @rule(data=st.binary(min_size=1, max_size=16))
        def encrypt(self, data: bytes) -> None:
            error: type[ServiceError] | None = None
            if not self.model.key_enabled:
                error = KeyDisabled
            elif self.model.primary is None:
                error = NoPrimaryVersion
            item = EncryptItem(plaintext=data)
            result = self.expect(
                error, svc.dataplane.run(ADMIN, META, TENANT, self.key, Operation.ENCRYPT, item)
            )
            if result is not None:
                assert result["version"] == self.model.primary
                self.model.ciphertexts.append((result["ciphertext"], result["version"], data))

        @precondition(lambda self: bool(self.model.ciphertexts))
        @rule(data=st.data())
        def decrypt(self, data: st.DataObject) -> None:
            ct, version, plaintext = data.draw(st.sampled_from(self.model.ciphertexts))
            error = self.model.usable_error(version)
            item = CiphertextItem(ciphertext=ct)
            result = self.expect(
                error, svc.dataplane.run(ADMIN, META, TENANT, self.key, Operation.DECRYPT, item)
            )
            if result is not None:
                assert self.model.states[version] == "enabled"
                assert result == {"plaintext": base64.b64encode(plaintext).decode(), "version": version}

        @rule()
        def decrypt_forged(self) -> None:
            forged = "kms:v1:" + base64.urlsafe_b64encode(bytes(16 + 12 + 16 + 4)).decode().rstrip("=")
            item = CiphertextItem(ciphertext=forged)
            self.expect(
                self.model.usable_error(1) or DecryptionFailedError,
                svc.dataplane.run(ADMIN, META, TENANT, self.key, Operation.DECRYPT, item),
            )

        # -- invariants --------------------------------------------------------------------

        @invariant()
        def stored_key_matches_the_model(self) -> None:
            meta = run(svc.keys.get(TENANT, self.key))
            assert meta.state.value == ("enabled" if self.model.key_enabled else "disabled")
            assert {v: m.state.value for v, m in meta.versions.items()} == self.model.states
            assert meta.min_decryption_version == self.model.min_version
            assert meta.primary_version == self.model.primary
            for version, m in meta.versions.items():
                shredded = m.version_salt is None and m.wrapped_secret is None
                assert shredded == (m.state.value == "destroyed"), (version, m)

        def teardown(self) -> None:
            result = run(verify_chain(svc.db, audit_key=svc.installation.audit_key.reveal()))
            assert result.valid, result

    try:
        run_state_machine_as_test(
            Lifecycle,
            settings=hsettings(
                max_examples=30,
                stateful_step_count=15,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:

        async def close() -> None:
            await svc.usage.stop()
            await svc.batcher.stop()
            await svc.pool.close()
            await svc.db.dispose()

        run(close())
        loop.close()


def test_lifecycle_against_a_reference_model(settings: Settings, installed: InitResult) -> None:
    run_machine(settings)
