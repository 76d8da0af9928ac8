"""kms_client against a real `kms serve`: every call, typed results and typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms_client import (
    AlreadyExists,
    AsyncKmsClient,
    CiphertextRequest,
    DataKey,
    DatakeyRequest,
    Decrypted,
    DecryptionFailed,
    DerivedKey,
    DeriveRequest,
    Encrypted,
    EncryptRequest,
    Forbidden,
    InvalidRequest,
    InvalidStateTransition,
    KeyVersionBelowMinimum,
    KeyVersionDisabled,
    KmsClient,
    NotFound,
    Unauthenticated,
    WouldCutOffIds,
)
from tests.clients.conftest import Live

pytestmark = pytest.mark.slow


def test_management_calls(live: Live) -> None:
    kms = live.admin
    tenant = live.tenant("mgmt")
    assert kms.get_tenant(tenant).name == "Mgmt"
    assert tenant in {t.id for t in kms.list_tenants()}
    with pytest.raises(AlreadyExists):
        kms.create_tenant(tenant, "again")

    key = kms.create_key(tenant, "volumes", rotation_period_days=90)
    assert (key.name, key.provider["type"], key.primary_version, key.rotation_period_days) == (
        "volumes",
        "local",
        1,
        90,
    )
    assert key.next_rotation_at is not None
    assert [k.name for k in kms.list_keys(tenant)] == ["volumes"]

    rotated = kms.rotate_key(tenant, "volumes", reason="test rotation")
    assert rotated.primary_version == 2 and [v.version for v in rotated.versions] == [1, 2]
    assert kms.update_key(tenant, "volumes", rotation_period_days=None).rotation_period_days is None
    assert kms.disable_version(tenant, "volumes", 1, reason="retire").version(1).state == "disabled"
    assert kms.enable_version(tenant, "volumes", 1).version(1).state == "enabled"
    scheduled = kms.schedule_version_destruction(tenant, "volumes", 1, waiting_period_days=7)
    assert scheduled.version(1).state == "scheduled_for_destruction" and scheduled.version(1).destroy_at
    assert kms.restore_version(tenant, "volumes", 1).version(1).state == "disabled"
    with pytest.raises(InvalidStateTransition):
        kms.restore_version(tenant, "volumes", 1)
    assert kms.update_key(tenant, "volumes", min_decryption_version=2).min_decryption_version == 2
    assert kms.get_key(tenant, "volumes").min_decryption_version == 2
    with pytest.raises(NotFound):
        kms.get_key(tenant, "nope")
    with pytest.raises(InvalidRequest):
        kms.create_key(tenant, "Bad Name")

    created = kms.create_token("auditor", "sdk test auditor", ttl_seconds=3600)
    assert created.token.startswith("kms_") and created.info.role == "auditor"
    assert created.info.expires_at is not None
    assert created.id in {t.id for t in kms.list_tokens()}
    with KmsClient(live.url, token=created.token) as auditor:
        check = auditor.verify_audit()
        assert check.valid and check.checked > 0 and check.first_invalid_seq is None
        events = list(auditor.iter_audit(tenant=tenant, page_size=2))
        actions = [e["action"] for e in events]
        assert "key.rotated" in actions and "key.version.restored" in actions
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        page = auditor.list_audit(tenant=tenant, action="key.rotated")
        assert [e["action"] for e in page.events] == ["key.rotated"]
        with pytest.raises(Forbidden):
            auditor.rotate_key(tenant, "volumes")
    assert kms.revoke_token(created.id).revoked_at is not None
    with KmsClient(live.url, token=created.token) as revoked, pytest.raises(Unauthenticated):
        revoked.verify_audit()

    health = kms.health()
    assert health.ok and health.database["ok"] is True
    assert len(kms.identity().cluster_id) == 32


def test_data_plane_calls_and_errors(live: Live, tmp_path: Path) -> None:
    tenant = live.tenant("dp", "volumes")
    token_file = live.agent_token_file(tenant, tmp_path)
    with KmsClient(live.url, token_file=token_file) as kms:
        dek = kms.derive(tenant, "volumes", "pg-data-0", length=64)
        assert isinstance(dek, DerivedKey) and len(dek.key) == 64 and dek.version == dek.latest_version == 1
        assert kms.derive(tenant, "volumes", "pg-data-0", length=64).key == dek.key
        assert kms.derive(tenant, "volumes", "pg-data-1", length=64).key != dek.key

        dk = kms.datakey(tenant, "volumes", context={"file": "a.env"})
        assert isinstance(dk, DataKey) and dk.plaintext is not None and len(dk.plaintext) == 32
        assert (
            kms.decrypt(tenant, "volumes", dk.ciphertext, context={"file": "a.env"}).plaintext == dk.plaintext
        )
        assert kms.datakey(tenant, "volumes", plaintext=False).plaintext is None

        ct = kms.encrypt(tenant, "volumes", b"db-password", context={"app": "billing"})
        assert isinstance(ct, Encrypted) and ct.ciphertext.startswith("kms:v1:")
        opened = kms.decrypt(tenant, "volumes", ct.ciphertext, context={"app": "billing"})
        assert opened == Decrypted(plaintext=b"db-password", version=1)
        with pytest.raises(DecryptionFailed) as caught:
            kms.decrypt(tenant, "volumes", ct.ciphertext, context={"app": "other"})
        assert (caught.value.status, caught.value.code) == (400, "decryption_failed")
        with pytest.raises(NotFound):
            kms.derive(tenant, "unknown-key", "x")
        with pytest.raises(InvalidRequest):
            kms.derive(tenant, "volumes", "bad id with spaces")
        with pytest.raises(Forbidden):
            kms.list_tenants()

        live.admin.rotate_key(tenant, "volumes")
        after = kms.derive(tenant, "volumes", "pg-data-0", length=64, version=1)
        assert (after.key, after.version, after.latest_version) == (dek.key, 1, 2)
        rewrapped = kms.rewrap(tenant, "volumes", ct.ciphertext, context={"app": "billing"})
        assert rewrapped.version == 2 and rewrapped.ciphertext.startswith("kms:v2:")

        derived = kms.derive_batch(tenant, "volumes", [DeriveRequest("a"), DeriveRequest("b", version=9)])
        assert isinstance(derived[0], DerivedKey) and derived[0].version == 2
        assert isinstance(derived[1], NotFound)
        enc = kms.encrypt_batch(
            tenant, "volumes", [EncryptRequest(b"one"), EncryptRequest(b"two", {"k": "v"})]
        )
        assert all(isinstance(e, Encrypted) for e in enc)
        dec = kms.decrypt_batch(
            tenant,
            "volumes",
            [
                CiphertextRequest(enc[0].ciphertext),  # type: ignore[union-attr]
                CiphertextRequest(enc[1].ciphertext),  # type: ignore[union-attr]  (wrong context)
                CiphertextRequest(enc[1].ciphertext, {"k": "v"}),  # type: ignore[union-attr]
            ],
        )
        assert [type(d) for d in dec] == [Decrypted, DecryptionFailed, Decrypted]
        assert [d.plaintext for d in dec if isinstance(d, Decrypted)] == [b"one", b"two"]
        keys = kms.datakey_batch(tenant, "volumes", [DatakeyRequest(16), DatakeyRequest(64, plaintext=False)])
        assert [len(k.plaintext or b"") for k in keys if isinstance(k, DataKey)] == [16, 0]
        rw = kms.rewrap_batch(tenant, "volumes", [CiphertextRequest(ct.ciphertext, {"app": "billing"})])
        assert isinstance(rw[0], Encrypted) and rw[0].version == 2

        live.admin.disable_version(tenant, "volumes", 1)
        with pytest.raises(KeyVersionDisabled):
            kms.derive(tenant, "volumes", "pg-data-0", version=1)
        live.admin.enable_version(tenant, "volumes", 1)
        with pytest.raises(WouldCutOffIds) as cut:  # pg-data-0 was derived under v1 above
            live.admin.update_key(tenant, "volumes", min_decryption_version=2)
        assert cut.value.code == "would_cut_off_ids"
        live.admin.update_key(tenant, "volumes", min_decryption_version=2, force=True)
        with pytest.raises(KeyVersionBelowMinimum):
            kms.derive(tenant, "volumes", "pg-data-0", version=1)


def test_token_file_rotation_against_the_service(live: Live, tmp_path: Path) -> None:
    """A rotated token file is picked up on the next call, as with Kubernetes projected tokens."""
    tenant = live.tenant("rot", "volumes")
    first = live.admin.create_token("agent", "first", tenant=tenant)
    second = live.admin.create_token("agent", "second", tenant=tenant)
    token_file = tmp_path / "token"
    token_file.write_text(first.token)
    with KmsClient(live.url, token_file=token_file) as kms:
        kms.derive(tenant, "volumes", "v")
        live.admin.revoke_token(first.id)
        with pytest.raises(Unauthenticated):
            kms.derive(tenant, "volumes", "v")
        replacement = tmp_path / "token.new"
        replacement.write_text(second.token + "\n")
        replacement.replace(token_file)
        assert kms.derive(tenant, "volumes", "v").version == 1


async def test_async_client_against_the_service(live: Live) -> None:
    tenant = live.tenant("async", "volumes")
    async with AsyncKmsClient(live.url, token=live.admin_token) as kms:
        assert (await kms.get_key(tenant, "volumes")).primary_version == 1
        ct = await kms.encrypt(tenant, "volumes", b"\x00" * 100, context={"a": "b"})
        assert (
            await kms.decrypt(tenant, "volumes", ct.ciphertext, context={"a": "b"})
        ).plaintext == b"\x00" * 100
        rotated = await kms.rotate_key(tenant, "volumes")
        assert rotated.primary_version == 2
        assert (await kms.derive(tenant, "volumes", "x")).version == 2
        events = [e async for e in kms.iter_audit(tenant=tenant, page_size=1)]
        assert {"key.created", "key.rotated", "key.encrypted"} <= {e["action"] for e in events}
        with pytest.raises(DecryptionFailed):
            await kms.decrypt(tenant, "volumes", ct.ciphertext)
        assert (await kms.health()).ok
