"""A small bounded LRU whose entries each carry their own wall-clock expiry.

Used by the JWT and introspection authenticators to remember verified tokens. Keys are
digests of tokens (never the tokens themselves), so the cache holds no credentials. A hit is
one dictionary lookup, one clock reading and one LRU move: it runs on every request by a
caller seen before.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from ..errors import InvalidTokenError

__all__ = ["KeySet", "TTLCache", "token_digest"]

V = TypeVar("V")
# Copied for each token: the parameters are not parsed again per digest.
_BLAKE2B_256 = hashlib.blake2b(digest_size=32)


def token_digest(token: str | bytes, max_bytes: int) -> bytes:
    """A 256-bit BLAKE2b digest of ``token``: the cache key (collisions are infeasible). A
    token as text and as its UTF-8 bytes (an ``Authorization`` header's) have the same key;
    a token longer than ``max_bytes`` is refused (a 401) before any work on it.

    BLAKE2b rather than SHA-256: as collision-resistant, and about half the work on a
    token of a few hundred bytes (it runs on every authenticated request)."""
    if len(token) > max_bytes:
        raise InvalidTokenError("The access token is too large.")
    digest = _BLAKE2B_256.copy()
    digest.update(token.encode("utf-8", "surrogatepass") if isinstance(token, str) else token)
    return digest.digest()


# value, expires_at, and with a key set the (kid, alg) and verifier that verified it
_Entry = tuple[V, float, tuple[str, str] | None, Any]


class KeySet(Protocol):
    """What :class:`TTLCache` asks of a key set (:class:`~.jwks.JWKSClient`)."""

    #: When the set goes stale, in the set's own ``clock()`` time.
    stale_at: float
    #: The published verifiers by ``(kid, alg)``.
    current: Mapping[tuple[str, str], Any]

    def refresh_if_stale(self) -> None:
        """Refetch the set in the background once it is older than its TTL."""
        ...


class TTLCache(Generic[V]):
    """At most ``maxsize`` entries, least recently used evicted first; each entry is
    dropped once ``clock()`` reaches its own ``expires_at`` (a Unix time).

    With a key set (``keys``), entries are verified tokens, each put with the key that
    verified it: a hit counts only while that key is still published (a key withdrawn from
    the set, or a ``kid`` republished with other material, takes its tokens' entries with
    it), and a hit on a stale set (by ``keys_clock``) lets it refresh in the background: a
    withdrawn key stops authenticating within the set's TTL, however often its tokens come
    back.
    """

    __slots__ = ("_clock", "_data", "_keys", "_keys_clock", "maxsize")

    def __init__(
        self,
        maxsize: int,
        clock: Callable[[], float] = time.time,
        keys: KeySet | None = None,
        keys_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maxsize = maxsize
        self._clock = clock
        self._keys = keys
        self._keys_clock = keys_clock
        self._data: OrderedDict[bytes, _Entry[V]] = OrderedDict()

    def get(self, key: bytes) -> V | None:
        """The live value under ``key``, or None (an entry expired, or whose key is no
        longer published, is removed)."""
        data = self._data
        entry = data.get(key)
        if entry is None:
            return None
        if self._clock() < entry[1] and (self._keys is None or self._published(entry)):
            data.move_to_end(key)
            return entry[0]
        del data[key]
        return None

    def _published(self, entry: _Entry[V]) -> bool:
        """Whether the key that verified ``entry`` is still in the set (refreshed first in
        the background when stale)."""
        keys = self._keys
        assert keys is not None
        if self._keys_clock() >= keys.stale_at:
            keys.refresh_if_stale()
        name = entry[2]
        return name is not None and keys.current.get(name) is entry[3]

    def put(
        self,
        key: bytes,
        value: V,
        expires_at: float,
        verified_by: tuple[str | None, str, Any] | None = None,
    ) -> None:
        """Remember ``value`` until ``expires_at`` (nothing is stored if that is past); with
        a key set, ``verified_by`` is the ``(kid, alg, verifier)`` that verified it."""
        if self.maxsize <= 0 or expires_at <= self._clock():
            return
        if verified_by is None or verified_by[0] is None:
            name, verifier = None, None
        else:
            name, verifier = (verified_by[0], verified_by[1]), verified_by[2]
        data = self._data
        data[key] = (value, expires_at, name, verifier)
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
