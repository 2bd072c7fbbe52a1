"""A service for the W3C Trace Context test suite: it calls on the trace it was called with.

The suite (``test/test.py`` in the w3c/trace-context repository) POSTs a JSON list of
``{"url": ..., "arguments": [...]}`` to ``/test``; the service POSTs each ``arguments`` to its
``url``, through ``AsyncContextTransport``, so every call carries the request's
``traceparent`` and ``tracestate`` as ContextMiddleware read them. The suite then checks what
arrived. See docs/propagation.md for running the suite against it.

Run it:  uvicorn examples.w3c_service:app --port 5000
Then:    python test/test.py http://127.0.0.1:5000/test    (from a w3c/trace-context checkout)

It calls whatever URLs it is sent: run it on 127.0.0.1, for the suite, and nowhere else.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ctxvars_mw import ContextMiddleware
from ctxvars_mw.propagation import AsyncContextTransport

#: The most calls one request may ask for.
MAX_CALLS = 16
#: Seconds each call may take.
CALL_TIMEOUT = 5.0


class BadInstructionsError(ValueError):
    """The request body is not a list of ``{"url": "http(s)://...", "arguments": [...]}``."""


def _calls(body: bytes) -> list[tuple[str, Any]]:
    """The ``(url, arguments)`` of each call the body asks for."""
    try:
        actions = json.loads(body)
    except ValueError:
        raise BadInstructionsError("the body is not JSON") from None
    if not isinstance(actions, list) or len(actions) > MAX_CALLS:
        raise BadInstructionsError(f"the body must be a list of at most {MAX_CALLS} calls")
    calls = []
    for action in actions:
        if not isinstance(action, dict):
            raise BadInstructionsError("each call must be an object")
        url, arguments = action.get("url"), action.get("arguments") or []
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BadInstructionsError("each call needs an http(s) url")
        if not isinstance(arguments, list):
            raise BadInstructionsError("arguments must be a list")
        calls.append((url, arguments))
    return calls


async def test(request: Request) -> JSONResponse:
    """Make the calls the body asks for, in order, on the request's trace."""
    try:
        calls = _calls(await request.body())
    except BadInstructionsError as exc:
        return JSONResponse({"error": "invalid_request", "error_description": str(exc)}, 400)
    statuses = []
    async with httpx.AsyncClient(transport=AsyncContextTransport(), timeout=CALL_TIMEOUT) as client:
        for url, arguments in calls:
            try:
                statuses.append((await client.post(url, json=arguments)).status_code)
            except httpx.HTTPError:
                statuses.append(None)  # the harness went away: report it, not a 500
    return JSONResponse({"statuses": statuses})


# trust_incoming_baggage: the suite is a trusted caller whose tracestate must travel on.
app = ContextMiddleware(
    Starlette(routes=[Route("/test", test, methods=["POST"])]), trust_incoming_baggage=True
)
