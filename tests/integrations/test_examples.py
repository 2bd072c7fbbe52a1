"""The examples, run as users run them: in-process, and under a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest
from django.test import override_settings
from starlette.testclient import TestClient
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ctxvars_mw import Tier
from ctxvars_mw.testing import make_context, mint_token
from examples import fastapi_app
from examples.starlette_app import app as starlette_app
from tests.servers import uvicorn_server

pytestmark = pytest.mark.integration

SECRET = secrets.token_urlsafe(32)
GATED = ["/threads", "/beta", "/reports", "/audit/export", "/admin/users", "/admin/console"]
# Expected status per tier for GATED (the default policy's staircase).
STAIRCASE = {
    "free": [200, 403, 403, 403, 403, 403],
    "early": [200, 200, 403, 403, 403, 403],
    "business": [200, 200, 200, 403, 403, 403],
    "enterprise": [200, 200, 200, 200, 200, 403],
    "internal": [200, 200, 200, 200, 200, 200],
}


def token(tier: str, user_id: str | None = None) -> dict[str, str]:
    """An Authorization header with a demo JWT for a fresh user of ``tier``."""
    ctx = make_context(Tier(tier), user_id=user_id)
    jwt = mint_token(SECRET, ctx=ctx, issuer=fastapi_app.ISSUER, audience=fastapi_app.AUDIENCE)
    return {"Authorization": f"Bearer {jwt}"}


# -- FastAPI -------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", sorted(STAIRCASE))
def test_fastapi_example_gates_follow_the_tier_staircase(tier: str) -> None:
    """Each tier gets 200 exactly where the default policy grants it, 403 elsewhere."""
    headers = token(tier)
    with TestClient(fastapi_app.create_app(SECRET)) as client:
        statuses = [client.get(path, headers=headers).status_code for path in GATED]
        anonymous = [client.get(path).status_code for path in GATED]
    assert statuses == STAIRCASE[tier]
    assert anonymous == [401] * len(GATED)


def test_fastapi_example_agent_chain_links_every_step() -> None:
    """The agent run reports a 4-step chain, each step the child of the one before."""
    with TestClient(fastapi_app.create_app(SECRET)) as client:
        response = client.post("/agents/run", headers=token("business"))
    steps = response.json()["steps"]
    assert [s["operation"] for s in steps] == [None, "agent.plan", "tool.search", "tool.fetch"]
    assert [s["depth"] for s in steps] == [0, 1, 2, 3]
    assert steps[0]["request_id"] == response.headers["x-request-id"]
    for parent, child in itertools.pairwise(steps):
        assert child["parent_request_id"] == parent["request_id"]


def test_fastapi_example_events_reach_only_their_own_user() -> None:
    """Alice's agent event reaches Alice's socket; Bob's first event is his own, not hers."""
    alice, bob = token("business"), token("free")
    with (
        TestClient(fastapi_app.create_app(SECRET)) as client,
        client.websocket_connect("/ws/events", headers=alice) as alice_ws,
        client.websocket_connect("/ws/events", headers=bob) as bob_ws,
    ):
        alice_id = alice_ws.receive_json()["user_id"]
        bob_id = bob_ws.receive_json()["user_id"]
        alice_run = client.post("/agents/run", headers=alice)
        alice_event = alice_ws.receive_json()
        client.post("/agents/run", headers=bob)
        bob_event = bob_ws.receive_json()
    assert alice_event["user_id"] == alice_id
    assert alice_event["correlation_id"] == alice_run.headers["x-correlation-id"]
    assert bob_event["user_id"] == bob_id != alice_id


def test_fastapi_example_websocket_refuses_anonymous_callers() -> None:
    """Without a token the events socket is refused with a 401 before accept."""
    from starlette.testclient import WebSocketDenialResponse

    with (
        TestClient(fastapi_app.create_app(SECRET)) as client,
        pytest.raises(WebSocketDenialResponse) as denied,
        client.websocket_connect("/ws/events"),
    ):
        pass
    assert denied.value.status_code == 401


def test_fastapi_example_owner_only_thread() -> None:
    """A thread is readable by its owner and by an admin, not by another user."""
    owner, other, admin = token("free"), token("early"), token("enterprise")
    with TestClient(fastapi_app.create_app(SECRET)) as client:
        thread = client.post("/threads", headers=owner).json()
        statuses = [
            client.get(f"/threads/{thread['id']}", headers=h).status_code
            for h in (owner, other, admin)
        ]
    assert statuses == [200, 403, 200]


async def test_fastapi_example_under_uvicorn_with_a_real_websocket() -> None:
    """Served by uvicorn: HTTP gates answer over TCP, an event arrives on a real websocket,
    and an anonymous handshake is refused with the JSON 401."""
    headers = token("business")
    with uvicorn_server("examples.fastapi_app:app", env={"CTXVARS_MW_DEMO_SECRET": SECRET}) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/reports", headers=headers)).status_code == 200
            assert (await client.get("/admin/users", headers=headers)).status_code == 403
            assert (await client.get("/reports")).status_code == 401
            ws_url = url.replace("http://", "ws://") + "/ws/events"
            async with connect(ws_url, additional_headers=headers) as ws:
                hello = json.loads(await ws.recv())
                run = await client.post("/agents/run", headers=headers)
                event = json.loads(await ws.recv())
            with pytest.raises(InvalidStatus) as refused:
                async with connect(ws_url):
                    pass
    assert refused.value.response.status_code == 401
    assert b"authentication_required" in refused.value.response.body
    assert event["user_id"] == hello["user_id"]
    assert event["event"] == {"kind": "agent.finished", "steps": 4}
    assert event["correlation_id"] == run.headers["x-correlation-id"]


# -- Django --------------------------------------------------------------------------------


@pytest.fixture
async def django_example(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    """The Django example's ASGI application in-process, on its own URLconf."""
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
    from examples.django_app.asgi import build_application

    with override_settings(ROOT_URLCONF="examples.django_app.urls"):
        transport = httpx.ASGITransport(app=build_application(SECRET))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


@pytest.mark.parametrize(
    ("tier", "expected"),
    [
        ("free", [200, 200, 403, 403, 403]),
        ("business", [200, 200, 200, 403, 403]),
        ("enterprise", [200, 200, 200, 200, 200]),
    ],
)
async def test_django_example_views_see_the_context_and_gate(
    django_example: httpx.AsyncClient, tier: str, expected: list[int]
) -> None:
    """Sync and async views see the caller; decorated views answer 200/403 per tier."""
    headers = token(tier)
    paths = ["/whoami", "/whoami-sync", "/reports", "/admin/users", "/audit/export"]
    responses = [await django_example.get(p, headers=headers) for p in paths]
    assert [r.status_code for r in responses] == expected
    assert responses[0].json()["tier"] == responses[1].json()["tier"] == tier
    assert responses[1].json()["request_id"] == responses[1].headers["x-request-id"]
    anonymous = await django_example.get("/reports")
    assert anonymous.status_code == 401


def test_django_example_under_uvicorn() -> None:
    """Served by uvicorn with its own settings: the wrapped Django app authenticates and gates."""
    env = {
        "CTXVARS_MW_DEMO_SECRET": SECRET,
        "DJANGO_SETTINGS_MODULE": "examples.django_app.settings",
    }
    with uvicorn_server("examples.django_app.asgi:application", env=env) as url:
        sync_view = httpx.get(f"{url}/whoami-sync", headers=token("business"), timeout=10)
        denied = httpx.get(f"{url}/admin/users", headers=token("business"), timeout=10)
        missing = httpx.get(f"{url}/reports", timeout=10)
    assert sync_view.json()["tier"] == "business"
    assert denied.status_code == 403
    assert denied.json()["required"] == ["admin"]
    assert missing.status_code == 401


# -- Starlette -----------------------------------------------------------------------------


async def test_starlette_example_in_process() -> None:
    """The Starlette example's endpoints see the context, in threads and child contexts."""
    transport = httpx.ASGITransport(app=starlette_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        whoami = await client.get("/whoami-sync")
        agent = await client.get("/agent")
    assert whoami.json()["request_id"] == whoami.headers["x-request-id"]
    assert agent.json()["chain"] == ["agent.plan", "tool.search"]
    assert agent.json()["depth_in_thread"] == 2


def test_starlette_example_under_uvicorn() -> None:
    """Served by uvicorn: an accepted X-Request-ID comes back, and the body agrees."""
    rid = "req-" + secrets.token_hex(10)
    with uvicorn_server("examples.starlette_app:app") as url:
        response = httpx.get(f"{url}/whoami", headers={"X-Request-ID": rid}, timeout=10)
    assert response.headers["x-request-id"] == rid
    assert response.json()["request_id"] == rid
