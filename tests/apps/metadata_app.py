"""A Starlette app that answers with the request metadata its context recorded.

Served by a real uvicorn in ``tests/test_request_metadata.py``::

    uvicorn tests.apps.metadata_app:app       # trusts no proxy
    uvicorn tests.apps.metadata_app:proxied   # trusts 127.0.0.1 (a proxy on this host)

``GET /<any path>`` and the websocket at ``/ws`` answer
``{"client_ip", "user_agent", "method", "path"}`` as the context holds them.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ctxvars_mw import ContextMiddleware, UserExecutionContext, get_context


def described(ctx: UserExecutionContext) -> dict[str, str | None]:
    """The request metadata of ``ctx``."""
    return {
        "client_ip": ctx.client_ip,
        "user_agent": ctx.user_agent,
        "method": ctx.method,
        "path": ctx.path,
    }


async def echo(request: Request) -> JSONResponse:
    return JSONResponse(described(get_context()))


async def echo_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json(described(get_context()))
    await websocket.close()


def starlette_app() -> Starlette:
    """The app every variant wraps."""
    return Starlette(
        routes=[
            WebSocketRoute("/ws", echo_ws),
            Route("/{rest:path}", echo, methods=["GET", "POST"]),
        ]
    )


app = ContextMiddleware(starlette_app())
proxied = ContextMiddleware(starlette_app(), trusted_proxies=["127.0.0.1"])
