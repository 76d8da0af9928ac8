"""In-process caches of the data plane, each bounded in size and staleness.

- :class:`KeyMetaCache`: key metadata, invalidated through the change feed, with a max age.
- :class:`KekSecretCache`: unwrapped/derived KEK secrets S with a TTL; never persisted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from kms_service.keys.model import KeyMeta

K = TypeVar("K")
V = TypeVar("V")


class TtlLru(Generic[K, V]):
    """A small LRU whose entries expire ``ttl`` seconds after insertion.

    ``epoch`` counts invalidations. A fill that read the database before an invalidation must not
    land after it (it would resurrect the old state): read ``epoch`` before the read and store
    with :meth:`put_if_current`.
    """

    def __init__(self, *, max_entries: int, ttl: float) -> None:
        self._data: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._max = max_entries
        self.ttl = ttl
        self.epoch = 0

    def get(self, key: K) -> tuple[bool, V | None]:
        hit = self._data.get(key)
        if hit is None:
            return False, None
        value, expires = hit
        if time.monotonic() >= expires:
            del self._data[key]
            return False, None
        self._data.move_to_end(key)
        return True, value

    def put(self, key: K, value: V) -> None:
        self._data[key] = (value, time.monotonic() + self.ttl)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def put_if_current(self, key: K, value: V, epoch: int) -> bool:
        """Store ``value`` unless an invalidation happened since ``epoch`` was read."""
        if epoch != self.epoch:
            return False
        self.put(key, value)
        return True

    def pop(self, key: K) -> None:
        self.epoch += 1
        self._data.pop(key, None)

    def drop_where(self, predicate: Callable[[K], bool]) -> None:
        self.epoch += 1
        for key in [k for k in self._data if predicate(k)]:
            del self._data[key]

    def clear(self) -> None:
        self.epoch += 1
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(entries={len(self._data)})"


class KeyMetaCache(TtlLru[tuple[str, str], KeyMeta | None]):
    """(tenant, key) -> KeyMeta, or None for a key known not to exist."""

    def invalidate(self, tenant: str | None, key: str | None) -> None:
        if tenant is None:
            self.clear()
        elif key is None:
            self.drop_where(lambda k: k[0] == tenant)
        else:
            self.pop((tenant, key))


class KekSecretCache(TtlLru[tuple[str, str, int], bytes]):
    """(tenant, key, version) -> S. Values are key material: this class never prints them."""

    def invalidate(self, tenant: str | None, key: str | None) -> None:
        if tenant is None:
            self.clear()
        else:
            self.drop_where(lambda k: k[0] == tenant and (key is None or k[1] == key))
