"""Authorization on FastAPI: decorated endpoints (signature, DI, OpenAPI kept) and Depends forms."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Query, WebSocket
from starlette.testclient import TestClient, WebSocketDenialResponse

from ctxvars_mw import (
    ContextMiddleware,
    Identity,
    Tier,
    UserExecutionContext,
    authorize,
    depends_feature,
    depends_permission,
    depends_role,
    depends_tier,
    get_context,
    requires_feature,
    requires_permission,
    requires_role,
    requires_tier,
)

from ..authz_tables import ADMIN, FEATURE_TIER, GATE_TOKENS, OWNER, ROLE_HOLDS
from .helpers import TokenTableAuthenticator

TOKENS = {
    **GATE_TOKENS,
    "tok-owner": Identity(user_id=OWNER, tier=Tier.BUSINESS, roles=frozenset({"user"})),
}

# Every gate: path suffix → (decorator, the same check as a dependency, who passes).
Gate = tuple[Any, Callable[[], Any], Callable[[Identity], bool]]
GATES: dict[str, Gate] = {}
for _feature, _tier in FEATURE_TIER.items():
    GATES[f"features/{_feature}"] = (
        requires_feature(_feature),
        depends_feature(_feature),
        lambda i, t=_tier: (i.tier or Tier.FREE) >= t,
    )
for _tier in Tier:
    GATES[f"tiers/{_tier.value}"] = (
        requires_tier(_tier),
        depends_tier(_tier),
        lambda i, t=_tier: (i.tier or Tier.FREE) >= t,
    )
for _perm in sorted(ADMIN):
    GATES[f"permissions/{_perm}"] = (
        requires_permission(_perm),
        depends_permission(_perm),
        lambda i, p=_perm: any(p in ROLE_HOLDS[r] for r in i.roles),
    )
for _role in ("readonly", "user", "admin"):
    GATES[f"roles/{_role}"] = (
        requires_role(_role),
        depends_role(_role),
        lambda i, r=_role: r in i.roles,
    )


def pagination(limit: int = Query(10, ge=1, le=100)) -> int:
    """A plain FastAPI dependency with its own query parameter."""
    return limit


app = FastAPI()
app.add_middleware(ContextMiddleware, authenticator=TokenTableAuthenticator(TOKENS))


def _add_gate_routes(path: str, gate: Gate) -> None:
    decorator, dependency, _ = gate

    @app.get(f"/async/{path}")
    @decorator
    async def async_endpoint() -> dict[str, str]:
        return {"user": get_context().user_id}

    @app.get(f"/sync/{path}")
    @decorator
    def sync_endpoint() -> dict[str, str]:  # FastAPI runs it in a thread
        return {"user": get_context().user_id}

    @app.get(f"/depends/{path}")
    async def depends_endpoint(
        # The default form: this module's annotations are strings, and ``dependency`` is local.
        ctx: UserExecutionContext = Depends(dependency),
    ) -> dict[str, str]:
        return {"user": ctx.user_id}


for _path, _gate in GATES.items():
    _add_gate_routes(_path, _gate)


@app.get("/threads/{thread_id}")
@requires_feature("api_access")
@requires_permission("threads:read")
async def read_thread(
    thread_id: int,
    limit: Annotated[int, Depends(pagination)],
    q: str | None = None,
) -> dict[str, Any]:
    """Read a thread (path, query and a dependency's query parameter)."""
    return {"thread_id": thread_id, "q": q, "limit": limit, "user": get_context().user_id}


@app.delete("/documents/{owner}")
@requires_permission("threads:write")
def delete_document(
    owner: str, ctx: Annotated[UserExecutionContext, Depends(depends_tier("business"))]
) -> dict[str, str]:
    """Delete a document the caller owns (sync endpoint, decorator plus dependency)."""
    authorize("delete", owner_id=owner, ctx=ctx)
    return {"deleted_by": ctx.user_id}


@app.websocket("/ws/agents/{agent_id}")
@requires_permission("agents:execute")
async def agent_socket(websocket: WebSocket, agent_id: str, verbose: bool = False) -> None:
    """A guarded FastAPI websocket endpoint with a path and a query parameter."""
    await websocket.accept()
    await websocket.send_json(
        {"agent": agent_id, "verbose": verbose, "user": get_context().user_id}
    )
    await websocket.close()


@app.get("/reports/{year}", dependencies=[Depends(depends_role("admin"))])
async def yearly_report(year: int) -> dict[str, int]:
    """A route-level dependency check (runs before parameter validation)."""
    return {"year": year}


billing = APIRouter(prefix="/billing", dependencies=[Depends(depends_permission("billing:read"))])


@billing.get("/invoices/{invoice_id}")
async def invoice(invoice_id: int) -> dict[str, int]:
    """Guarded by the router's dependency."""
    return {"invoice_id": invoice_id}


app.include_router(billing)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """One TestClient for the module."""
    with TestClient(app) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    """An ``Authorization: Bearer`` header."""
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("style", ["async", "sync", "depends"])
@pytest.mark.parametrize("token", sorted(TOKENS))
def test_every_gate_follows_the_default_tables(client: TestClient, token: str, style: str) -> None:
    """Decorated (async and sync) and Depends endpoints pass exactly what the tables grant."""
    identity = TOKENS[token]
    seen: dict[str, int] = {}
    expected: dict[str, int] = {}
    for path, (_, _, passes) in GATES.items():
        response = client.get(f"/{style}/{path}", headers=bearer(token))
        seen[path] = response.status_code
        expected[path] = 200 if passes(identity) else 403
        if response.status_code == 200:
            assert response.json() == {"user": identity.user_id}
    assert seen == expected


@pytest.mark.parametrize("style", ["async", "sync", "depends"])
def test_anonymous_gets_401_on_every_gate(client: TestClient, style: str) -> None:
    """Without credentials every decorated and Depends endpoint answers 401."""
    for path in GATES:
        response = client.get(f"/{style}/{path}")
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"] == "authentication_required"


def test_decorated_endpoint_keeps_path_query_and_dependency_parameters(client: TestClient) -> None:
    """FastAPI still parses the path, the query and a dependency's query under the decorators."""
    response = client.get("/threads/42?q=hello&limit=5", headers=bearer("tok-owner"))
    assert response.status_code == 200
    assert response.json() == {"thread_id": 42, "q": "hello", "limit": 5, "user": OWNER}
    assert client.get("/threads/42", headers=bearer("tok-owner")).json()["limit"] == 10
    assert client.get("/threads/nope", headers=bearer("tok-owner")).status_code == 422
    assert client.get("/threads/42?limit=0", headers=bearer("tok-owner")).status_code == 422


def test_stacked_decorators_on_fastapi_report_the_first_failure(client: TestClient) -> None:
    """A free-tier reader fails the outer feature gate; a business readonly user passes both."""
    response = client.get("/threads/1", headers=bearer("tok-role-readonly"))
    assert response.status_code == 403
    assert response.json()["required"] == ["api_access"]
    assert response.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    response = client.get("/threads/1", headers=bearer("tok-tier-business"))
    assert response.status_code == 403
    assert response.json()["required"] == ["threads:read"]


def test_decorator_dependency_and_authorize_combine(client: TestClient) -> None:
    """A sync endpoint with a decorator, a Depends check and authorize() applies all three."""
    assert client.delete(f"/documents/{OWNER}", headers=bearer("tok-owner")).json() == {
        "deleted_by": OWNER
    }
    response = client.delete("/documents/google-oauth2|1234567890", headers=bearer("tok-owner"))
    assert response.status_code == 403
    assert response.json()["required"] == ["owner"]
    response = client.delete(f"/documents/{OWNER}", headers=bearer("tok-role-user"))
    assert response.status_code == 403
    assert response.json()["required"] == ["business"]
    assert client.delete(f"/documents/{OWNER}").status_code == 401


def test_openapi_schema_still_lists_the_parameters(client: TestClient) -> None:
    """The OpenAPI schema is generated and shows the decorated endpoints' real parameters."""
    response = client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    params = {p["name"]: p["in"] for p in paths["/threads/{thread_id}"]["get"]["parameters"]}
    assert params == {"thread_id": "path", "q": "query", "limit": "query"}
    assert paths["/threads/{thread_id}"]["get"]["description"].startswith("Read a thread")
    delete_params = paths["/documents/{owner}"]["delete"]["parameters"]
    assert [p["name"] for p in delete_params] == ["owner"]
    assert "parameters" not in paths["/depends/permissions/agents:read"]["get"]
    assert "parameters" not in paths["/async/permissions/agents:read"]["get"]


def test_fastapi_websocket_is_guarded_before_accept(client: TestClient) -> None:
    """A guarded FastAPI websocket accepts users holding the permission, refuses others first."""
    with client.websocket_connect(
        "/ws/agents/planner?verbose=true", headers=bearer("tok-role-user")
    ) as ws:
        assert ws.receive_json() == {
            "agent": "planner",
            "verbose": True,
            "user": TOKENS["tok-role-user"].user_id,
        }
    for headers, status in ((bearer("tok-role-readonly"), 403), ({}, 401)):
        with (
            pytest.raises(WebSocketDenialResponse) as info,
            client.websocket_connect("/ws/agents/planner", headers=headers),
        ):
            pass
        assert info.value.status_code == status


def test_route_and_router_dependencies_guard_every_route(client: TestClient) -> None:
    """dependencies=[Depends(depends_*())] on a route or a router enforce the same checks."""
    admin, user = bearer("tok-role-admin"), bearer("tok-role-user")
    assert client.get("/reports/2025", headers=admin).json() == {"year": 2025}
    assert client.get("/reports/2025", headers=user).status_code == 403
    assert client.get("/billing/invoices/7", headers=admin).json() == {"invoice_id": 7}
    response = client.get("/billing/invoices/7", headers=user)
    assert response.status_code == 403
    assert response.json()["required"] == ["billing:read"]


def test_dependency_checks_run_before_validation_and_decorators_after(client: TestClient) -> None:
    """Anonymous + malformed path: Depends checks answer 401, a decorated endpoint 422 first."""
    assert client.get("/reports/not-a-year").status_code == 401
    assert client.get("/billing/invoices/not-an-id").status_code == 401
    assert client.get("/threads/not-an-id").status_code == 422
    assert client.get("/threads/5").status_code == 401
