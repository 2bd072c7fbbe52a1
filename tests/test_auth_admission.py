"""Admission.admit_known, the await-free answer for a cached bearer token, against admit().

admit_known either gives the very caller admit() would, or declines (None) and leaves the
request to admit(): it never admits what admit() refuses.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from ctxvars_mw import (
    ExpiredTokenError,
    Identity,
    InMemorySessionStore,
    InvalidTokenError,
    JWTAuthenticator,
)
from ctxvars_mw.auth.admission import NOT_CACHED, REPEATED, Admission
from ctxvars_mw.auth.cache import TTLCache, token_digest
from ctxvars_mw.errors import InvalidRequestError
from tests.auth_helpers import AUDIENCE, SECRET, USER, claims, make_app, sign


class Clock:
    """A settable Unix clock."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _admission(auth: Any, **options: Any) -> Admission:
    return make_app(authenticator=auth, **options).admission


def _http() -> dict[str, Any]:
    return {"type": "http", "path": "/whoami", "headers": []}


def _jwt(**options: Any) -> JWTAuthenticator:
    return JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE, **options)


async def test_a_cached_token_gets_the_caller_admit_gives() -> None:
    """A hit is the same caller template as admit()'s; a token never verified is left to it."""
    auth = _jwt()
    admission = _admission(auth)
    token = sign(claims())
    header = b"Bearer " + token.encode()
    assert admission.admit_known(_http(), header) is NOT_CACHED  # not verified yet
    caller, subprotocol = await admission.admit(_http(), header)
    assert admission.admit_known(_http(), header) is caller
    assert admission.admit_known(_http(), b"bEaReR   " + token.encode() + b" ") is caller
    assert subprotocol is None
    assert caller.user_id == USER


async def test_what_admit_refuses_is_left_to_it() -> None:
    """No header, a repeated one, another scheme, a websocket and a non-ASCII token are
    admit()'s to answer, however the token stands in the cache."""
    auth = _jwt()
    admission = _admission(auth)
    token = sign(claims())
    await auth.verify(token)
    for header in (
        None,
        REPEATED,
        b"Basic " + token.encode(),
        b"Bearer \xc3\xa9" + token[2:].encode(),
    ):
        assert admission.admit_known(_http(), header) is None
    websocket = {"type": "websocket", "path": "/ws", "headers": [], "subprotocols": []}
    assert admission.admit_known(websocket, b"Bearer " + token.encode()) is None
    with pytest.raises(InvalidRequestError):
        await admission.admit(_http(), REPEATED)
    with pytest.raises(InvalidTokenError, match="malformed"):
        await admission.admit(_http(), b"Bearer \xc3\xa9" + token[2:].encode())


async def test_an_oversized_token_is_a_401_on_both_paths() -> None:
    auth = _jwt(max_token_bytes=64)
    admission = _admission(auth)
    header = b"Bearer " + b"a" * 65
    with pytest.raises(InvalidTokenError, match="too large"):
        admission.admit_known(_http(), header)
    with pytest.raises(InvalidTokenError, match="too large"):
        await admission.admit(_http(), header)


async def test_an_expired_cached_token_is_verified_again() -> None:
    """Past its exp the entry is gone: admit() verifies the token (accepted within the
    leeway, then refused as expired)."""
    clock = Clock()
    auth = _jwt(leeway=30, clock=clock)
    admission = _admission(auth)
    token = sign(claims(exp=int(clock.now) + 60))
    header = b"Bearer " + token.encode()
    await admission.admit(_http(), header)
    assert admission.admit_known(_http(), header) is not None
    clock.now += 61
    assert admission.admit_known(_http(), header) is NOT_CACHED
    assert (await admission.admit(_http(), header))[0].user_id == USER  # inside the leeway
    clock.now += 60
    with pytest.raises(ExpiredTokenError):
        await admission.admit(_http(), header)


async def test_with_a_session_store_a_cached_token_goes_through_admit() -> None:
    """The store is asked on every request naming a session: nothing is answered early."""
    auth = _jwt()
    store = InMemorySessionStore()
    admission = _admission(auth, session_store=store)
    session = await store.create(USER)
    header = b"Bearer " + sign(claims(sid=session.id)).encode()
    await admission.admit(_http(), header)
    assert admission.admit_known(_http(), header) is None
    await store.revoke(session.id)
    with pytest.raises(InvalidTokenError, match="revoked"):
        await admission.admit(_http(), header)


async def test_a_failing_cache_refuses_the_token() -> None:
    """An authenticator whose cached() raises is a 401 here too (fail closed)."""

    class Broken:
        def cached(self, token: str) -> Identity | None:
            raise ValueError(token)

        async def authenticate(self, conn: Any) -> Identity | None:
            return None

    with pytest.raises(InvalidTokenError, match="could not be verified"):
        _admission(Broken()).admit_known(_http(), b"Bearer abc")


async def test_cached_gets_text_unless_its_class_takes_bytes() -> None:
    """An authenticator's own cached(token) is given a str; JWTAuthenticator's takes the
    header's bytes, and a subclass redefining cached() is given a str again."""
    seen: list[object] = []

    class Remembering:
        def cached(self, token: str) -> Identity | None:
            seen.append(token)
            return Identity(user_id=USER)

        async def authenticate(self, conn: Any) -> Identity | None:
            return None

    class Logged(JWTAuthenticator):
        def cached(self, token: str | bytes) -> Identity | None:
            seen.append(token)
            return super().cached(token)

    assert _admission(Remembering()).admit_known(_http(), b"Bearer abc") is not None
    logged = Logged(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert _admission(logged).admit_known(_http(), b"Bearer abc") is NOT_CACHED
    assert seen == ["abc", "abc"]


def test_a_token_has_one_key_as_text_and_as_bytes() -> None:
    token = sign(claims())
    assert token_digest(token, 8192) == token_digest(token.encode(), 8192)
    assert len(token_digest(token, 8192)) == 32


class Keys:
    """A key set (the KeySet protocol) whose contents and staleness the test sets."""

    def __init__(self, current: dict[tuple[str, str], Any]) -> None:
        self.current = current
        self.stale_at = float("inf")
        self.refreshes = 0

    def refresh_if_stale(self) -> None:
        self.refreshes += 1


def test_an_entry_lives_while_its_key_is_published() -> None:
    """A hit counts while the (kid, alg) still maps to the verifier that verified it; a stale
    set is asked to refresh on a hit; a withdrawn or replaced key drops the entry."""
    verifier, other = object(), object()
    keys = Keys({("k1", "RS256"): verifier})
    cache: TTLCache[str] = TTLCache(10, time.time, keys, lambda: 100.0)
    until = time.time() + 60
    cache.put(b"a", "alice", until, ("k1", "RS256", verifier))
    cache.put(b"b", "bob", until, (None, "RS256", verifier))  # no kid: never a hit
    assert cache.get(b"a") == "alice"
    assert cache.get(b"b") is None
    assert keys.refreshes == 0
    keys.stale_at = 50.0
    assert cache.get(b"a") == "alice"
    assert keys.refreshes == 1
    keys.current = {("k1", "RS256"): other}
    assert cache.get(b"a") is None
    assert len(cache) == 0


def test_the_cache_is_an_lru_bounded_by_its_size() -> None:
    cache: TTLCache[int] = TTLCache(2)
    until = time.time() + 60
    cache.put(b"1", 1, until)
    cache.put(b"2", 2, until)
    assert cache.get(b"1") == 1  # now the most recent
    cache.put(b"3", 3, until)
    assert [cache.get(k) for k in (b"1", b"2", b"3")] == [1, None, 3]
    cache.put(b"4", 4, time.time() - 1)  # already past: not stored
    assert len(cache) == 2


async def test_a_token_the_cache_missed_is_verified_without_asking_it_again() -> None:
    """admit_known's miss, then admit(cache_asked=True): the cache is asked once, the token
    is verified, and the next request is a hit."""
    auth = _jwt()
    asked: list[object] = []
    lookup = auth.cached

    def spy(token: Any) -> Any:
        asked.append(token)
        return lookup(token)

    auth.cached = spy  # type: ignore[method-assign]
    admission = _admission(auth)
    header = b"Bearer " + sign(claims()).encode()
    assert admission.admit_known(_http(), header) is NOT_CACHED
    caller, _ = await admission.admit(_http(), header, cache_asked=True)
    assert len(asked) == 1
    assert admission.admit_known(_http(), header) is caller
    assert len(asked) == 2
