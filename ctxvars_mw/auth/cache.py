"""A small bounded LRU whose entries each carry their own wall-clock expiry.

Used by the JWT and introspection authenticators to remember verified tokens. Keys are
digests of tokens (never the tokens themselves), so the cache holds no credentials.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["TTLCache", "token_digest"]

V = TypeVar("V")


def token_digest(token: str) -> bytes:
    """A 256-bit digest of ``token``: the cache key (collisions are infeasible)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TTLCache(Generic[V]):
    """At most ``maxsize`` entries, least recently used evicted first; each entry is
    dropped once ``clock()`` reaches its own ``expires_at`` (a Unix time)."""

    __slots__ = ("_clock", "_data", "maxsize")

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.time) -> None:
        self.maxsize = maxsize
        self._clock = clock
        self._data: OrderedDict[bytes, tuple[V, float]] = OrderedDict()

    def get(self, key: bytes) -> V | None:
        """The live value under ``key``, or None (an expired entry is removed)."""
        entry = self._data.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            self._data.pop(key, None)
            return None
        self._data.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, value: V, expires_at: float) -> None:
        """Remember ``value`` until ``expires_at`` (nothing is stored if that is past)."""
        if self.maxsize <= 0 or expires_at <= self._clock():
            return
        data = self._data
        data[key] = (value, expires_at)
        data.move_to_end(key)
        while len(data) > self.maxsize:
            data.popitem(last=False)

    def discard(self, key: bytes) -> None:
        """Forget ``key``."""
        self._data.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
