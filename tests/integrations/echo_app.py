"""A tiny ASGI app for propagation tests: echoes the headers it received and its context.

Run by ``tests.servers.uvicorn_server("tests.integrations.echo_app:app")``. ``/headers``
answers the request headers as JSON (repeated headers joined with ``", "``); ``/context``
answers the downstream context that ``ContextMiddleware(trust_incoming_baggage=True)`` built.
Served as ``echo_app:routed``, ``/custom/...`` reaches a middleware reading other id headers.
"""

from __future__ import annotations

import json
from typing import Any

from ctxvars_mw import ContextMiddleware, get_context
from ctxvars_mw.types import Receive, Scope, Send


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body: Any
    if scope["path"] == "/context":
        body = get_context().to_dict()
    else:
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        body = headers
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# ``/headers`` reports what came over the wire, so the request headers are left as sent.
app = ContextMiddleware(_echo, trust_incoming_baggage=True, update_request_headers=False)

#: The same service configured with other id header names (``/custom/...`` on the server).
custom = ContextMiddleware(
    _echo,
    request_id_header="X-Amzn-Request-Id",
    correlation_id_header="Request-Chain",
    update_request_headers=False,
)


async def routed(scope: Scope, receive: Receive, send: Send) -> None:
    """``/custom/<path>`` goes to :data:`custom` as ``/<path>``; anything else to :data:`app`."""
    path = scope.get("path", "")
    if path.startswith("/custom/"):
        await custom({**scope, "path": path[len("/custom") :]}, receive, send)
    else:
        await app(scope, receive, send)
