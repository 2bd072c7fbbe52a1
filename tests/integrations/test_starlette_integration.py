"""ctxvars_mw.integrations.starlette: our errors answered alike wherever the middleware sits."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from ctxvars_mw import (
    AuthenticationRequiredError,
    ContextMiddleware,
    InvalidRequestError,
    InvalidTokenError,
    PermissionDeniedError,
    ServiceUnavailableError,
    get_context,
    requires_permission,
)
from ctxvars_mw.errors import HTTPError
from ctxvars_mw.integrations.starlette import HANDLED_ERRORS, install_exception_handlers
from ctxvars_mw.responses import error_body

from .helpers import TokenTableAuthenticator, bearer

pytestmark = pytest.mark.integration

ERRORS: dict[str, Callable[[], HTTPError]] = {
    "auth-required": AuthenticationRequiredError,
    "invalid-token": InvalidTokenError,
    "denied": lambda: PermissionDeniedError("Needs billing:manage.", required=["billing:manage"]),
    "bad-request": InvalidRequestError,
    "unavailable": lambda: ServiceUnavailableError(retry_after=7),
}


async def raise_error(request: Request) -> JSONResponse:
    raise ERRORS[request.path_params["name"]]()


@requires_permission("billing:manage")
async def billing(request: Request) -> JSONResponse:
    return JSONResponse({"user": get_context().user_id})


async def ws_denied_before_accept(websocket: WebSocket) -> None:
    raise PermissionDeniedError(required=["events:read"])


async def ws_denied_after_accept(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"user": get_context().user_id})
    raise PermissionDeniedError(required=["events:read"])


ROUTES = [
    Route("/raise/{name}", raise_error),
    Route("/billing", billing),
    WebSocketRoute("/ws/before", ws_denied_before_accept),
    WebSocketRoute("/ws/after", ws_denied_after_accept),
]


def added_without_handlers() -> Starlette:
    """The middleware added inside Starlette's stack: it answers 401/403 itself."""
    return Starlette(
        routes=ROUTES, middleware=[Middleware(ContextMiddleware, authenticator=auth())]
    )


def wrapped_with_handlers() -> ContextMiddleware:
    """The middleware wrapped outermost; the handlers answer before ServerErrorMiddleware."""
    app = Starlette(routes=ROUTES)
    install_exception_handlers(app)
    return ContextMiddleware(app, authenticator=auth())


def auth() -> TokenTableAuthenticator:
    return TokenTableAuthenticator()


def client(app: object, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def comparable(response: httpx.Response) -> tuple[object, ...]:
    """What must match between placements: status, exact body, auth/retry headers."""
    return (
        response.status_code,
        response.content,
        response.headers.get("content-type"),
        response.headers.get("www-authenticate"),
        response.headers.get("retry-after"),
    )


async def test_wrapped_app_without_handlers_answers_500_for_a_denial() -> None:
    """The problem the handlers solve: wrapped outermost, Starlette sends a 500 first."""
    async with client(
        ContextMiddleware(Starlette(routes=ROUTES)), raise_app_exceptions=False
    ) as http:
        response = await http.get("/raise/denied")
    assert response.status_code == 500
    assert "x-request-id" in response.headers


@pytest.mark.parametrize("name", ["auth-required", "invalid-token", "denied"])
@pytest.mark.parametrize("token", [None, "tok-alice-business-user"])
async def test_handlers_answer_exactly_as_the_middleware(name: str, token: str | None) -> None:
    """401/403 from the handlers (wrapped) equal the middleware's own (added), byte for byte."""
    headers = bearer(token) if token else {}
    async with client(added_without_handlers()) as http:
        reference = await http.get(f"/raise/{name}", headers=headers)
    async with client(wrapped_with_handlers()) as http:
        handled = await http.get(f"/raise/{name}", headers=headers)
    assert reference.status_code in (401, 403)
    assert comparable(handled) == comparable(reference)
    assert handled.headers["x-request-id"] != reference.headers["x-request-id"]


@pytest.mark.parametrize("name", sorted(ERRORS))
async def test_every_handled_error_gets_its_status_body_and_headers(name: str) -> None:
    """Each error becomes its status with the shared JSON body and headers, plus the ids."""
    exc = ERRORS[name]()
    async with client(wrapped_with_handlers()) as http:
        response = await http.get(
            f"/raise/{name}", headers={"X-Request-ID": "req-0123456789abcdef"}
        )
    assert response.status_code == exc.status_code
    assert response.json() == error_body(exc)
    assert response.headers["x-request-id"] == "req-0123456789abcdef"
    if name == "unavailable":
        assert response.headers["retry-after"] == "7"
    if name == "auth-required":
        assert response.headers["www-authenticate"] == "Bearer"


async def test_insufficient_scope_header_only_when_a_bearer_token_was_sent() -> None:
    """A 403 carries ``WWW-Authenticate: Bearer error="insufficient_scope"`` only with a token."""
    async with client(wrapped_with_handlers()) as http:
        with_token = await http.get("/billing", headers=bearer("tok-alice-business-user"))
        anonymous = await http.get("/billing")
    assert with_token.status_code == 403
    assert with_token.json()["required"] == ["billing:manage"]
    assert with_token.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "authentication_required"


def test_handlers_cover_the_five_http_facing_error_families() -> None:
    """401, 403, 400, 429 and 503 families are registered on the app."""
    app = Starlette()
    install_exception_handlers(app)
    assert set(HANDLED_ERRORS) <= set(app.exception_handlers)
    assert sorted(cls.status_code for cls in HANDLED_ERRORS) == [400, 401, 403, 429, 503]


def test_websocket_denied_before_accept_gets_a_403_denial_response() -> None:
    """Before accept, the handshake is refused with the same 403 JSON (denial extension)."""
    http = TestClient(wrapped_with_handlers())
    with (
        pytest.raises(WebSocketDenialResponse) as caught,
        http.websocket_connect("/ws/before", headers=bearer("tok-alice-business-user")),
    ):
        pass
    denial = caught.value
    assert denial.status_code == 403
    assert denial.json() == {
        "error": "insufficient_scope",
        "error_description": "The request requires higher privileges.",
        "required": ["events:read"],
    }
    assert denial.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'


def test_websocket_denied_after_accept_is_closed_with_1008() -> None:
    """After accept, the socket is closed with policy-violation code 1008."""
    http = TestClient(wrapped_with_handlers())
    with http.websocket_connect("/ws/after", headers=bearer("tok-alice-business-user")) as ws:
        assert ws.receive_json()["user"].startswith("auth0|")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1008
