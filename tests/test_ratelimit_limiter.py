"""ContextMiddleware metering requests by tier: 429s and their headers, who counts as one
caller, routes, websockets, audit records, Redis under concurrency, many processes and
Redis outages (failing closed or open)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from ctxvars_mw import (
    ConfigurationError,
    ContextMiddleware,
    InMemoryLimitStore,
    JWTAuthenticator,
    Policy,
    RedisLimitStore,
    UserExecutionContext,
    get_context,
)
from ctxvars_mw.ratelimit.limiter import client_address
from tests import test_faults
from tests.servers import uvicorn_server
from tests.test_faults import RECOVERY_BOUND, RedisProcess

redis_process = test_faults.redis_process  # the private redis-server fixture

KEY = b"ratelimit-tests-hs256-secret-0123456789"
FREE_USER = "auth0|5f7c8ec7c33c6c004bbafe82"
BUSINESS_USER = "google-oauth2|1234567890"
FREE_PER_HOUR = 25
LIMITS = {
    "free": {"rate": "3/minute"},
    "business": {"rate": "100/minute"},
    "internal": "unlimited",
}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_780_000_000.0

    def __call__(self) -> float:
        return self.now


def policy(limits: dict[str, Any] = LIMITS) -> Policy:
    """The default roles and features with ``limits``."""
    return Policy.from_mapping({**Policy.default().to_mapping(), "tier_limits": limits})


def bearer(user: str, tier: str, sid: str | None = None, key: bytes = KEY) -> dict[str, str]:
    """An Authorization header with an HS256 JWT for ``user`` at ``tier``."""
    claims = {"sub": user, "tier": tier, "exp": int(time.time()) + 600, "sid": sid}
    return {"Authorization": "Bearer " + jwt.encode(claims, key, algorithm="HS256")}


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer with the caller's user id and tier."""
    ctx = get_context()
    body = json.dumps({"user_id": ctx.user_id, "tier": ctx.tier.value}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def metered(**options: Any) -> ContextMiddleware:
    """ContextMiddleware around ``echo``, authenticating our JWTs, metering LIMITS."""
    options.setdefault("policy", policy())
    return ContextMiddleware(
        echo, authenticator=JWTAuthenticator(key=KEY, algorithms=["HS256"]), **options
    )


def client(app: Any, address: str = "203.0.113.7") -> httpx.AsyncClient:
    """An httpx client calling ``app`` in-process from ``address``."""
    transport = httpx.ASGITransport(app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def test_a_free_caller_past_its_rate_gets_a_429_while_business_passes() -> None:
    """3/minute: three 200s counting down, then 429 with Retry-After, the IETF headers and
    the library's JSON error; the business caller's requests are counted apart."""
    clock = Clock()
    app = metered(limit_store=InMemoryLimitStore(clock=clock))
    free = bearer(FREE_USER, "free")
    async with client(app) as c:
        answers = [await c.get("/", headers=free) for _ in range(4)]
        business = await c.get("/", headers=bearer(BUSINESS_USER, "business"))
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["ratelimit"] for r in answers[:3]] == [
        '"minute";r=2;t=20',
        '"minute";r=1;t=40',
        '"minute";r=0;t=20',
    ]
    refused = answers[3]
    assert refused.headers["retry-after"] == "20"
    assert refused.headers["ratelimit-policy"] == '"minute";q=3;w=60'
    assert refused.headers["ratelimit"] == '"minute";r=0;t=20'
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {
        "error": "rate_limited",
        "error_description": "The free tier's rate limit is used up; retry in 20 s.",
    }
    assert "x-request-id" in refused.headers
    assert business.status_code == 200
    assert business.headers["ratelimit-policy"] == '"minute";q=100;w=60'
    assert business.headers["ratelimit"] == '"minute";r=99;t=1'


async def test_the_rate_refills_as_the_clock_moves() -> None:
    """One request is admitted again 20 s after the burst (3/minute), not before."""
    clock = Clock()
    app = metered(limit_store=InMemoryLimitStore(clock=clock))
    free = bearer(FREE_USER, "free")
    async with client(app) as c:
        assert [(await c.get("/", headers=free)).status_code for _ in range(3)] == [200] * 3
        clock.now += 19.9
        assert (await c.get("/", headers=free)).status_code == 429
        clock.now += 0.1
        assert (await c.get("/", headers=free)).status_code == 200


async def test_anonymous_callers_are_counted_by_client_address() -> None:
    """Without a token the free tier's rate applies per address: one address used up does
    not refuse another."""
    app = metered(limit_store=InMemoryLimitStore(clock=Clock()))
    async with client(app, "198.51.100.1") as first, client(app, "198.51.100.2") as second:
        assert [(await first.get("/")).status_code for _ in range(4)] == [200, 200, 200, 429]
        assert (await second.get("/")).status_code == 200
    anonymous = UserExecutionContext.anonymous()
    assert client_address(anonymous, {"type": "http", "client": ("192.0.2.9", 1234)}) == "192.0.2.9"
    assert client_address(anonymous, {"type": "http", "client": None}) == "unknown"
    recorded = UserExecutionContext.anonymous(client_ip="203.0.113.5")
    assert client_address(recorded, {"type": "http", "client": ("10.0.0.2", 1)}) == "203.0.113.5"


async def test_anonymous_callers_behind_a_trusted_proxy_are_counted_by_forwarded_address() -> None:
    """Behind a trusted proxy every request comes from the proxy's address; each client the
    proxy names in X-Forwarded-For has its own count."""
    app = metered(limit_store=InMemoryLimitStore(clock=Clock()), trusted_proxies=["10.0.0.0/8"])
    async with client(app, "10.0.0.2") as proxy:
        first = {"x-forwarded-for": "198.51.100.1"}
        second = {"x-forwarded-for": "198.51.100.2"}
        codes = [(await proxy.get("/", headers=first)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert (await proxy.get("/", headers=second)).status_code == 200


async def test_an_unlimited_tier_is_neither_counted_nor_told() -> None:
    """internal is unlimited: no 429 however many requests, and no RateLimit headers."""
    store = InMemoryLimitStore(clock=Clock())
    app = metered(limit_store=store)
    async with client(app) as c:
        answers = [await c.get("/", headers=bearer(FREE_USER, "internal")) for _ in range(10)]
    assert {r.status_code for r in answers} == {200}
    assert all("ratelimit" not in r.headers for r in answers)
    assert len(store) == 0


class Refusing:
    """A store that fails the test if anything calls it."""

    clock = staticmethod(time.time)

    async def hit(self, *args: Any) -> Any:
        raise AssertionError("a request without limits reached the store")

    async def consume(self, *args: Any) -> Any:
        raise AssertionError("a request without limits reached the store")


async def test_without_limits_the_middleware_does_no_metering_work() -> None:
    """The default policy declares no limits: no limiter, no headers; a store given anyway
    is a configuration error."""
    app = ContextMiddleware(echo)
    assert app.limiter is None
    async with client(app) as c:
        response = await c.get("/")
    assert response.status_code == 200
    assert "ratelimit" not in response.headers
    with pytest.raises(ConfigurationError, match="limit_store"):
        ContextMiddleware(echo, limit_store=Refusing())  # type: ignore[arg-type]


async def test_route_limits_replace_the_tier_rate_on_their_paths() -> None:
    """/search allows free callers 1/minute in its own count; /export/* is unlimited for
    business; other paths keep the tier's rate."""
    app = metered(
        limit_store=InMemoryLimitStore(clock=Clock()),
        route_limits={"/search": {"free": "1/minute"}, "/export/*": {"business": "unlimited"}},
    )
    free, business = bearer(FREE_USER, "free"), bearer(BUSINESS_USER, "business")
    async with client(app) as c:
        search = [(await c.get("/search", headers=free)).status_code for _ in range(2)]
        home = [(await c.get("/", headers=free)).status_code for _ in range(4)]
        export = await c.get("/export/csv", headers=business)
        export_free = await c.get("/export/csv", headers=free)  # free keeps its used-up rate
    assert search == [200, 429]
    assert home == [200, 200, 200, 429]
    assert "ratelimit" not in export.headers
    assert export_free.status_code == 429


async def test_limit_key_session_counts_each_session_apart() -> None:
    """With limit_key="session", two sessions of one user each get the whole rate."""
    app = metered(limit_store=InMemoryLimitStore(clock=Clock()), limit_key="session")
    one = bearer(FREE_USER, "free", sid="sess_8f14e45fceea167a5a36dedd4bea2543")
    two = bearer(FREE_USER, "free", sid="sess_c9f0f895fb98ab9159f51fd0297e236d")
    async with client(app) as c:
        assert [(await c.get("/", headers=one)).status_code for _ in range(4)][-1] == 429
        assert (await c.get("/", headers=two)).status_code == 200


def test_a_websocket_past_its_rate_is_refused_before_accept() -> None:
    """The handshake that passes the rate is answered 429 (a denial response); the app's
    endpoint never runs for it."""
    accepted: list[str] = []

    async def endpoint(websocket: WebSocket) -> None:
        accepted.append(get_context().user_id)
        await websocket.accept()
        await websocket.close()

    app = ContextMiddleware(
        Starlette(routes=[WebSocketRoute("/ws", endpoint)]),
        authenticator=JWTAuthenticator(key=KEY, algorithms=["HS256"]),
        policy=policy(),
        limit_store=InMemoryLimitStore(clock=Clock()),
    )
    free = bearer(FREE_USER, "free")
    with TestClient(app) as tc:
        for _ in range(3):
            with (
                tc.websocket_connect("/ws", headers=free) as ws,
                pytest.raises(WebSocketDisconnect),
            ):
                ws.receive_text()
        from starlette.testclient import WebSocketDenialResponse

        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            tc.websocket_connect("/ws", headers=free),
        ):
            pass
    assert denied.value.status_code == 429
    assert denied.value.headers["retry-after"] == "20"
    assert denied.value.json()["error"] == "rate_limited"
    assert accepted == [FREE_USER] * 3


async def test_each_refusal_writes_one_audit_record(caplog: pytest.LogCaptureFixture) -> None:
    """A 429 is audited on ctxvars_mw.audit with the caller's ids, never the token."""
    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    app = metered(limit_store=InMemoryLimitStore(clock=Clock()))
    free = bearer(FREE_USER, "free")
    async with client(app) as c:
        for _ in range(4):
            last = await c.get("/", headers=free)
    [record] = [r for r in caplog.records if r.name == "ctxvars_mw.audit"]
    assert record.levelno == logging.WARNING
    assert record.__dict__["audit_event"] == "rate_limited"
    assert record.__dict__["status"] == 429
    assert record.__dict__["check"] == "rate"
    assert record.__dict__["required"] == ["minute"]
    assert record.__dict__["user_id"] == FREE_USER
    assert record.__dict__["request_id"] == last.headers["x-request-id"]
    assert record.getMessage() == (
        f"rate limited (429): rate ['minute'] for user {FREE_USER}; retry in 20 s"
    )
    assert free["Authorization"][7:] not in caplog.text


@pytest.mark.parametrize(
    "options",
    [
        {"limit_failure": "maybe"},
        {"limit_key": "ip"},
        {"route_limits": {"search": {"free": "1/minute"}}},
        {"route_limits": {"/search": {"gold": "1/minute"}}},
        {"route_limits": {"/search": {}}},
        {"route_limits": ["/search"]},
        {"limit_store": object()},
        {"retry_after": 0},
    ],
)
def test_bad_limit_options_raise_configuration_error(options: dict[str, Any]) -> None:
    """Each metering option is checked when the middleware is built."""
    with pytest.raises(ConfigurationError):
        metered(**options)


# -- Redis ---------------------------------------------------------------------------------


@pytest.fixture
async def redis_store(redis_url: str, key_prefix: str) -> AsyncIterator[RedisLimitStore]:
    """A RedisLimitStore on the shared Redis under this test's prefix (removed after)."""
    import redis.asyncio as redis

    store = RedisLimitStore(redis_url, prefix=key_prefix, timeout=2.0)
    try:
        yield store
    finally:
        await store.aclose()
        cleaner = redis.Redis.from_url(redis_url)
        keys = [key async for key in cleaner.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await cleaner.delete(*keys)
        await cleaner.aclose()


async def test_a_burst_through_redis_admits_exactly_the_limit(
    redis_store: RedisLimitStore,
) -> None:
    """150 concurrent requests by one free caller against 40/hour: exactly 40 answered 200."""
    app = metered(policy=policy({"free": {"rate": "40/hour"}}), limit_store=redis_store)
    free = bearer(FREE_USER, "free")
    async with client(app) as c:
        answers = await asyncio.gather(*(c.get("/", headers=free) for _ in range(150)))
    statuses = [r.status_code for r in answers]
    assert statuses.count(200) == 40
    assert statuses.count(429) == 110


async def test_two_uvicorn_processes_sharing_redis_admit_the_limit_in_total(
    redis_url: str, key_prefix: str
) -> None:
    """Two servers, one Redis, 25/hour: 20 concurrent requests to the first pass; of 20 to
    the second only the 5 left pass; 30 more over both pass none."""
    secret = secrets.token_urlsafe(32)
    env = {
        "RATELIMIT_APP_SECRET": secret,
        "RATELIMIT_APP_REDIS": redis_url,
        "RATELIMIT_APP_PREFIX": key_prefix,
        "RATELIMIT_APP_FREE_RATE": f"{FREE_PER_HOUR}/hour",
    }
    free = bearer(FREE_USER, "free", key=secret.encode())

    async def statuses(c: httpx.AsyncClient, urls: list[str]) -> list[int]:
        answers = await asyncio.gather(*(c.get(url + "/", headers=free) for url in urls))
        return [r.status_code for r in answers]

    with (
        uvicorn_server("tests.apps.ratelimit_app:app", env=env) as one,
        uvicorn_server("tests.apps.ratelimit_app:app", env=env) as two,
    ):
        async with httpx.AsyncClient(timeout=20) as c:
            first = await statuses(c, [one] * 20)
            second = await statuses(c, [two] * 20)
            third = await statuses(c, [one, two] * 15)
            business = bearer(BUSINESS_USER, "business", key=secret.encode())
            other = await c.get(two + "/", headers=business)
    assert first == [200] * 20
    assert sorted(second) == [200] * 5 + [429] * 15  # the second process saw the first's count
    assert third == [429] * 30
    assert first.count(200) + second.count(200) == FREE_PER_HOUR
    assert other.status_code == 200
    assert other.text == BUSINESS_USER


async def _until(c: httpx.AsyncClient, headers: dict[str, str], status: int) -> float:
    """Poll until a response has ``status``; return how long it took."""
    since = time.monotonic()
    while (await c.get("/", headers=headers)).status_code != status:
        assert time.monotonic() - since < RECOVERY_BOUND, f"no {status} in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - since


async def test_redis_down_fails_closed_with_503_then_meters_again(
    redis_process: RedisProcess, key_prefix: str
) -> None:
    """Redis stopped: 503 + Retry-After (limit_failure="closed"); restarted: counting resumes."""
    store = RedisLimitStore(redis_process.url, prefix=key_prefix, timeout=0.5)
    app = metered(limit_store=store, retry_after=7)
    free = bearer(FREE_USER, "free")
    try:
        async with client(app) as c:
            assert (await c.get("/", headers=free)).headers["ratelimit"] == '"minute";r=2;t=20'
            redis_process.stop()
            down = await c.get("/", headers=free)
            assert down.status_code == 503
            assert down.headers["retry-after"] == "7"
            assert down.json()["error"] == "temporarily_unavailable"
            assert "x-request-id" in down.headers
            redis_process.start()  # empty: the counts start again
            recovery = await _until(c, free, 200)
            again = await c.get("/", headers=free)
            assert again.headers["ratelimit"] == '"minute";r=1;t=40'  # counted after the one above
    finally:
        await store.aclose()
    print(f"metering recovered {recovery * 1000:.0f} ms after Redis answered")


async def test_redis_down_fails_open_with_one_warning(
    redis_process: RedisProcess, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """limit_failure="open": requests pass unmetered while Redis is down, with one WARNING
    for the whole outage and one when Redis answers again."""
    caplog.set_level(logging.WARNING, logger="ctxvars_mw.ratelimit")
    store = RedisLimitStore(redis_process.url, prefix=key_prefix, timeout=0.5)
    app = metered(limit_store=store, limit_failure="open")
    free = bearer(FREE_USER, "free")
    try:
        async with client(app) as c:
            assert [(await c.get("/", headers=free)).status_code for _ in range(4)][-1] == 429
            redis_process.stop()
            during = [await c.get("/", headers=free) for _ in range(20)]
            assert {r.status_code for r in during} == {200}
            assert all("ratelimit" not in r.headers for r in during)
            redis_process.start()
            await _until(c, free, 200)
            assert (await c.get("/", headers=free)).headers["ratelimit"] == '"minute";r=1;t=40'
    finally:
        await store.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == "ctxvars_mw.ratelimit"]
    assert len(messages) == 2, messages
    assert messages[0].startswith("rate limit store unavailable (")
    assert "letting requests through unmetered" in messages[0]
    assert messages[1].startswith("rate limit store answers again; ")


async def test_several_rates_are_listed_in_both_headers() -> None:
    """2/second and 5/hour: both items in RateLimit-Policy and RateLimit; the refusal names
    the per-second rate, which is the one used up."""
    clock = Clock()
    rates = {"free": {"rate": ["2/second", "5/hour"]}}
    app = metered(policy=policy(rates), limit_store=InMemoryLimitStore(clock=clock))
    free = bearer(FREE_USER, "free")
    async with client(app) as c:
        first = await c.get("/", headers=free)
        await c.get("/", headers=free)
        refused = await c.get("/", headers=free)
    assert first.headers["ratelimit-policy"] == '"second";q=2;w=1,"hour";q=5;w=3600'
    assert first.headers["ratelimit"] == '"second";r=1;t=1,"hour";r=4;t=720'
    assert refused.status_code == 429
    assert refused.headers["ratelimit"] == '"second";r=0;t=1,"hour";r=3;t=1440'
    assert refused.headers["retry-after"] == "1"
