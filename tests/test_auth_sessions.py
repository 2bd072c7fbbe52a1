"""Session stores (in-memory and real Redis) and the middleware's session checks."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest

from ctxvars_mw import (
    ConfigurationError,
    InMemorySessionStore,
    JWTAuthenticator,
    RedisSessionStore,
    ServiceUnavailableError,
)
from tests.auth_helpers import AUDIENCE, SECRET, USER, bearer, claims, client_for, make_app, sign
from tests.servers import free_port

MINUTE = 60.0
HOUR = 3600.0
OTHER = "google-oauth2|109876543210987654321"


class Clock:
    """A settable Unix clock."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def store_and_clock(request: pytest.FixtureRequest) -> tuple[Any, Clock]:
    """Each store kind with a settable clock (default timeouts: 30 min idle, 8 h absolute).

    The Redis store uses the shared ``redis_client`` fixture, which deletes this test's keys.
    """
    clock = Clock()
    if request.param == "memory":
        return InMemorySessionStore(clock=clock), clock
    redis_client = request.getfixturevalue("redis_client")
    prefix = request.getfixturevalue("key_prefix")
    return RedisSessionStore(redis_client, prefix=prefix, clock=clock), clock


async def test_create_get_touch_round_trip(store_and_clock: tuple[Any, Clock]) -> None:
    """A new session is active, carries its data, and touch moves last_seen_at."""
    store, clock = store_and_clock
    session = await store.create(USER, device="laptop", scopes=["a", "b"])
    assert len(session.id) >= 40
    got = await store.get(session.id)
    assert got is not None
    assert (got.user_id, got.data["device"], got.data["scopes"]) == (USER, "laptop", ("a", "b"))
    clock.now += 5 * MINUTE
    touched = await store.touch(session.id)
    assert touched is not None
    assert touched.last_seen_at > session.last_seen_at
    assert touched.created_at == got.created_at
    assert await store.get("no-such-session-id-0123456789") is None
    assert await store.touch("no-such-session-id-0123456789") is None


async def test_idle_session_expires(store_and_clock: tuple[Any, Clock]) -> None:
    """A session not touched for longer than idle_timeout is no longer active."""
    store, clock = store_and_clock
    session = await store.create(USER)
    clock.now += 29 * MINUTE
    assert await store.touch(session.id) is not None
    clock.now += 29 * MINUTE
    assert await store.get(session.id) is not None  # 29 min after the touch: still active
    clock.now += 2 * MINUTE
    assert await store.get(session.id) is None
    assert await store.touch(session.id) is None


async def test_absolute_timeout_holds_however_often_touched(
    store_and_clock: tuple[Any, Clock],
) -> None:
    """Touched every 20 minutes, a session still ends 8 hours after it began."""
    store, clock = store_and_clock
    session = await store.create(USER)
    start = clock.now
    while clock.now + 20 * MINUTE < start + 8 * HOUR:
        clock.now += 20 * MINUTE
        assert await store.touch(session.id) is not None
    clock.now = start + 8 * HOUR + 1
    assert await store.touch(session.id) is None
    assert await store.get(session.id) is None


async def test_revoke_and_revoke_user(store_and_clock: tuple[Any, Clock]) -> None:
    """revoke ends one session; revoke_user ends all of a user's and counts them."""
    store, _ = store_and_clock
    a, b, c = [await store.create(USER) for _ in range(3)]
    other = await store.create(OTHER)
    await store.revoke(a.id)
    await store.revoke(a.id)  # idempotent
    assert await store.get(a.id) is None
    assert await store.revoke_user(USER) == 2
    assert await store.get(b.id) is None
    assert await store.get(c.id) is None
    assert await store.get(other.id) is not None
    assert await store.revoke_user(USER) == 0


async def test_redis_key_ttl_never_exceeds_the_absolute_timeout(
    redis_client: Any, key_prefix: str
) -> None:
    """Redis expires the key at min(idle, absolute time left), so stale keys do not linger."""
    clock = Clock()
    store = RedisSessionStore(
        redis_client,
        prefix=key_prefix,
        idle_timeout=timedelta(minutes=30),
        absolute_timeout=timedelta(hours=1),
        clock=clock,
    )
    session = await store.create(USER)
    key = f"{key_prefix}s:{session.id}"
    assert 29 * 60_000 < await redis_client.pttl(key) <= 30 * 60_000
    for step in (25 * MINUTE, 25 * MINUTE - 1):  # touched 50 min in: 10 min are left
        clock.now += step
        assert await store.touch(session.id) is not None
    assert 9 * 60_000 < await redis_client.pttl(key) <= 10 * 60_000 + 1000  # idle is 30
    assert await redis_client.ttl(f"{key_prefix}u:{USER}") > 0


async def test_two_redis_stores_see_each_others_revocations(
    redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """Two processes' stores (separate clients) share sessions and revocations at once."""
    a = RedisSessionStore(redis_url, prefix=key_prefix)
    b = RedisSessionStore(redis_url, prefix=key_prefix)
    try:
        session = await a.create(USER)
        assert await b.touch(session.id) is not None
        await a.revoke(session.id)
        assert await b.get(session.id) is None
        s2 = await b.create(USER)
        assert await a.revoke_user(USER) == 1
        assert await b.touch(s2.id) is None
    finally:
        await a.aclose()
        await b.aclose()


async def test_two_middleware_instances_sharing_redis_see_revocation(
    redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A session revoked through one app instance is refused by the other immediately."""
    stores = [RedisSessionStore(redis_url, prefix=key_prefix) for _ in range(2)]
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    app_a, app_b = (make_app(authenticator=auth, session_store=s) for s in stores)
    try:
        session = await stores[0].create(USER)
        headers = bearer(sign(claims(sid=session.id)))
        async with client_for(app_a) as client_a, client_for(app_b) as client_b:
            assert (await client_b.get("/whoami", headers=headers)).status_code == 200
            await stores[0].revoke(session.id)
            refused = await client_b.get("/whoami", headers=headers)
            assert refused.status_code == 401
            assert "expired or was revoked" in refused.json()["error_description"]
            assert (await client_a.get("/whoami", headers=headers)).status_code == 401
    finally:
        for store in stores:
            await store.aclose()


def _unreachable() -> RedisSessionStore:
    return RedisSessionStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)


async def test_unreachable_redis_raises_service_unavailable() -> None:
    """Every store method turns a Redis failure into ServiceUnavailableError."""
    store = _unreachable()
    try:
        for call in (
            store.create(USER),
            store.get("s-0123456789abcdefghij"),
            store.touch("s-0123456789abcdefghij"),
            store.revoke("s-0123456789abcdefghij"),
            store.revoke_user(USER),
        ):
            with pytest.raises(ServiceUnavailableError):
                await call
    finally:
        await store.aclose()


async def test_unreachable_redis_fails_closed_with_503_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """By default the request is refused with 503 + Retry-After, logged once, no token."""
    store = _unreachable()
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    token = sign(claims(sid="sid-0123456789abcdefghijklmno"))
    try:
        with caplog.at_level(logging.WARNING):
            async with client_for(make_app(authenticator=auth, session_store=store)) as client:
                response = await client.get("/whoami", headers=bearer(token))
    finally:
        await store.aclose()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"] == "temporarily_unavailable"
    lines = [r.getMessage() for r in caplog.records if "session store" in r.getMessage()]
    assert len(lines) == 1
    assert "ConnectionError" in lines[0]  # the Redis cause, not just our wrapper
    assert token not in caplog.text


async def test_session_failure_open_lets_the_token_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With session_failure="open" a Redis outage lets a valid token in, with a warning."""
    store = _unreachable()
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    app = make_app(authenticator=auth, session_store=store, session_failure="open")
    try:
        with caplog.at_level(logging.WARNING):
            async with client_for(app) as client:
                response = await client.get(
                    "/whoami", headers=bearer(sign(claims(sid="sid-0123456789abcdefghijk")))
                )
    finally:
        await store.aclose()
    assert response.status_code == 200
    assert response.json()["user_id"] == USER
    assert len([r for r in caplog.records if "failing open" in r.getMessage()]) == 1


async def test_session_of_another_user_is_refused() -> None:
    """A token whose sid belongs to a different user is a 401."""
    store = InMemorySessionStore()
    session = await store.create(OTHER)
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    async with client_for(make_app(authenticator=auth, session_store=store)) as client:
        response = await client.get("/whoami", headers=bearer(sign(claims(sid=session.id))))
    assert response.status_code == 401


def test_redis_store_options_are_validated() -> None:
    """Bad timeouts, prefix or connection argument raise ConfigurationError."""
    for kwargs in ({"idle_timeout": 0}, {"absolute_timeout": -1}, {"prefix": ""}):
        with pytest.raises(ConfigurationError):
            RedisSessionStore("redis://127.0.0.1:6379/0", **kwargs)
    with pytest.raises(ConfigurationError):
        RedisSessionStore(42)


def test_importing_ctxvars_mw_does_not_import_redis() -> None:
    """redis is an optional extra: it is imported only when a RedisSessionStore is built."""
    code = "import sys, ctxvars_mw; assert 'redis' not in sys.modules, 'redis imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
