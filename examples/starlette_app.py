"""A Starlette app behind ContextMiddleware: every handler sees who it runs for.

Run it:  uvicorn examples.starlette_app:app
Then:    curl -i localhost:8000/whoami -H 'X-Request-ID: req-1234567890abcdefghij'
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ctxvars_mw import ContextMiddleware, child_context, get_context, run_in_thread

audit_log: list[dict[str, str]] = []


def _summary() -> dict[str, object]:
    ctx = get_context()
    return {
        "user_id": ctx.user_id,
        "authenticated": ctx.is_authenticated,
        "tier": ctx.tier.value,
        "request_id": ctx.request_id,
        "correlation_id": ctx.correlation_id,
        "features": sorted(ctx.features),
    }


async def whoami(request: Request) -> JSONResponse:
    await asyncio.sleep(0)
    return JSONResponse(_summary())


def whoami_sync(request: Request) -> JSONResponse:
    # Starlette runs sync endpoints in a worker thread; the context comes along.
    return JSONResponse(_summary())


async def agent(request: Request) -> JSONResponse:
    with child_context("agent.plan") as plan, child_context("tool.search") as tool:
        depth = await run_in_thread(lambda: get_context().operation_depth)
        return JSONResponse(
            {
                "root": plan.parent_request_id,
                "chain": [plan.operation, tool.operation],
                "depth_in_thread": depth,
                "correlation_id": tool.correlation_id,
            }
        )


async def stream(request: Request) -> StreamingResponse:
    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(3):
            await asyncio.sleep(0)
            yield f"{i}:{get_context().request_id}\n"

    return StreamingResponse(chunks(), media_type="text/plain")


async def with_background(request: Request) -> JSONResponse:
    def record() -> None:
        ctx = get_context()
        audit_log.append({"user_id": ctx.user_id, "request_id": ctx.request_id})

    return JSONResponse({"queued": True}, background=BackgroundTask(record))


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    async for message in websocket.iter_text():
        await websocket.send_json({"echo": message, **_summary()})


routes = [
    Route("/whoami", whoami),
    Route("/whoami-sync", whoami_sync),
    Route("/agent", agent),
    Route("/stream", stream),
    Route("/background", with_background),
    WebSocketRoute("/ws", ws),
]

# Wrapped outermost, so that even the 500 Starlette sends for a crash carries the id headers.
app = ContextMiddleware(Starlette(routes=routes))
