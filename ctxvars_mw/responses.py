"""The JSON error responses for our HTTP-facing errors (RFC 6750 style), shared by the
middleware and the framework integrations so that every placement answers alike."""

from __future__ import annotations

import json
from typing import Any

from .errors import (
    AuthenticationError,
    AuthenticationRequiredError,
    HTTPError,
    PermissionDeniedError,
    RateLimitedError,
    ServiceUnavailableError,
)
from .types import Scope, Send

__all__ = ["error_body", "error_headers", "has_bearer_token", "send_error"]

_JSON = (b"content-type", b"application/json")


def error_body(exc: HTTPError) -> dict[str, Any]:
    """The JSON body for ``exc``: ``error``, ``error_description`` (and ``required``)."""
    body: dict[str, Any] = {"error": exc.error, "error_description": exc.description}
    if isinstance(exc, PermissionDeniedError):
        body["required"] = list(exc.required)
    return body


def error_headers(exc: HTTPError, *, bearer: bool) -> list[tuple[bytes, bytes]]:
    """``WWW-Authenticate`` / ``Retry-After`` (and ``RateLimit``) headers for ``exc``
    (``bearer``: the request carried a bearer token)."""
    if isinstance(exc, AuthenticationRequiredError):
        return [(b"www-authenticate", b"Bearer")]
    if isinstance(exc, AuthenticationError):
        return [(b"www-authenticate", f'Bearer error="{exc.error}"'.encode("ascii"))]
    if isinstance(exc, PermissionDeniedError) and bearer:
        return [(b"www-authenticate", b'Bearer error="insufficient_scope"')]
    if isinstance(exc, RateLimitedError):
        return [(b"retry-after", str(exc.retry_after).encode("ascii")), *exc.headers]
    if isinstance(exc, ServiceUnavailableError):
        return [(b"retry-after", str(exc.retry_after).encode("ascii"))]
    return []


def has_bearer_token(scope: Scope) -> bool:
    """True when the request carries an ``Authorization: Bearer`` header."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return True
    return False


async def send_error(
    scope: Scope,
    receive: Any,
    send: Send,
    exc: HTTPError,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    *,
    bearer: bool | None = None,
) -> None:
    """Answer ``scope`` with the error response for ``exc``.

    On HTTP: the JSON response. On a websocket handshake: an HTTP denial response where the
    server supports the ``websocket.http.response`` extension, else close code 1008.
    """
    if bearer is None:
        bearer = has_bearer_token(scope)
    body = json.dumps(error_body(exc), separators=(",", ":")).encode("utf-8")
    headers = [
        _JSON,
        (b"content-length", str(len(body)).encode("ascii")),
        *error_headers(exc, bearer=bearer),
        *(extra_headers or ()),
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send(
            {"type": "websocket.http.response.start", "status": exc.status_code, "headers": headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.close", "code": 1008, "reason": exc.error})
