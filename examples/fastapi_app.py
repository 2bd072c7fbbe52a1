"""The demo app: a FastAPI service behind ContextMiddleware, with JWT users of five tiers.

Run it:   python -m ctxvars_mw demo            (prints ready-to-paste curl commands)
Or:       CTXVARS_MW_DEMO_SECRET=<32+ chars> uvicorn examples.fastapi_app:app
          and mint tokens with ``ctxvars_mw.testing.mint_token(secret, user_id=..., tier=...,
          roles=[...], issuer=ISSUER, audience=AUDIENCE)``.

What it shows:
- JWT authentication (HS256 here; RS256/ES256 or a JWKS URL in production);
- endpoints gated by tier, role, feature and permission (200 / 403; 401 without a token);
- resource ownership with ``authorize()``;
- a child-context chain (agent → tool → worker thread), every step with its own request id;
- a websocket endpoint delivering each user's events to that user only (``EventBus``);
- metering by tier: a request rate on every endpoint (429 past it, ``RateLimit`` headers on
  every answer) and a daily ``agent_runs`` quota spent by ``POST /agents/ask``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from starlette.requests import HTTPConnection

from ctxvars_mw import (
    JWTAuthenticator,
    Policy,
    UserExecutionContext,
    authorize,
    child_context,
    consume,
    get_context,
    run_in_thread,
)
from ctxvars_mw.events import EventBus
from ctxvars_mw.integrations.fastapi import (
    AuthenticatedContext,
    CurrentContext,
    require_feature,
    require_permission,
    require_role,
    require_tier,
    setup,
)

ISSUER = "https://auth.ctxvars-demo.invalid/"
AUDIENCE = "ctxvars-demo-api"

#: What each tier may use: requests per minute on every endpoint, agent runs per UTC day.
TIER_LIMITS = {
    "free": {"rate": "60/minute", "quotas": {"agent_runs": "3/day"}},
    "business": {"rate": "600/minute", "quotas": {"agent_runs": "1000/day"}},
    "enterprise": {"rate": "6000/minute", "quotas": {"agent_runs": "unlimited"}},
    "internal": "unlimited",
}
POLICY = Policy.from_mapping({**Policy.default().to_mapping(), "tier_limits": TIER_LIMITS})

router = APIRouter()


def get_bus(conn: HTTPConnection) -> EventBus:
    """The app's event bus (started and stopped by the lifespan)."""
    bus: EventBus = conn.app.state.bus
    return bus


Bus = Annotated[EventBus, Depends(get_bus)]


def _step(ctx: UserExecutionContext) -> dict[str, Any]:
    return {
        "operation": ctx.operation,
        "depth": ctx.operation_depth,
        "request_id": ctx.request_id,
        "parent_request_id": ctx.parent_request_id,
    }


@router.get("/")
async def index() -> dict[str, str]:
    """Public: where to look next."""
    return {"service": "ctxvars_mw demo", "docs": "/docs", "whoami": "/whoami"}


@router.get("/whoami")
async def whoami(ctx: CurrentContext) -> dict[str, Any]:
    """Anyone: who the middleware says you are (anonymous without a token)."""
    return {
        "user_id": ctx.user_id,
        "authenticated": ctx.is_authenticated,
        "tier": ctx.tier.value,
        "roles": sorted(ctx.roles),
        "features": sorted(ctx.features),
        "request_id": ctx.request_id,
        "correlation_id": ctx.correlation_id,
    }


@router.get("/threads", dependencies=[require_permission("threads:read")])
async def list_threads(conn: HTTPConnection) -> dict[str, Any]:
    """Permission ``threads:read``: the caller's own threads."""
    user_id = get_context().user_id
    threads = [t for t in conn.app.state.threads.values() if t["owner"] == user_id]
    return {"threads": threads}


@router.post("/threads", status_code=201)
async def create_thread(
    conn: HTTPConnection, ctx: Annotated[UserExecutionContext, require_permission("threads:write")]
) -> dict[str, Any]:
    """Permission ``threads:write``: create a thread owned by the caller."""
    thread = {"id": secrets.token_hex(8), "owner": ctx.user_id, "title": "New thread"}
    conn.app.state.threads[thread["id"]] = thread
    return thread


@router.get("/threads/{thread_id}")
async def read_thread(thread_id: str, conn: HTTPConnection, _: AuthenticatedContext) -> Any:
    """Ownership: the owner (or a holder of ``resources:read_any``) may read it."""
    thread = conn.app.state.threads.get(thread_id)
    if thread is None:
        raise HTTPException(404, "No such thread.")
    authorize("read", owner_id=thread["owner"])
    return thread


@router.get("/beta", dependencies=[require_feature("beta_features")])
async def beta() -> dict[str, str]:
    """Feature ``beta_features``: early tier and above."""
    return {"beta": "enabled"}


@router.get("/reports", dependencies=[require_tier("business")])
async def reports() -> dict[str, str]:
    """Tier business and above."""
    return {"report": "quarterly", "for": get_context().user_id}


@router.get("/audit/export", dependencies=[require_feature("audit_export")])
async def audit_export() -> dict[str, Any]:
    """Feature ``audit_export``: enterprise tier and above."""
    return {"audit": get_context().audit_trail()}


@router.get("/admin/users", dependencies=[require_role("admin")])
async def admin_users() -> dict[str, int]:
    """Role ``admin``."""
    return {"users": 5}


@router.get("/admin/console", dependencies=[require_feature("admin_console")])
async def admin_console() -> dict[str, str]:
    """Feature ``admin_console``: internal tier only."""
    return {"console": "open"}


@router.post("/agents/run", dependencies=[require_permission("agents:execute")])
async def run_agent(bus: Bus) -> dict[str, Any]:
    """Permission ``agents:execute``: a child-context chain, then an event for the caller."""
    root = get_context()
    steps = [_step(root)]
    with child_context("agent.plan") as plan:
        steps.append(_step(plan))
        with child_context("tool.search") as search:
            steps.append(_step(search))
            # A sync tool in a worker thread: the context comes along.
            steps.append(await run_in_thread(lambda: _step(get_context().child("tool.fetch"))))
            await bus.publish_to_current_user({"kind": "agent.finished", "steps": len(steps)})
    return {"user_id": root.user_id, "correlation_id": root.correlation_id, "steps": steps}


@router.post("/agents/ask", dependencies=[require_permission("agents:execute")])
async def ask_agent() -> dict[str, Any]:
    """Metered: each call spends one of the tier's daily ``agent_runs`` (429 when used up)."""
    usage = await consume("agent_runs")
    return {"answer": "42", "agent_runs_left": usage.remaining}


@router.websocket("/ws/events")
async def events(websocket: WebSocket, ctx: AuthenticatedContext, bus: Bus) -> None:
    """Authenticated websocket: the caller's events, and nobody else's."""
    await websocket.accept()
    async with bus.connect(websocket):
        await websocket.send_json({"type": "connected", "user_id": ctx.user_id})
        try:
            async for _ in websocket.iter_text():
                pass  # events flow the other way; the loop ends when the client leaves
        except WebSocketDisconnect:
            pass


def create_app(secret: str) -> FastAPI:
    """The demo app, authenticating HS256 JWTs signed with ``secret``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with app.state.bus:
            yield

    app = FastAPI(title="ctxvars_mw demo", lifespan=lifespan)
    app.state.bus = EventBus()
    app.state.threads = {}
    app.include_router(router)
    authenticator = JWTAuthenticator(
        key=secret, algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE
    )
    # Exception handlers, OpenAPI error responses and ContextMiddleware, metering in memory
    # (one process; pass limit_store=RedisLimitStore(url) to share the counts).
    setup(app, authenticator=authenticator, policy=POLICY)
    return app


# ``uvicorn examples.fastapi_app:app``: the secret comes from the environment, or is random
# (then only anonymous calls work, since nobody can sign a token).
app = create_app(os.environ.get("CTXVARS_MW_DEMO_SECRET") or secrets.token_urlsafe(32))
