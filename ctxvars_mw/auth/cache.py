"""A small bounded LRU whose entries each carry their own wall-clock expiry.

Used by the JWT and introspection authenticators to remember verified tokens. Keys are
digests of tokens (never the tokens themselves), so the cache holds no credentials.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["KeySet", "TTLCache", "VerifiedTokens", "token_digest"]

V = TypeVar("V")
_blake2b = hashlib.blake2b


def token_digest(token: str) -> bytes:
    """A 256-bit BLAKE2b digest of ``token``: the cache key (collisions are infeasible).

    BLAKE2b rather than SHA-256: as collision-resistant, and about half the work on a
    token of a few hundred bytes (it runs on every authenticated request)."""
    return _blake2b(token.encode("utf-8", "surrogatepass"), digest_size=32).digest()


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


class KeySet(Protocol):
    """What :class:`VerifiedTokens` asks of a key set (:class:`~.jwks.JWKSClient`)."""

    #: When the set goes stale, in the set's own ``clock()`` time.
    stale_at: float
    #: The published verifiers by ``(kid, alg)``.
    current: Mapping[tuple[str, str], Any]

    def refresh_if_stale(self) -> None:
        """Refetch the set in the background once it is older than its TTL."""
        ...


class VerifiedTokens(Generic[V]):
    """Verified tokens by digest, each with the key that verified it.

    With a key set, a hit counts only while that key is still published (a key withdrawn
    from the set, or a ``kid`` republished with other material, takes its tokens' entries
    with it), and a hit on a stale set lets it refresh in the background: a withdrawn key
    stops authenticating within the set's TTL, however often its tokens come back.
    """

    __slots__ = ("_data", "_keys", "_keys_clock")

    def __init__(
        self,
        maxsize: int,
        clock: Callable[[], float],
        keys: KeySet | None,
        keys_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._data: TTLCache[tuple[V, tuple[str, str] | None, Any]] = TTLCache(maxsize, clock)
        self._keys = keys
        self._keys_clock = keys_clock

    def get(self, digest: bytes) -> V | None:
        """The live value for ``digest`` whose key is still current, or None."""
        entry = self._data.get(digest)
        if entry is None:
            return None
        keys = self._keys
        if keys is not None:
            if self._keys_clock() >= keys.stale_at:
                keys.refresh_if_stale()
            name = entry[1]
            if name is None or keys.current.get(name) is not entry[2]:
                self._data.discard(digest)
                return None
        return entry[0]

    def put(
        self, digest: bytes, value: V, expires_at: float, key: tuple[str | None, str, Any]
    ) -> None:
        """Remember ``value``, verified by ``key`` (``(kid, alg, verifier)``), until
        ``expires_at``."""
        kid, alg, verifier = key
        self._data.put(digest, (value, None if kid is None else (kid, alg), verifier), expires_at)

    def discard(self, digest: bytes) -> None:
        """Forget ``digest``."""
        self._data.discard(digest)

    def clear(self) -> None:
        """Forget everything."""
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
