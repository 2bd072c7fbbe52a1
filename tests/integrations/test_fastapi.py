"""ctxvars_mw.integrations.fastapi: dependencies, handlers, OpenAPI, both placements."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient

from ctxvars_mw import (
    ConfigurationError,
    ContextMiddleware,
    ContextNotSetError,
    UserExecutionContext,
    get_context,
    requires_tier,
)
from ctxvars_mw.integrations.fastapi import (
    AuthenticatedContext,
    CurrentContext,
    install_exception_handlers,
    require_feature,
    require_permission,
    require_role,
    require_tier,
    setup,
)

from .helpers import ALICE, BOB, TokenTableAuthenticator, bearer

pytestmark = pytest.mark.integration

ALICE_TOKEN = "tok-alice-business-user"  # business tier, role user
BOB_TOKEN = "tok-bob-free-readonly"  # free tier, role readonly


def build() -> FastAPI:
    """The endpoints under test, without any middleware."""
    app = FastAPI()

    @app.get("/me")
    async def me(ctx: CurrentContext) -> dict[str, object]:
        return {"user": ctx.user_id, "authenticated": ctx.is_authenticated}

    @app.get("/me-sync")
    def me_sync(ctx: CurrentContext) -> dict[str, object]:
        return {"user": ctx.user_id, "same": get_context() is ctx}

    @app.get("/private")
    async def private(ctx: AuthenticatedContext) -> dict[str, str]:
        return {"user": ctx.user_id}

    @app.get("/reports", dependencies=[require_tier("business")])
    async def reports() -> dict[str, str]:
        return {"user": get_context().user_id}

    @app.get("/admin")
    async def admin(ctx: Annotated[UserExecutionContext, require_role("admin")]) -> dict[str, str]:
        return {"user": ctx.user_id}

    @app.get("/threads", dependencies=[require_permission("threads:write")])
    async def threads() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/beta", dependencies=[require_feature("beta_features")])
    async def beta() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/decorated/{item}")
    @requires_tier("business")
    async def decorated(item: int, q: str = "none") -> dict[str, object]:
        return {"item": item, "q": q}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, ctx: CurrentContext) -> None:
        await websocket.accept()
        await websocket.send_json({"user": ctx.user_id, "ws": ctx.websocket_client_id})
        await websocket.close()

    return app


def added() -> FastAPI:
    """``setup()``: exception handlers plus ``app.add_middleware(ContextMiddleware, ...)``."""
    app = build()
    setup(app, authenticator=TokenTableAuthenticator())
    return app


def wrapped() -> ContextMiddleware:
    """The app wrapped outermost, with the exception handlers installed."""
    app = build()
    install_exception_handlers(app)
    return ContextMiddleware(app, authenticator=TokenTableAuthenticator())


PLACEMENTS = {"add_middleware": added, "wrapped": wrapped}


@pytest.fixture(params=sorted(PLACEMENTS))
async def http(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """An async client on the app in one placement."""
    app = PLACEMENTS[request.param]()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def test_current_context_is_the_request_context(http: httpx.AsyncClient) -> None:
    """``CurrentContext`` is the middleware's context: anonymous without a token."""
    assert (await http.get("/me")).json() == {"user": "anonymous", "authenticated": False}
    me = await http.get("/me", headers=bearer(ALICE_TOKEN))
    assert me.json() == {"user": ALICE, "authenticated": True}


async def test_sync_endpoints_see_the_same_context(http: httpx.AsyncClient) -> None:
    """A sync endpoint (run in a worker thread) sees the context its dependency returned."""
    response = await http.get("/me-sync", headers=bearer(BOB_TOKEN))
    assert response.json() == {"user": BOB, "same": True}


@pytest.mark.parametrize(
    ("path", "alice", "bob", "anonymous"),
    [
        ("/private", 200, 200, 401),
        ("/reports", 200, 403, 401),
        ("/admin", 403, 403, 401),
        ("/threads", 200, 403, 401),
        ("/beta", 200, 403, 401),
        ("/decorated/7?q=x", 200, 403, 401),
    ],
)
async def test_gates_answer_200_403_401(
    http: httpx.AsyncClient, path: str, alice: int, bob: int, anonymous: int
) -> None:
    """Each gate lets the right caller through, denies (403) the wrong one, 401s anonymous."""
    assert (await http.get(path, headers=bearer(ALICE_TOKEN))).status_code == alice
    denied = await http.get(path, headers=bearer(BOB_TOKEN))
    assert denied.status_code == bob
    if bob == 403:
        assert denied.json()["error"] == "insufficient_scope"
        assert denied.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    missing = await http.get(path)
    assert missing.status_code == anonymous
    assert missing.headers["www-authenticate"] == "Bearer"


async def test_decorated_endpoint_keeps_its_parameters(http: httpx.AsyncClient) -> None:
    """A ``requires_*`` decorated endpoint still gets typed path and query parameters."""
    response = await http.get("/decorated/7?q=x", headers=bearer(ALICE_TOKEN))
    assert response.json() == {"item": 7, "q": "x"}
    bad = await http.get("/decorated/seven", headers=bearer(ALICE_TOKEN))
    assert bad.status_code == 422


async def test_invalid_token_is_401_with_the_ids_set(http: httpx.AsyncClient) -> None:
    """An unknown token is a 401 ``invalid_token`` carrying the request id header."""
    response = await http.get("/me", headers=bearer("tok-nobody"))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert len(response.headers["x-request-id"]) >= 20


def test_openapi_shows_the_bearer_security_scheme() -> None:
    """The schema declares an HTTP bearer scheme and the gated operations require it."""
    schema = added().openapi()
    schemes = schema["components"]["securitySchemes"]
    assert schemes == {
        "HTTPBearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": schemes["HTTPBearer"]["description"],
        }
    }
    for path in ("/me", "/private", "/reports", "/admin", "/threads", "/beta"):
        assert schema["paths"][path]["get"]["security"] == [{"HTTPBearer": []}]


def test_openapi_declares_each_requirements_401_and_403_with_the_error_body() -> None:
    """Each gated operation shows the answers its requirement can give: 401 for
    AuthenticatedContext, 401 and 403 for the tier/role/permission/feature checks, with the
    ErrorBody model; an open operation shows neither."""
    schema = added().openapi()
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, expected in (
        ("/private", {"401"}),
        ("/reports", {"401", "403"}),
        ("/admin", {"401", "403"}),
        ("/threads", {"401", "403"}),
        ("/beta", {"401", "403"}),
        ("/me", set()),
    ):
        responses = schema["paths"][path]["get"]["responses"]
        assert {code for code in responses if code in ("401", "403")} == expected, path
        for code in expected:
            assert responses[code]["content"]["application/json"]["schema"] == ref
    body = schema["components"]["schemas"]["ErrorBody"]
    assert set(body["required"]) == {"error", "error_description"}
    assert set(body["properties"]) == {"error", "error_description", "required"}


def test_openapi_keeps_the_responses_an_operation_declares_itself() -> None:
    """An operation's own 403 response stays as the app declared it."""
    app = FastAPI()
    own = {403: {"description": "Only for the billing team."}}

    @app.get("/billing", dependencies=[require_role("billing")], responses=own)
    async def billing() -> dict[str, bool]:
        return {"ok": True}

    setup(app, authenticator=TokenTableAuthenticator())
    responses = app.openapi()["paths"]["/billing"]["get"]["responses"]
    assert responses["403"] == {"description": "Only for the billing team."}
    assert responses["401"]["description"].startswith("No valid credentials")
    assert app.openapi() is app.openapi()  # built once, like FastAPI's own


async def test_a_real_403_matches_the_documented_error_body(http: httpx.AsyncClient) -> None:
    """What /reports answers a free caller validates against the documented model."""
    from ctxvars_mw.integrations.fastapi import ErrorBody

    response = await http.get("/reports", headers=bearer(BOB_TOKEN))
    assert response.status_code == 403
    assert ErrorBody.model_validate(response.json()).required == ["business"]


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_websocket_endpoint_gets_the_current_context(placement: str) -> None:
    """``CurrentContext`` works in a websocket endpoint, with the socket's client id."""
    with (
        TestClient(PLACEMENTS[placement]()) as client,
        client.websocket_connect("/ws", headers=bearer(ALICE_TOKEN)) as ws,
    ):
        message = ws.receive_json()
    assert message["user"] == ALICE
    assert len(message["ws"]) >= 20


def test_setup_checks_middleware_options_at_once() -> None:
    """A bad middleware option fails in ``setup()``, not at the first request."""
    with pytest.raises(ConfigurationError, match="require_authentication"):
        setup(FastAPI(), require_authentication=True)
    with pytest.raises(ConfigurationError, match="add_middleware"):
        setup(FastAPI(), add_middleware=False, authenticator=TokenTableAuthenticator())


async def test_current_context_without_the_middleware_is_a_clear_error() -> None:
    """Forgetting the middleware raises ContextNotSetError, not a silent anonymous user."""
    transport = httpx.ASGITransport(app=build())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(ContextNotSetError):
            await client.get("/me")


def test_root_package_does_not_import_fastapi() -> None:
    """``import ctxvars_mw`` leaves FastAPI unimported; the integration module imports it."""
    code = (
        "import sys, ctxvars_mw; a = 'fastapi' in sys.modules; "
        "import ctxvars_mw.integrations.fastapi; print(a, 'fastapi' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["False", "True"], out.stderr
