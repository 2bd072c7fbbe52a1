"""A Starlette app whose websockets close when their session or token ends (run by uvicorn).

Configured from the environment: ``CTXVARS_REDIS_URL``, ``CTXVARS_PREFIX`` (keys and channels),
``CTXVARS_SECRET`` (HS256 key) and ``CTXVARS_IDLE`` (the session idle timeout, seconds).

* websocket ``/ws`` — registered with the bus under the caller's context; echoes nothing.
* ``POST /revoke`` — revokes the caller's session; ``POST /revoke-user`` — all of the caller's.
* ``POST /publish`` — publishes ``{"n": <query n>}`` to the caller.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ctxvars_mw import ContextMiddleware, get_context
from ctxvars_mw.auth.jwt import JWTAuthenticator
from ctxvars_mw.auth.redis_sessions import RedisSessionStore
from ctxvars_mw.events import EventBus, RedisBackend

REDIS = os.environ.get("CTXVARS_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("CTXVARS_PREFIX", "ctxvars-test:revocation:")
SECRET = os.environ.get("CTXVARS_SECRET", "s" * 32).encode()
IDLE = float(os.environ.get("CTXVARS_IDLE", "1800"))

store = RedisSessionStore(REDIS, prefix=PREFIX + "s:", idle_timeout=IDLE)
bus = EventBus(RedisBackend(REDIS, channel_prefix=PREFIX + "e:"), session_store=store)


async def events(websocket: WebSocket) -> None:
    await websocket.accept()
    async with bus.connect(websocket):
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass


async def revoke(request: Request) -> JSONResponse:
    session_id = get_context().session_id
    assert session_id is not None
    await store.revoke(session_id)
    return JSONResponse({"revoked": 1})


async def revoke_user(request: Request) -> JSONResponse:
    return JSONResponse({"revoked": await store.revoke_user(get_context().user_id)})


async def publish(request: Request) -> JSONResponse:
    result = await bus.publish_to_current_user({"n": int(request.query_params["n"])})
    return JSONResponse({"id": result.id})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with bus:
        yield
    await store.aclose()


app = ContextMiddleware(
    Starlette(
        routes=[
            WebSocketRoute("/ws", events),
            Route("/revoke", revoke, methods=["POST"]),
            Route("/revoke-user", revoke_user, methods=["POST"]),
            Route("/publish", publish, methods=["POST"]),
        ],
        lifespan=lifespan,
    ),
    authenticator=JWTAuthenticator(key=SECRET, algorithms=["HS256"]),
    session_store=store,
    require_authentication=True,
)
