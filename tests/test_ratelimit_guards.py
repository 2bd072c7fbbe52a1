"""Quotas and rates from code: ``consume()``, ``@quota``, ``@rate_limit``, their FastAPI
dependencies and OpenAPI, in a real middleware stack and outside one."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ctxvars_mw import (
    ConfigurationError,
    ContextMiddleware,
    ContextNotSetError,
    InMemoryLimitStore,
    JWTAuthenticator,
    Limiter,
    Policy,
    QuotaExceededError,
    RedisLimitStore,
    UserExecutionContext,
    consume,
    quota,
    rate_limit,
    use_context,
)
from ctxvars_mw.integrations.fastapi import require_quota, require_rate_limit, setup
from ctxvars_mw.integrations.starlette import install_exception_handlers
from tests.servers import free_port

KEY = b"ratelimit-guards-hs256-secret-0123456789"
USER = "auth0|5f7c8ec7c33c6c004bbafe82"
MAY_31_LAST_MINUTE = datetime(2026, 5, 31, 23, 59, tzinfo=UTC).timestamp()
LIMITS = {
    "free": {"quotas": {"agent_runs": "2/month", "exports": "unlimited"}},
    "business": {"quotas": {"agent_runs": "100/month"}},
}


def policy() -> Policy:
    """The default roles and features with quotas only (no request rate)."""
    return Policy.from_mapping({**Policy.default().to_mapping(), "tier_limits": LIMITS})


def bearer(tier: str, user: str = USER) -> dict[str, str]:
    """An Authorization header with an HS256 JWT for ``user`` at ``tier``."""
    claims = {"sub": user, "tier": tier, "exp": int(time.time()) + 600}
    return {"Authorization": "Bearer " + jwt.encode(claims, KEY, algorithm="HS256")}


async def run_agent(request: Request) -> JSONResponse:
    """Spend one agent run; answer with what is left."""
    usage = await consume("agent_runs")
    return JSONResponse({"remaining": usage.remaining, "limit": usage.limit})


@quota("agent_runs", 2)
async def run_big_agent(request: Request) -> JSONResponse:
    """Two agent runs at once, spent by the decorator."""
    return JSONResponse({"ran": True})


@rate_limit({"free": "2/hour", "business": "unlimited"}, name="search")
async def search(request: Request) -> JSONResponse:
    """A rate limit of its own."""
    return JSONResponse({"results": []})


def app(store: Any = None) -> ContextMiddleware:
    """The endpoints above behind a metering ContextMiddleware."""
    routes = [
        Route("/run", run_agent, methods=["POST"]),
        Route("/run/big", run_big_agent, methods=["POST"]),
        Route("/search", search),
    ]
    starlette = Starlette(routes=routes)
    install_exception_handlers(starlette)  # our errors answered inside, wherever we sit
    return ContextMiddleware(
        starlette,
        authenticator=JWTAuthenticator(key=KEY, algorithms=["HS256"]),
        policy=policy(),
        limit_store=store or InMemoryLimitStore(clock=lambda: MAY_31_LAST_MINUTE),
    )


def client(asgi: Any) -> httpx.AsyncClient:
    """An in-process httpx client for ``asgi``."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(asgi), base_url="http://t")


async def test_consume_spends_the_tier_quota_then_answers_429_until_the_month_ends() -> None:
    """free: 2 agent runs a month; the third is a 429 whose Retry-After is the seconds left
    in May, with the quota's RateLimit fields; business has its own 100."""
    async with client(app()) as c:
        answers = [await c.post("/run", headers=bearer("free")) for _ in range(3)]
        business = await c.post("/run", headers=bearer("business", "google-oauth2|1234567890"))
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert [r.json() for r in answers[:2]] == [
        {"remaining": 1, "limit": 2},
        {"remaining": 0, "limit": 2},
    ]
    refused = answers[2]
    assert refused.json() == {
        "error": "quota_exceeded",
        "error_description": "The free tier's agent_runs quota is used up for this month.",
    }
    assert refused.headers["retry-after"] == "60"
    assert refused.headers["ratelimit-policy"] == '"agent_runs";q=2;w=2678400'  # May: 31 days
    assert refused.headers["ratelimit"] == '"agent_runs";r=0;t=60'
    assert "x-request-id" in refused.headers
    assert business.json() == {"remaining": 99, "limit": 100}


async def test_the_quota_decorator_spends_before_the_function_runs() -> None:
    """@quota("agent_runs", 2): the first call spends both runs; the next is refused and its
    function does not run."""
    async with client(app()) as c:
        first = await c.post("/run/big", headers=bearer("free"))
        second = await c.post("/run/big", headers=bearer("free"))
        third = await c.post("/run", headers=bearer("free"))
    assert first.json() == {"ran": True}
    assert second.status_code == 429
    assert third.status_code == 429  # the same monthly quota


async def test_a_quota_refusal_is_audited(caplog: pytest.LogCaptureFixture) -> None:
    """One audit record: check "quota", the quota's name, status 429."""
    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    async with client(app()) as c:
        for _ in range(3):
            await c.post("/run", headers=bearer("free"))
    [record] = [r for r in caplog.records if r.name == "ctxvars_mw.audit"]
    fields = record.__dict__
    assert (fields["audit_event"], fields["check"], fields["status"]) == (
        "rate_limited",
        "quota",
        429,
    )
    assert fields["required"] == ["agent_runs"]
    assert fields["user_id"] == USER


async def test_the_rate_limit_decorator_counts_its_own_calls() -> None:
    """@rate_limit: free callers get 2 searches an hour (429 after, with its headers);
    business is unlimited there."""
    async with client(app()) as c:
        free = [await c.get("/search", headers=bearer("free")) for _ in range(3)]
        business = [await c.get("/search", headers=bearer("business")) for _ in range(5)]
    assert [r.status_code for r in free] == [200, 200, 429]
    assert free[2].headers["ratelimit-policy"] == '"hour";q=2;w=3600'
    assert free[2].headers["retry-after"] == "1800"
    assert free[2].json()["error"] == "rate_limited"
    assert {r.status_code for r in business} == {200}


async def test_consume_with_an_explicit_limiter_works_outside_a_request() -> None:
    """A worker: use_context(ctx) and limiter= meter the same counts; unlimited quotas say
    so; a context is required."""
    limiter = Limiter(policy(), store=InMemoryLimitStore())
    ctx = UserExecutionContext(user_id=USER)  # free tier
    with use_context(ctx):
        assert (await consume("agent_runs", 2, limiter=limiter)).remaining == 0
        with pytest.raises(QuotaExceededError) as refused:
            await consume("agent_runs", limiter=limiter)
        unlimited = await consume("exports", 1000, limiter=limiter)
    assert refused.value.status_code == 429
    assert refused.value.retry_after >= 1
    assert (unlimited.limit, unlimited.remaining) == (None, None)
    with pytest.raises(ContextNotSetError):
        await consume("agent_runs", limiter=limiter)


async def test_quota_misuse_raises_configuration_error() -> None:
    """An undeclared quota, no limiter at hand, a bad amount, a sync function."""
    limiter = Limiter(policy())
    with use_context(UserExecutionContext(user_id=USER)):
        with pytest.raises(ConfigurationError, match="no quota 'agent_run'"):
            await consume("agent_run", limiter=limiter)
        with pytest.raises(ConfigurationError, match="needs a limiter"):
            await consume("agent_runs")
        with pytest.raises(ConfigurationError):
            await consume("agent_runs", 0, limiter=limiter)
    with pytest.raises(ConfigurationError, match="async functions"):
        quota("agent_runs")(lambda: None)
    with pytest.raises(ConfigurationError):
        quota("agent_runs", -1)
    with pytest.raises(ConfigurationError):
        rate_limit({"gold": "1/minute"})


async def test_a_quota_store_that_is_down_answers_503() -> None:
    """Redis not answering (nothing listens on the port): consume() fails closed with the
    503 the middleware sends, never a 500."""
    store = RedisLimitStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    try:
        async with client(app(store)) as c:
            response = await c.post("/run", headers=bearer("free"))
    finally:
        await store.aclose()
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert response.headers["retry-after"] == "5"


def fastapi_app(**options: Any) -> FastAPI:
    """A FastAPI app with a quota dependency and a rate-limit dependency, set up with limits."""
    api = FastAPI()

    @api.post("/agents/run", dependencies=[require_quota("agent_runs")])
    async def agents_run() -> dict[str, bool]:
        return {"ran": True}

    @api.get("/search", dependencies=[require_rate_limit({"free": "1/minute"}, name="search")])
    async def search() -> dict[str, list[str]]:
        return {"results": []}

    @api.get("/open")
    async def open_endpoint() -> dict[str, bool]:
        return {"open": True}

    setup(
        api,
        authenticator=JWTAuthenticator(key=KEY, algorithms=["HS256"]),
        policy=policy(),
        limit_store=InMemoryLimitStore(clock=lambda: MAY_31_LAST_MINUTE),
        **options,
    )
    return api


async def test_fastapi_dependencies_answer_429() -> None:
    """require_quota and require_rate_limit refuse past their limits with the same 429."""
    async with client(fastapi_app()) as c:
        runs = [(await c.post("/agents/run", headers=bearer("free"))).status_code for _ in range(3)]
        searches = [await c.get("/search", headers=bearer("free")) for _ in range(2)]
    assert runs == [200, 200, 429]
    assert [r.status_code for r in searches] == [200, 429]
    assert searches[1].headers["retry-after"] == "60"


def test_fastapi_openapi_declares_the_429() -> None:
    """Every operation of a metered app documents the 429 with the ErrorBody schema."""
    schema = fastapi_app().openapi()
    for path, method in (("/agents/run", "post"), ("/search", "get"), ("/open", "get")):
        answer = schema["paths"][path][method]["responses"]["429"]
        assert "rate_limited" in answer["description"]
        ref = answer["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/ErrorBody"
    unmetered = FastAPI()

    @unmetered.post("/agents/run", dependencies=[require_quota("agent_runs")])
    async def agents_run() -> None: ...

    @unmetered.get("/open")
    async def open_endpoint() -> None: ...

    setup(unmetered)
    paths = unmetered.openapi()["paths"]
    assert "429" in paths["/agents/run"]["post"]["responses"]  # the dependency can answer it
    assert "429" not in paths["/open"]["get"]["responses"]


async def test_a_refusal_raised_in_a_plain_asgi_app_is_answered_by_the_middleware() -> None:
    """No framework: a QuotaExceededError raised before the response starts becomes the 429."""

    async def plain(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await consume("agent_runs", 2)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = ContextMiddleware(
        plain,
        authenticator=JWTAuthenticator(key=KEY, algorithms=["HS256"]),
        policy=policy(),
        limit_store=InMemoryLimitStore(clock=lambda: MAY_31_LAST_MINUTE),
    )
    async with client(middleware) as c:
        first = await c.get("/", headers=bearer("free"))
        second = await c.get("/", headers=bearer("free"))
    assert first.status_code == 204
    assert second.status_code == 429
    assert second.headers["retry-after"] == "60"
    assert second.json()["error"] == "quota_exceeded"
