"""Who is calling, and what they may do."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from kms_service.audit.chain import Actor


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    AUDITOR = "auditor"
    AGENT = "agent"


class Operation(StrEnum):
    DERIVE = "derive"
    DATAKEY = "datakey"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    REWRAP = "rewrap"


class Permission(StrEnum):
    READ = "read"  # tenants, keys
    MANAGE_KEYS = "manage_keys"  # tenants, keys, rotation, lifecycle
    MANAGE_TOKENS = "manage_tokens"
    READ_AUDIT = "read_audit"
    DATA_PLANE = "data_plane"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.OPERATOR: frozenset({Permission.READ, Permission.MANAGE_KEYS, Permission.READ_AUDIT}),
    Role.AUDITOR: frozenset({Permission.READ, Permission.READ_AUDIT}),
    Role.AGENT: frozenset({Permission.DATA_PLANE}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: str
    role: Role
    tenant: str | None = None
    keys: frozenset[str] | None = None  # None: every key of the tenant
    operations: frozenset[Operation] | None = None  # None: every operation
    expires_at: datetime | None = None

    @property
    def actor(self) -> Actor:
        return Actor(type="agent" if self.role is Role.AGENT else "admin", id=self.token_id)

    def has(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def may_use(self, tenant: str, key: str, operation: Operation) -> bool:
        """Data-plane scope check. Admins may use every key; agents only their scope."""
        if not self.has(Permission.DATA_PLANE):
            return False
        if self.role is Role.ADMIN:
            return True
        if self.tenant != tenant:
            return False
        if self.keys is not None and key not in self.keys:
            return False
        return self.operations is None or operation in self.operations


SYSTEM_CLI = Actor(type="system", id="cli")
