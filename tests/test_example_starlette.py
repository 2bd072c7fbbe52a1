"""examples/starlette_app.py: in-process with TestClient, and under a real uvicorn."""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from examples import starlette_app as example
from tests.servers import uvicorn_server

REQUEST_ID = "req-1234567890abcdefghij"
FREE_FEATURES = ["basic_agents", "chat", "history_7d"]


@pytest.fixture
def client() -> TestClient:
    """A TestClient for the example app."""
    with TestClient(example.app) as test_client:
        yield test_client


@pytest.mark.parametrize("path", ["/whoami", "/whoami-sync"])
def test_whoami_reports_the_anonymous_context(client: TestClient, path: str) -> None:
    """/whoami (async) and /whoami-sync (thread pool) see the request's context."""
    response = client.get(path, headers={"X-Request-ID": REQUEST_ID})
    assert response.status_code == 200
    assert response.json() == {
        "user_id": "anonymous",
        "authenticated": False,
        "tier": "free",
        "request_id": REQUEST_ID,
        "correlation_id": REQUEST_ID,
        "features": FREE_FEATURES,
    }
    assert response.headers["x-request-id"] == REQUEST_ID


def test_agent_derives_a_child_chain(client: TestClient) -> None:
    """/agent nests two child contexts and carries the depth into a worker thread."""
    response = client.get("/agent", headers={"X-Request-ID": REQUEST_ID})
    assert response.json() == {
        "root": REQUEST_ID,
        "chain": ["agent.plan", "tool.search"],
        "depth_in_thread": 2,
        "correlation_id": REQUEST_ID,
    }


def test_stream_has_the_context_in_every_chunk(client: TestClient) -> None:
    """Every chunk of /stream names the request's id."""
    response = client.get("/stream", headers={"X-Request-ID": REQUEST_ID})
    assert response.text.splitlines() == [f"{i}:{REQUEST_ID}" for i in range(3)]


def test_background_task_records_the_request(client: TestClient) -> None:
    """The background task after /background sees the request's context."""
    example.audit_log.clear()
    response = client.get("/background", headers={"X-Request-ID": REQUEST_ID})
    assert response.json() == {"queued": True}
    assert example.audit_log == [{"user_id": "anonymous", "request_id": REQUEST_ID}]


def test_websocket_echoes_with_the_context(client: TestClient) -> None:
    """The /ws handler answers each message with the connection's context."""
    with client.websocket_connect("/ws", headers={"X-Request-ID": REQUEST_ID}) as ws:
        ws.send_text("hi")
        message = ws.receive_json()
    assert message["echo"] == "hi"
    assert message["request_id"] == REQUEST_ID
    assert message["user_id"] == "anonymous"


def test_bad_request_id_is_replaced(client: TestClient) -> None:
    """A malformed X-Request-ID is replaced by a generated one."""
    response = client.get("/whoami", headers={"X-Request-ID": "bad id with spaces"})
    request_id = response.json()["request_id"]
    assert request_id != "bad id with spaces"
    assert response.headers["x-request-id"] == request_id


@pytest.mark.slow
def test_example_under_real_uvicorn() -> None:
    """Run under uvicorn, the example answers real HTTP requests with the id headers."""
    with (
        uvicorn_server("examples.starlette_app:app") as base_url,
        httpx.Client(base_url=base_url, timeout=10) as http,
    ):
        first = http.get("/whoami", headers={"X-Request-ID": REQUEST_ID})
        second = http.get("/whoami-sync")
        stream = http.get("/stream", headers={"X-Request-ID": REQUEST_ID})
    assert first.status_code == 200
    assert first.json()["request_id"] == REQUEST_ID
    assert first.headers.get_list("x-request-id") == [REQUEST_ID]
    assert second.json()["user_id"] == "anonymous"
    assert second.headers["x-request-id"] == second.json()["request_id"] != REQUEST_ID
    assert stream.text.splitlines() == [f"{i}:{REQUEST_ID}" for i in range(3)]
