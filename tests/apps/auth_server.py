"""A stand-in authorization server for the auth tests, run by uvicorn in a subprocess.

Serves a JWKS (``GET /jwks``) and an RFC 7662 introspection endpoint (``POST /introspect``,
HTTP Basic client authentication). Tests steer it through ``/control/*``: the key set, the
registered tokens, failure modes; and read how often each endpoint was hit.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CLIENT_ID = "resource-server"
CLIENT_SECRET = "s3cret:with/odd&chars"

_state: dict[str, Any] = {}


def _reset() -> None:
    _state.update(
        jwks={"keys": []}, jwks_mode="ok", tokens={}, hits={"jwks": 0, "introspect": 0}, delay=0.0
    )


_reset()


async def jwks(request: Request) -> Response:
    _state["hits"]["jwks"] += 1
    await asyncio.sleep(_state["delay"])
    mode = _state["jwks_mode"]
    if mode == "error":
        return JSONResponse({"error": "boom"}, status_code=500)
    if mode == "garbage":
        return Response(b"<html>not json</html>", media_type="text/html")
    return JSONResponse(_state["jwks"])


def _client_ok(request: Request) -> bool:
    expected = base64.b64encode(b"resource-server:s3cret%3Awith%2Fodd%26chars").decode()
    return request.headers.get("authorization") == f"Basic {expected}"


async def introspect(request: Request) -> Response:
    _state["hits"]["introspect"] += 1
    if not _client_ok(request):
        return JSONResponse({"error": "invalid_client"}, status_code=401)
    if request.headers.get("content-type") != "application/x-www-form-urlencoded":
        return JSONResponse({"error": "invalid_request"}, status_code=400)
    form = dict(parse_qsl((await request.body()).decode()))
    token = form.get("token")
    if form.get("token_type_hint") != "access_token" or not token:
        return JSONResponse({"error": "invalid_request"}, status_code=400)
    answer = _state["tokens"].get(token)
    if answer == "error":
        return JSONResponse({"error": "server_error"}, status_code=503)
    if answer == "slow":
        await asyncio.sleep(3)
        answer = None
    if answer == "not-json":
        return Response(b"oops", media_type="text/plain")
    return JSONResponse(answer if isinstance(answer, dict) else {"active": False})


async def control(request: Request) -> Response:
    what = request.path_params["what"]
    if request.method == "GET":
        return JSONResponse(_state["hits"])
    body = await request.json()
    if what == "reset":
        _reset()
    elif what == "jwks":
        _state["jwks"] = body
    elif what == "jwks_mode":
        _state["jwks_mode"] = body["mode"]
    elif what == "delay":
        _state["delay"] = float(body["seconds"])
    elif what == "tokens":
        _state["tokens"].update(body)
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/jwks", jwks),
        Route("/introspect", introspect, methods=["POST"]),
        Route("/control/{what}", control, methods=["GET", "POST"]),
    ]
)
