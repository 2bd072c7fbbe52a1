"""Leaks: 100,000 requests leave no live context and (almost) no memory behind.

The raw ASGI callable of a ``ContextMiddleware`` (real ``JWTAuthenticator``, HS256) is
driven with minimal ``receive``/``send`` functions: 45,000 anonymous and 45,000
authenticated HTTP requests (one in five also attaches a cleanup and awaits in a child
context), and 10,000 authenticated websocket connections that register with an
``EventBus`` and receive an event. Afterwards ``ContextRegistry`` must count 0 live
contexts, and tracemalloc must show under 1 MB of growth compared with the state after a
warm-up of the same mix.

Bounded caches are warmed up, not measured: the 100 users' tokens are verified once (the
verified-token cache), and incoming ``X-Request-ID`` values come from a fixed pool of 100
(the id-validation cache), so what grows after the warm-up is what leaks.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc
from typing import Any

import jwt
import pytest

from ctxvars_mw import (
    ContextMiddleware,
    attach_resource,
    child_context,
    get_context,
    get_context_or_none,
)
from ctxvars_mw.auth.jwt import JWTAuthenticator
from ctxvars_mw.events import EventBus
from ctxvars_mw.testing import ContextRegistry

KEY = bytes(range(32))
USERS = [f"user_{n:03d}_leakcheck" for n in range(100)]
TOKENS = [
    jwt.encode({"sub": u, "exp": int(time.time()) + 3600}, KEY, algorithm="HS256").encode()
    for u in USERS
]
REQUEST_IDS = [f"req-pool-{n:03d}-0123456789".encode() for n in range(100)]
BUDGET = 1_000_000  # bytes of tracemalloc growth allowed after the warm-up
TOTAL = 100_000


class _Socket:
    """What ``EventBus.connect`` needs: ``async send_json``, here over the raw ASGI send."""

    __slots__ = ("_send",)

    def __init__(self, send: Any) -> None:
        self._send = send

    async def send_json(self, data: Any) -> None:
        await self._send({"type": "websocket.send", "text": json.dumps(data)})


def build(bus: EventBus) -> ContextMiddleware:
    """The middleware around an app that reads the context; on ``/full`` it also attaches a
    cleanup and awaits in a child context; on websockets it registers with the bus."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        user = get_context().user_id
        if scope["path"] == "/full":
            attach_resource(bytearray(64), lambda: None)
            with child_context("leakcheck.op"):
                await asyncio.sleep(0)
                assert get_context().user_id == user
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": user.encode()})
            return
        await receive()
        await send({"type": "websocket.accept"})
        async with bus.connect(_Socket(send)):
            await bus.publish_to_current_user({"hello": user})
            await asyncio.sleep(0)  # the event's sender task runs here
        await send({"type": "websocket.close", "code": 1000})

    return ContextMiddleware(app, authenticator=JWTAuthenticator(key=KEY, algorithms=["HS256"]))


def _scope(n: int) -> dict[str, Any]:
    """Request ``n``: 9 in 20 anonymous, 9 in 20 authenticated HTTP, 1 in 10 websocket;
    one HTTP request in 5 takes the ``/full`` path."""
    headers = [(b"host", b"test")]
    if n % 10:
        headers.append((b"x-request-id", REQUEST_IDS[n % 100]))
    kind = "websocket" if n % 10 == 9 else "http"
    if kind == "websocket" or n % 2:
        headers.append((b"authorization", b"Bearer " + TOKENS[n % 100]))
    return {
        "type": kind,
        "path": "/full" if n % 5 == 0 else "/",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
    }


# Scopes and messages are built once: nothing here mutates them, and the harness should
# allocate as little as possible (tracemalloc makes every allocation slow).
SCOPES = [_scope(n) for n in range(1000)]
_HTTP_IN = ({"type": "http.request", "body": b""}, {"type": "http.disconnect"})
_WS_IN = ({"type": "websocket.connect"}, {"type": "websocket.disconnect"})
_EXPECTED = {"http": ["http.response.start"], "websocket": ["websocket.accept", "websocket.send"]}


async def _drive(app: ContextMiddleware, n: int) -> None:
    """One request through the raw ASGI callable; checks what the app answered."""
    scope = SCOPES[n % 1000]
    inbox = iter(_HTTP_IN if scope["type"] == "http" else _WS_IN)
    answered: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(inbox, _HTTP_IN[1] if scope["type"] == "http" else _WS_IN[1])

    async def send(message: dict[str, Any]) -> None:
        if message["type"] in ("http.response.start", "websocket.accept", "websocket.send"):
            answered.append(message["type"])

    await app(scope, receive, send)
    assert answered == _EXPECTED[scope["type"]], (n, answered)


async def _run(app: ContextMiddleware, start: int, count: int, workers: int = 50) -> None:
    async def worker(offset: int) -> None:
        for n in range(start + offset, start + count, workers):
            await _drive(app, n)

    await asyncio.gather(*(worker(k) for k in range(workers)))


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()


@pytest.mark.slow
async def test_100k_requests_leave_no_context_and_under_1mb(
    clean_context_registry: ContextRegistry,
) -> None:
    """100,000 mixed requests: 0 live contexts, < 1 MB tracemalloc growth after warm-up."""
    async with EventBus() as bus:
        app = build(bus)
        tracemalloc.start()
        try:
            await _run(app, 0, 10_000)  # warm-up: caches, pools, free lists
            await _settle()
            before = tracemalloc.get_traced_memory()[0]
            snapshot = tracemalloc.take_snapshot()
            started = time.perf_counter()
            await _run(app, 10_000, TOTAL)
            elapsed = time.perf_counter() - started
            await _settle()
            growth = tracemalloc.get_traced_memory()[0] - before
            top = tracemalloc.take_snapshot().compare_to(snapshot, "lineno")[:5]
        finally:
            tracemalloc.stop()
        assert bus.connection_count == 0
    print(f"{TOTAL:,} requests in {elapsed:.1f}s (tracemalloc on); growth {growth:,} bytes")
    assert clean_context_registry.active_count() == 0
    assert get_context_or_none() is None
    assert growth < BUDGET, "\n".join(map(str, top))
