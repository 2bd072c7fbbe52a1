"""examples/chat_app.py: in process, and as two uvicorn processes sharing a real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from websockets.asyncio.client import ClientConnection, connect

from examples.chat_app import DEMO_TOKENS, build_app
from tests.servers import uvicorn_server

ALICE, BOB = "alice-demo-token-3f9a1c", "bob-demo-token-7d2e4b"
REPLY = ["agent.started", "token", "token", "token", "token", "agent.finished"]


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    """The ``kind`` of each received event."""
    return [m["event"]["kind"] for m in messages]


def test_each_user_sees_only_their_own_agents_events_in_process() -> None:
    """Alice's message streams only to Alice's sockets; Bob's socket gets only Bob's."""
    with (
        TestClient(build_app(tokens=DEMO_TOKENS)) as client,
        client.websocket_connect(f"/ws?token={ALICE}") as alice,
        client.websocket_connect("/ws", headers={"Authorization": f"Bearer {BOB}"}) as bob,
    ):
        assert alice.receive_json() == {"type": "ready", "user_id": "alice"}
        assert bob.receive_json() == {"type": "ready", "user_id": "bob"}
        posted = client.post(
            "/messages", json={"text": "hi there"}, headers={"Authorization": f"Bearer {ALICE}"}
        )
        assert posted.status_code == 202
        got = [alice.receive_json() for _ in REPLY]
        assert kinds(got) == REPLY
        assert {m["user_id"] for m in got} == {"alice"}
        assert {m["correlation_id"] for m in got} == {posted.headers["X-Correlation-ID"]}
        bob.send_text(json.dumps({"text": "bob here"}))
        got = [bob.receive_json() for _ in REPLY]
        assert {m["user_id"] for m in got} == {"bob"}
        assert [m["event"].get("text") for m in got][1:5] == ["You", "said:", "bob", "here"]


def test_unauthenticated_and_bad_requests_are_refused() -> None:
    """No token or an unknown token: the handshake is denied; bad message bodies get 400."""
    with TestClient(build_app(tokens=DEMO_TOKENS)) as client:
        for url in ("/ws", "/ws?token=not-a-real-token"):
            with pytest.raises(WebSocketDenialResponse), client.websocket_connect(url):
                pass
        auth = {"Authorization": f"Bearer {ALICE}"}
        for body in (b"{", b"[]", b'{"text": ""}', json.dumps({"text": "x" * 5000}).encode()):
            response = client.post("/messages", content=body, headers=auth)
            assert response.status_code == 400
            assert response.json()["error"] == "invalid_request"
        assert client.get("/health").json() == {"ok": True, "connections": 0}


async def open_socket(base: str, token: str) -> ClientConnection:
    """A real websocket client on ``base``'s /ws, returned once the server says it is ready."""
    socket = await connect(
        base.replace("http", "ws") + "/ws", additional_headers={"Authorization": f"Bearer {token}"}
    )
    ready = json.loads(await socket.recv())
    assert ready["type"] == "ready"
    return socket


async def receive(socket: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next ``count`` JSON messages (10 s at most)."""
    async with asyncio.timeout(10):
        return [json.loads(await socket.recv()) for _ in range(count)]


@pytest.mark.slow
async def test_two_uvicorn_processes_share_events_through_redis(
    redis_url: str, key_prefix: str
) -> None:
    """Posted to process 2, Alice's events reach her sockets on both processes, never Bob's."""
    env = {"CHAT_EVENT_BACKEND": "redis", "REDIS_URL": redis_url, "CHAT_CHANNEL_PREFIX": key_prefix}
    with (
        uvicorn_server("examples.chat_app:app", env=env) as one,
        uvicorn_server("examples.chat_app:app", env=env) as two,
    ):
        alice_one = await open_socket(one, ALICE)
        alice_two = await open_socket(two, ALICE)
        bob_one = await open_socket(one, BOB)
        try:
            async with httpx.AsyncClient() as http:
                posted = await http.post(
                    f"{two}/messages",
                    json={"text": "cross process"},
                    headers={"Authorization": f"Bearer {ALICE}"},
                )
                assert posted.status_code == 202
                for socket in (alice_one, alice_two):
                    got = await receive(socket, len(REPLY))
                    assert kinds(got) == REPLY
                    assert {m["user_id"] for m in got} == {"alice"}
                    assert {m["correlation_id"] for m in got} == {
                        posted.headers["X-Correlation-ID"]
                    }
                posted = await http.post(
                    f"{two}/messages",
                    json={"text": "for bob"},
                    headers={"Authorization": f"Bearer {BOB}"},
                )
                got = await receive(bob_one, len(REPLY))
                assert {m["user_id"] for m in got} == {"bob"}
                assert [m["event"].get("text") for m in got][3:5] == ["for", "bob"]
                health = (await http.get(f"{one}/health")).json()
                assert health == {"ok": True, "connections": 2}
        finally:
            for socket in (alice_one, alice_two, bob_one):
                await socket.close()
        async with httpx.AsyncClient() as http, asyncio.timeout(10):
            for base in (one, two):  # closed sockets leave no registration behind
                while (await http.get(f"{base}/health")).json()["connections"]:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
