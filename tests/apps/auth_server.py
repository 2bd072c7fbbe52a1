"""A stand-in authorization server for the auth tests, run by uvicorn in a subprocess.

Serves a JWKS (``GET /jwks``), an RFC 7662 introspection endpoint (``POST /introspect``,
HTTP Basic client authentication) and metadata documents (OpenID Connect Discovery and RFC
8414, 404 until set). Tests steer it through ``/control/*``: the key set, the registered
tokens, failure modes, the metadata; and read how often each endpoint was hit.
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
        jwks={"keys": []},
        jwks_mode="ok",
        tokens={},
        hits={"jwks": 0, "introspect": 0, "oidc": 0, "rfc8414": 0},
        delay=0.0,
        metadata={"oidc": None, "rfc8414": None},
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
    if isinstance(answer, list):  # [status, body]: an HTTP answer as it is
        status, body = answer
        if isinstance(body, str):
            return Response(body.encode(), status_code=status, media_type="text/html")
        return JSONResponse(body, status_code=status)
    return JSONResponse(answer if isinstance(answer, dict) else {"active": False})


def _metadata(which: str) -> Any:
    async def endpoint(request: Request) -> Response:
        _state["hits"][which] += 1
        document = _state["metadata"][which]
        if document is None:
            return JSONResponse({"error": "not_found"}, status_code=404)
        return JSONResponse(document)

    return endpoint


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
    elif what == "metadata":
        _state["metadata"].update(body)
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/jwks", jwks),
        Route("/introspect", introspect, methods=["POST"]),
        Route("/.well-known/openid-configuration", _metadata("oidc")),
        Route("/.well-known/oauth-authorization-server/{rest:path}", _metadata("rfc8414")),
        Route("/.well-known/oauth-authorization-server", _metadata("rfc8414")),
        Route("/control/{what}", control, methods=["GET", "POST"]),
    ]
)
