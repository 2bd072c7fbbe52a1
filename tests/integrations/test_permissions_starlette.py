"""Authorization decorators on Starlette HTTP and websocket endpoints, through the middleware."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket

from ctxvars_mw import (
    ContextMiddleware,
    Identity,
    Policy,
    Tier,
    authorize,
    get_context,
    requires_authenticated,
    requires_feature,
    requires_permission,
    requires_role,
    requires_tier,
)

from ..authz_tables import ADMIN, FEATURE_TIER, GATE_TOKENS, OWNER, ROLE_HOLDS
from ..servers import uvicorn_server
from .helpers import TokenTableAuthenticator

TOKENS = {**GATE_TOKENS, "tok-owner": Identity(user_id=OWNER, roles=frozenset({"user"}))}
# Every gate: path suffix → (decorator, who passes).
GATES: dict[str, tuple[Any, Callable[[Identity], bool]]] = {}
for _feature, _tier in FEATURE_TIER.items():
    GATES[f"features/{_feature}"] = (
        requires_feature(_feature),
        lambda i, t=_tier: (i.tier or Tier.FREE) >= t,
    )
for _tier in Tier:
    GATES[f"tiers/{_tier.value}"] = (
        requires_tier(_tier),
        lambda i, t=_tier: (i.tier or Tier.FREE) >= t,
    )
for _perm in sorted(ADMIN):
    GATES[f"permissions/{_perm}"] = (
        requires_permission(_perm),
        lambda i, p=_perm: any(p in ROLE_HOLDS[r] for r in i.roles),
    )
for _role in ("readonly", "user", "admin"):
    GATES[f"roles/{_role}"] = (requires_role(_role), lambda i, r=_role: r in i.roles)


def _http_routes() -> list[BaseRoute]:
    routes: list[BaseRoute] = []
    for path, (decorator, _) in GATES.items():

        async def async_endpoint(request: Request) -> JSONResponse:
            await asyncio.sleep(0)
            return JSONResponse({"user": get_context().user_id})

        def sync_endpoint(request: Request) -> JSONResponse:  # Starlette runs it in a thread
            return JSONResponse({"user": get_context().user_id})

        async def websocket_endpoint(websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.send_json({"user": get_context().user_id})
            await websocket.close()

        routes.append(Route(f"/async/{path}", decorator(async_endpoint)))
        routes.append(Route(f"/sync/{path}", decorator(sync_endpoint)))
        routes.append(WebSocketRoute(f"/ws/{path}", decorator(websocket_endpoint)))
    return routes


class Documents(HTTPEndpoint):
    """A class-based endpoint whose methods are guarded separately."""

    @requires_authenticated()
    async def get(self, request: Request) -> PlainTextResponse:
        authorize("read", owner_id=OWNER, shared_with=())
        return PlainTextResponse("document")

    @requires_permission("threads:delete")
    def delete(self, request: Request) -> PlainTextResponse:
        authorize("delete", owner_id=OWNER)
        return PlainTextResponse("deleted")


app = Starlette(
    routes=[*_http_routes(), Route("/documents", Documents)],
    middleware=[Middleware(ContextMiddleware, authenticator=TokenTableAuthenticator(TOKENS))],
)


@pytest.fixture(scope="module")
def client() -> Any:
    """One TestClient for the module (its portal thread is reused by every request)."""
    with TestClient(app) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    """An ``Authorization: Bearer`` header."""
    return {"Authorization": f"Bearer {token}"}


def websocket_status(client: TestClient, path: str, token: str | None) -> int:
    """101 when the websocket is accepted (and sees the user), else the denial's status."""
    headers = bearer(token) if token else {}
    try:
        with client.websocket_connect(path, headers=headers) as ws:
            assert ws.receive_json()["user"] == (TOKENS[token].user_id if token else "anonymous")
    except WebSocketDenialResponse as denial:
        return denial.status_code
    return 101


@pytest.mark.parametrize("style", ["async", "sync", "ws"])
@pytest.mark.parametrize("token", sorted(TOKENS))
def test_every_gate_follows_the_default_tables(client: TestClient, token: str, style: str) -> None:
    """Each tier/role token passes exactly the gates the contract's tables grant it."""
    identity = TOKENS[token]
    seen: dict[str, int] = {}
    expected: dict[str, int] = {}
    for path, (_, passes) in GATES.items():
        if style == "ws":
            seen[path] = websocket_status(client, f"/ws/{path}", token)
            expected[path] = 101 if passes(identity) else 403
        else:
            seen[path] = client.get(f"/{style}/{path}", headers=bearer(token)).status_code
            expected[path] = 200 if passes(identity) else 403
    assert seen == expected


@pytest.mark.parametrize("style", ["async", "sync", "ws"])
def test_anonymous_gets_401_on_every_gate(client: TestClient, style: str) -> None:
    """Without credentials every gate answers 401 authentication_required, even tiers/free."""
    for path in GATES:
        if style == "ws":
            assert websocket_status(client, f"/ws/{path}", None) == 401, path
            continue
        response = client.get(f"/{style}/{path}")
        assert response.status_code == 401, path
        assert response.json()["error"] == "authentication_required"
        assert response.headers["www-authenticate"] == "Bearer"


def test_403_body_and_headers_for_bearer_requests(client: TestClient) -> None:
    """A bearer request lacking a permission gets insufficient_scope, required and the ids."""
    response = client.get(
        "/async/permissions/billing:manage",
        headers={**bearer("tok-role-user"), "X-Request-ID": "req-7f3a9c2e41b8d6f0"},
    )
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    assert response.headers["x-request-id"] == "req-7f3a9c2e41b8d6f0"
    body = response.json()
    assert body["error"] == "insufficient_scope"
    assert body["required"] == ["billing:manage"]
    assert "billing:manage" in body["error_description"]


def test_websocket_denial_response_carries_the_json_error(client: TestClient) -> None:
    """A refused websocket handshake answers 403 JSON with WWW-Authenticate, never accepting."""
    headers = bearer("tok-tier-free")
    with (
        pytest.raises(WebSocketDenialResponse) as info,
        client.websocket_connect("/ws/tiers/enterprise", headers=headers),
    ):
        pass
    denial = info.value
    assert denial.status_code == 403
    assert denial.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    assert json.loads(denial.content)["required"] == ["enterprise"]


async def test_websocket_without_denial_extension_is_closed_with_1008() -> None:
    """On a server without websocket.http.response, a refused handshake is closed with 1008."""
    sent: list[dict[str, Any]] = []
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "websocket.connect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/ws/roles/admin",
        "raw_path": b"/ws/roles/admin",
        "root_path": "",
        "scheme": "ws",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"authorization", b"Bearer tok-role-user")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
        "state": {},
    }
    await asyncio.wait_for(app(scope, inbox.get, send), timeout=5)
    assert [m["type"] for m in sent] == ["websocket.close"]
    assert sent[0]["code"] == 1008
    assert sent[0]["reason"] == "insufficient_scope"


def test_class_endpoint_methods_and_ownership(client: TestClient) -> None:
    """HTTPEndpoint methods are guarded on their own; authorize() inside them gives 403."""
    assert client.get("/documents", headers=bearer("tok-owner")).text == "document"
    assert client.get("/documents", headers=bearer("tok-role-admin")).status_code == 200
    assert client.get("/documents", headers=bearer("tok-role-user")).status_code == 403
    assert client.get("/documents").status_code == 401
    assert client.delete("/documents", headers=bearer("tok-owner")).status_code == 403
    response = client.delete("/documents", headers=bearer("tok-role-admin"))
    assert response.status_code == 403
    assert response.json()["required"] == ["owner"]


def test_bearer_token_never_reaches_the_logs(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Denials are audited once each, and the bearer token appears in no log record."""
    caplog.set_level(logging.DEBUG)
    token = "tok-role-readonly"
    assert client.get("/async/roles/admin", headers=bearer(token)).status_code == 403
    assert websocket_status(client, "/ws/features/sso", token) == 403
    audit = [r for r in caplog.records if r.name == "ctxvars_mw.audit"]
    assert [(r.check, r.status) for r in audit] == [("role", 403), ("feature", 403)]  # type: ignore[attr-defined]
    assert audit[0].user_id == TOKENS[token].user_id  # type: ignore[attr-defined]
    for record in caplog.records:
        assert token not in repr(vars(record)) + record.getMessage()


@pytest.mark.slow
def test_real_uvicorn_refuses_websocket_handshakes_with_401_and_403() -> None:
    """Over a real socket, denied handshakes get HTTP 401/403 and the allowed one is accepted."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with uvicorn_server("tests.integrations.test_permissions_starlette:app") as base:
        url = base.replace("http://", "ws://")
        with connect(f"{url}/ws/roles/admin", additional_headers=bearer("tok-role-admin")) as ws:
            assert json.loads(ws.recv(timeout=5))["user"] == TOKENS["tok-role-admin"].user_id
        for headers, status in ((bearer("tok-role-user"), 403), ({}, 401)):
            with pytest.raises(InvalidStatus) as info:
                connect(f"{url}/ws/roles/admin", additional_headers=headers, open_timeout=5)
            assert info.value.response.status_code == status


def test_custom_policy_is_resolved_once_by_the_middleware() -> None:
    """A Policy from plain data, wildcards and the token's own scopes decide what passes."""
    policy = Policy.from_mapping(
        {
            "tier_features": {"free": ["chat"], "business": ["reports"]},
            "role_permissions": {"operator": ["agents:*"], "auditor": ["audit:read"]},
            "role_inherits": {"lead": ["operator", "auditor"]},
        }
    )

    @requires_feature("reports")
    @requires_permission("agents:execute", "audit:read")
    async def report(request: Request) -> PlainTextResponse:
        return PlainTextResponse(",".join(sorted(get_context().permissions)))

    user = "user_2hNqYf3kT9xWzL"
    tokens = {
        "tok-lead": Identity(user_id=user, tier=Tier.BUSINESS, roles=frozenset({"lead"})),
        "tok-lead-free": Identity(user_id=user, roles=frozenset({"lead"})),
        "tok-operator": Identity(user_id=user, tier="business", roles=frozenset({"operator"})),
        "tok-operator-scoped": Identity(
            user_id=user, tier="business", roles=frozenset({"operator"}), scopes={"audit:read"}
        ),
        "tok-admin": Identity(user_id=user, tier="internal", roles=frozenset({"admin"})),
    }
    custom = Starlette(
        routes=[Route("/report", report)],
        middleware=[
            Middleware(
                ContextMiddleware, policy=policy, authenticator=TokenTableAuthenticator(tokens)
            )
        ],
    )
    with TestClient(custom) as test_client:
        statuses = {
            token: test_client.get("/report", headers=bearer(token)).status_code for token in tokens
        }
        body = test_client.get("/report", headers=bearer("tok-lead")).text
    assert statuses == {
        "tok-lead": 200,
        "tok-lead-free": 403,  # the feature is business-only in this policy
        "tok-operator": 403,  # agents:* but no audit:read
        "tok-operator-scoped": 200,  # the token's own scope completes it
        "tok-admin": 403,  # 'admin' is unknown to this policy: deny by default
    }
    assert body == "agents:*,audit:read"


def test_outermost_placement_with_exception_handlers() -> None:
    """Wrapped outermost, with install_exception_handlers, denials are still 401/403, not 500."""
    from ctxvars_mw.integrations.starlette import install_exception_handlers

    @requires_role("admin")
    async def admin_page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("admin")

    @requires_role("admin")
    async def admin_socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    inner = Starlette(routes=[Route("/admin", admin_page), WebSocketRoute("/ws", admin_socket)])
    install_exception_handlers(inner)
    outer = ContextMiddleware(inner, authenticator=TokenTableAuthenticator(TOKENS))
    with TestClient(outer) as test_client:
        assert test_client.get("/admin", headers=bearer("tok-role-admin")).text == "admin"
        denied = test_client.get("/admin", headers=bearer("tok-role-user"))
        assert denied.status_code == 403
        assert denied.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
        assert denied.json()["required"] == ["admin"]
        assert "x-request-id" in denied.headers
        assert test_client.get("/admin").status_code == 401
        assert websocket_status(test_client, "/ws", "tok-role-user") == 403
