"""Websockets close when their credentials end: revocation (4001), session expiry (4002),
token expiry (4003) — in process, and across two uvicorn processes sharing Redis."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from ctxvars_mw import ConfigurationError, UserExecutionContext, use_context
from ctxvars_mw.auth.redis_sessions import RedisSessionStore
from ctxvars_mw.auth.sessions import InMemorySessionStore, Revocation, session_digest
from ctxvars_mw.events import (
    CLOSE_REVOKED,
    CLOSE_SESSION_EXPIRED,
    CLOSE_TOKEN_EXPIRED,
    EventBus,
)
from tests.servers import uvicorn_server

from .test_events import RecordingSocket, settle

ALICE = "auth0|5f7c8ec7c33c6c004bbafe82"
BOB = "auth0|5f7c8ec7c33c6c004bbafe83"


class ClosableSocket(RecordingSocket):
    """A websocket stand-in that also records how it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason: str | None = None

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.close_code, self.close_reason = code, reason
        self.closed.set()


async def _open(
    stack: AsyncExitStack, bus: EventBus, user: str, session_id: str | None = None, **claims: Any
) -> ClosableSocket:
    socket = ClosableSocket()
    ctx = UserExecutionContext(user_id=user, session_id=session_id, claims=claims)
    with use_context(ctx):
        await stack.enter_async_context(bus.connect(socket))
    return socket


async def _closed(socket: ClosableSocket, within: float = 2.0) -> int | None:
    async with asyncio.timeout(within):
        await socket.closed.wait()
    return socket.close_code


@pytest.fixture
async def store_and_bus() -> AsyncIterator[tuple[InMemorySessionStore, EventBus]]:
    store = InMemorySessionStore(idle_timeout=0.4, absolute_timeout=5)
    async with EventBus(session_store=store) as bus:
        yield store, bus


async def test_revoked_session_closes_its_sockets_with_4001_and_nothing_more_arrives(
    store_and_bus: tuple[InMemorySessionStore, EventBus],
) -> None:
    """revoke() closes that session's sockets (4001) and only those; revoke_user() closes
    every session-backed socket of the user, not other users' nor token-only ones."""
    store, bus = store_and_bus
    one, two, bobs = [await store.create(u) for u in (ALICE, ALICE, BOB)]
    async with AsyncExitStack() as stack:
        first = await _open(stack, bus, ALICE, one.id)
        second = await _open(stack, bus, ALICE, two.id)
        bob = await _open(stack, bus, BOB, bobs.id)
        token_only = await _open(stack, bus, ALICE)
        await store.revoke(one.id)
        assert await _closed(first) == CLOSE_REVOKED
        assert first.close_reason == "session revoked"
        await bus.publish(ALICE, {"after": "revoke"})
        await second.wait_for(1)
        await store.revoke_user(ALICE)
        assert await _closed(second) == CLOSE_REVOKED
        await bus.publish(ALICE, {"after": "revoke_user"})
        await bus.publish(BOB, {"n": 1})
        await bob.wait_for(1)
        await token_only.wait_for(2)
        await settle()
    assert first.messages == []
    assert [m["event"] for m in second.messages] == [{"after": "revoke"}]
    assert not bob.closed.is_set()
    assert bus.connection_count == 0


async def test_idle_session_closes_with_4002_unless_it_is_touched(
    store_and_bus: tuple[InMemorySessionStore, EventBus],
) -> None:
    """A session idle past its timeout closes its socket with 4002; one kept busy by requests
    (touch) stays open past the first deadline."""
    store, bus = store_and_bus
    idle, busy = await store.create(ALICE), await store.create(ALICE)
    async with AsyncExitStack() as stack:
        idle_socket = await _open(stack, bus, ALICE, idle.id)
        busy_socket = await _open(stack, bus, ALICE, busy.id)
        started = time.monotonic()
        for _ in range(4):
            await asyncio.sleep(0.15)
            await store.touch(busy.id)
        assert await _closed(idle_socket) == CLOSE_SESSION_EXPIRED
        assert not busy_socket.closed.is_set()
        assert await _closed(busy_socket) == CLOSE_SESSION_EXPIRED
    assert time.monotonic() - started >= 0.6 + 0.4


async def test_absolute_timeout_closes_with_4002() -> None:
    """However busy, a session past its absolute timeout closes its socket with 4002."""
    store = InMemorySessionStore(idle_timeout=10, absolute_timeout=0.3)
    async with EventBus(session_store=store) as bus, AsyncExitStack() as stack:
        session = await store.create(ALICE)
        socket = await _open(stack, bus, ALICE, session.id)
        await store.touch(session.id)
        assert await _closed(socket) == CLOSE_SESSION_EXPIRED


async def test_token_expiry_closes_with_4003_without_a_session_store() -> None:
    """A socket whose token's exp passes is closed with 4003; an expired one at once."""
    async with EventBus() as bus, AsyncExitStack() as stack:
        soon = await _open(stack, bus, ALICE, exp=time.time() + 0.3)
        already = await _open(stack, bus, ALICE, exp=int(time.time()) - 5)
        lasting = await _open(stack, bus, ALICE, exp=time.time() + 3600)
        assert await _closed(already, within=0.5) == CLOSE_TOKEN_EXPIRED
        assert await _closed(soon) == CLOSE_TOKEN_EXPIRED
        assert soon.close_reason == "token expired"
        await bus.publish(ALICE, {"n": 1})
        await lasting.wait_for(1)
        await settle()
    assert soon.messages == already.messages == []


async def test_a_session_already_gone_at_connect_closes_at_once(
    store_and_bus: tuple[InMemorySessionStore, EventBus],
) -> None:
    """Registering on a session revoked since the handshake closes the socket with 4001."""
    store, bus = store_and_bus
    session = await store.create(ALICE)
    await store.revoke(session.id)
    async with AsyncExitStack() as stack:
        socket = await _open(stack, bus, ALICE, session.id)
        assert await _closed(socket) == CLOSE_REVOKED
        assert bus.connection_count == 0


async def test_redis_session_idle_expiry_and_other_process_revocation_close_sockets(
    redis_url: str, key_prefix: str
) -> None:
    """With a RedisSessionStore: an idle session's socket closes with 4002; a revoke through a
    second store (another process) closes the other socket with 4001."""
    store = RedisSessionStore(redis_url, prefix=key_prefix, idle_timeout=0.5)
    elsewhere = RedisSessionStore(redis_url, prefix=key_prefix)
    try:
        async with EventBus(session_store=store) as bus, AsyncExitStack() as stack:
            idle, revoked = await store.create(ALICE), await store.create(ALICE)
            idle_socket = await _open(stack, bus, ALICE, idle.id)
            revoked_socket = await _open(stack, bus, ALICE, revoked.id)
            await elsewhere.revoke(revoked.id)
            assert await _closed(revoked_socket) == CLOSE_REVOKED
            assert not idle_socket.closed.is_set()
            assert await _closed(idle_socket) == CLOSE_SESSION_EXPIRED
    finally:
        await store.aclose()
        await elsewhere.aclose()


def test_guard_options_are_checked() -> None:
    """A session_store without get() or a bad recheck interval is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="session_store"):
        EventBus(session_store=object())
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ConfigurationError, match="session_recheck_interval"):
            EventBus(session_recheck_interval=bad)


async def test_redis_revocations_reach_every_watcher_by_digest(
    redis_url: str, key_prefix: str, redis_client: Any
) -> None:
    """The watcher reports None once it listens; a revoke in one store then reaches it as a
    digest, never the id; after its connection is killed it reports None (re-check) again
    and hears revocations again."""
    name = "ctxvars-watch-" + key_prefix.split(":")[1]
    writer = RedisSessionStore(redis_url, prefix=key_prefix)
    reader = RedisSessionStore(f"{redis_url}?client_name={name}", prefix=key_prefix)
    heard: list[Revocation | None] = []
    arrived = asyncio.Event()

    def callback(revocation: Revocation | None) -> None:
        heard.append(revocation)
        arrived.set()

    async def next_heard() -> Revocation | None:
        async with asyncio.timeout(5):
            await arrived.wait()
        arrived.clear()
        return heard[-1]

    watcher = asyncio.create_task(reader.watch_revocations(callback))
    try:
        session = await writer.create(ALICE)
        assert await next_heard() is None  # listening now: check what came before
        sniffer = redis_client.pubsub()
        await sniffer.subscribe(writer.revocation_channel)
        await writer.revoke(session.id)
        assert await next_heard() == Revocation(frozenset({session_digest(session.id)}))
        async with asyncio.timeout(5):
            while (raw := await sniffer.get_message(timeout=1)) is None or raw["type"] != "message":
                pass
        await sniffer.aclose()
        assert session.id.encode() not in raw["data"]
        for client in await redis_client.client_list(_type="pubsub"):
            if client.get("name") == name:
                await redis_client.execute_command("CLIENT", "KILL", "ID", client["id"])
        assert await next_heard() is None
        other = await writer.create(ALICE)
        assert await writer.revoke_user(ALICE) == 1
        assert await next_heard() == Revocation(frozenset({session_digest(other.id)}), ALICE)
    finally:
        watcher.cancel()
        await asyncio.wait([watcher])
        await writer.aclose()
        await reader.aclose()


# -- two uvicorn processes, real websocket clients ---------------------------------------------


def _token(secret: str, user: str, session_id: str, ttl: float = 3600) -> str:
    claims = {"sub": user, "sid": session_id, "exp": int(time.time() + ttl)}
    return jwt.encode(claims, secret, algorithm="HS256")


async def _wait_closed(ws: Any, within: float = 5.0) -> tuple[int | None, str, float]:
    started = time.monotonic()
    async with asyncio.timeout(within):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            return (rcvd.code if rcvd else None), (rcvd.reason if rcvd else ""), started


async def test_revocation_in_one_process_closes_the_socket_open_on_another(
    redis_url: str, key_prefix: str
) -> None:
    """Two uvicorn processes on one Redis: revoking through B closes the socket open on A with
    4001 within a second; another session's socket stays open; an expiring token closes 4003."""
    secret = secrets.token_hex(32)
    env = {"CTXVARS_REDIS_URL": redis_url, "CTXVARS_PREFIX": key_prefix,
           "CTXVARS_SECRET": secret}  # fmt: skip
    store = RedisSessionStore(redis_url, prefix=key_prefix + "s:")
    alice, kept = await store.create(ALICE), await store.create(BOB)
    alice_token = _token(secret, ALICE, alice.id)
    bob_token = _token(secret, BOB, kept.id)
    brief = _token(secret, BOB, kept.id, ttl=2)
    try:
        with (
            uvicorn_server("tests.apps.revocation_app:app", env=env) as a,
            uvicorn_server("tests.apps.revocation_app:app", env=env) as b,
        ):
            ws_a = a.replace("http", "ws") + "/ws"

            def auth(token: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {token}"}

            async with (
                websockets.connect(ws_a, additional_headers=auth(alice_token)) as alice_ws,
                websockets.connect(ws_a, additional_headers=auth(bob_token)) as bob_ws,
                websockets.connect(ws_a, additional_headers=auth(brief)) as brief_ws,
                httpx.AsyncClient(base_url=b) as client,
            ):
                await client.post("/publish?n=1", headers=auth(alice_token))
                assert json.loads(await asyncio.wait_for(alice_ws.recv(), 5))["event"] == {"n": 1}
                revoked = time.monotonic()
                response = await client.post("/revoke", headers=auth(alice_token))
                assert response.status_code == 200
                code, reason, _ = await _wait_closed(alice_ws)
                took = time.monotonic() - revoked
                assert (code, reason) == (CLOSE_REVOKED, "session revoked")
                refused = await client.post("/publish?n=2", headers=auth(alice_token))
                assert refused.status_code == 401
                await client.post("/publish?n=3", headers=auth(bob_token))
                assert json.loads(await asyncio.wait_for(bob_ws.recv(), 5))["event"] == {"n": 3}
                code, reason, _ = await _wait_closed(brief_ws, within=6)
                assert (code, reason) == (CLOSE_TOKEN_EXPIRED, "token expired")
                assert bob_ws.state.name == "OPEN"
    finally:
        await store.aclose()
    print(f"revocation through process B closed the socket on process A in {took * 1000:.0f} ms")
    assert took < 1.0
