"""Starlette glue: exception handlers that answer our errors as the middleware does.

When :class:`~ctxvars_mw.ContextMiddleware` wraps the whole app (outermost), an error raised
in an endpoint meets Starlette's own middleware first: without a handler, Starlette's
``ServerErrorMiddleware`` answers 500 before ours sees the error. :func:`install_exception_handlers`
registers handlers that produce the same 401/403/400/429/503 JSON responses (same body, same
``WWW-Authenticate``/``Retry-After`` headers) wherever the middleware sits. FastAPI apps are
Starlette apps, so this works for them too.
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketState

from ..errors import (
    AuthenticationError,
    HTTPError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    ServiceUnavailableError,
)
from ..responses import error_body, error_headers, has_bearer_token

__all__ = ["HANDLED_ERRORS", "error_response", "install_exception_handlers"]

#: The error classes :func:`install_exception_handlers` registers handlers for.
HANDLED_ERRORS: tuple[type[HTTPError], ...] = (
    AuthenticationError,
    PermissionDeniedError,
    InvalidRequestError,
    RateLimitedError,
    ServiceUnavailableError,
)


def error_response(conn: HTTPConnection, exc: HTTPError) -> Response:
    """The JSON response the middleware would send for ``exc`` on ``conn``'s request."""
    body = json.dumps(error_body(exc), separators=(",", ":")).encode("utf-8")
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in error_headers(exc, bearer=has_bearer_token(conn.scope))
    }
    return Response(body, exc.status_code, headers, media_type="application/json")


async def _handle_websocket(websocket: WebSocket, exc: Exception) -> None:
    assert isinstance(exc, HTTPError)
    if websocket.application_state == WebSocketState.CONNECTING and (
        "websocket.http.response" in (websocket.scope.get("extensions") or {})
    ):
        await websocket.send_denial_response(error_response(websocket, exc))
    elif websocket.application_state in (WebSocketState.CONNECTING, WebSocketState.CONNECTED):
        await websocket.close(code=1008, reason=exc.error)


async def _handle(conn: HTTPConnection, exc: Exception) -> Response | None:
    """One handler for both scope types (Starlette passes a Request or a WebSocket)."""
    if isinstance(conn, WebSocket):
        await _handle_websocket(conn, exc)
        return None
    assert isinstance(exc, HTTPError)
    return error_response(conn, exc)


def install_exception_handlers(app: Starlette) -> None:
    """Register handlers on ``app`` (Starlette or FastAPI) for our HTTP-facing errors.

    ``AuthenticationError`` → 401, ``PermissionDeniedError`` → 403, ``InvalidRequestError``
    → 400, ``RateLimitedError`` → 429, ``ServiceUnavailableError`` → 503, each exactly as
    :class:`ContextMiddleware` answers them. On a websocket, the handshake is refused with an
    HTTP denial response where the server supports it, else the socket is closed with code
    1008.
    """
    for exc_class in HANDLED_ERRORS:
        app.add_exception_handler(exc_class, _handle)  # type: ignore[arg-type]
