"""A websocket chat where each user sees only their own agent's events.

One process, events in memory (the default)::

    uvicorn examples.chat_app:app --port 8000

Two processes sharing Redis (a message posted to either reaches the user's sockets on both)::

    export CHAT_EVENT_BACKEND=redis REDIS_URL=redis://127.0.0.1:6379/0
    uvicorn examples.chat_app:app --port 8001 &
    uvicorn examples.chat_app:app --port 8002 &

Then listen as alice on one process and talk to her agent through the other::

    python -m websockets 'ws://127.0.0.1:8001/ws?token=alice-demo-token-3f9a1c'
    curl -X POST 127.0.0.1:8002/messages -H 'Authorization: Bearer alice-demo-token-3f9a1c' \\
         -H 'Content-Type: application/json' -d '{"text": "hello agent"}'

Bob (``bob-demo-token-7d2e4b``) never sees alice's events. Demo tokens come from
``CHAT_DEMO_TOKENS`` (``token=user,token=user``) when it is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ctxvars_mw import (
    ConfigurationError,
    Connection,
    ContextMiddleware,
    Identity,
    InvalidTokenError,
    child_context,
    get_context,
)
from ctxvars_mw.events import EventBackend, EventBus, LocalBackend, RedisBackend

DEMO_TOKENS = {"alice-demo-token-3f9a1c": "alice", "bob-demo-token-7d2e4b": "bob"}
MAX_TEXT = 2000


class DemoTokenAuthenticator:
    """Maps opaque bearer tokens to users (a stand-in for a real JWT or session check)."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        # Keyed by a digest: the lookup never compares raw secrets character by character.
        self._users = {_digest(token): user for token, user in tokens.items()}

    async def authenticate(self, conn: Connection) -> Identity | None:
        """The token's user, None without a token, InvalidTokenError for an unknown one."""
        if conn.token is None:
            return None
        user_id = self._users.get(_digest(conn.token))
        if user_id is None:
            raise InvalidTokenError("Unknown demo token.")
        return Identity(user_id=user_id, roles=frozenset({"user"}), auth_method="demo-token")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def tokens_from_env() -> dict[str, str]:
    """``CHAT_DEMO_TOKENS`` (``token=user,...``) or the two built-in demo users."""
    raw = os.environ.get("CHAT_DEMO_TOKENS")
    if not raw:
        return dict(DEMO_TOKENS)
    pairs = (item.partition("=") for item in raw.split(","))
    return {token.strip(): user.strip() for token, _, user in pairs if token and user}


def backend_from_env() -> EventBackend:
    """``CHAT_EVENT_BACKEND=redis`` (with ``REDIS_URL``) or the in-memory default."""
    kind = os.environ.get("CHAT_EVENT_BACKEND", "memory")
    if kind == "memory":
        return LocalBackend()
    if kind == "redis":
        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        prefix = os.environ.get("CHAT_CHANNEL_PREFIX", "chat:events:")
        return RedisBackend(url, channel_prefix=prefix)
    raise ConfigurationError("CHAT_EVENT_BACKEND must be 'memory' or 'redis'")


async def run_agent(bus: EventBus, text: str) -> None:
    """A toy agent: streams a reply to the current user's sockets, on every process."""
    with child_context("agent.reply"):
        await bus.publish_to_current_user({"kind": "agent.started"})
        for word in f"You said: {text}".split():
            await asyncio.sleep(0)
            await bus.publish_to_current_user({"kind": "token", "text": word})
        await bus.publish_to_current_user({"kind": "agent.finished"})


def build_app(
    backend: EventBackend | None = None, tokens: Mapping[str, str] | None = None
) -> ContextMiddleware:
    """The chat app: ``/ws`` (events), ``POST /messages`` (talk to your agent), ``/health``."""
    bus = EventBus(backend if backend is not None else backend_from_env())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with bus:
            yield

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        async with bus.connect(websocket):
            await websocket.send_json({"type": "ready", "user_id": get_context().user_id})
            try:
                while True:
                    message = await websocket.receive_text()
                    text = _text_of(message)
                    if text is None:
                        await websocket.send_json({"type": "error", "error": "invalid_message"})
                    else:
                        await run_agent(bus, text)
            except WebSocketDisconnect:
                pass

    async def post_message(request: Request) -> JSONResponse:
        text = _text_of(await request.body())
        if text is None:
            return JSONResponse(
                {"error": "invalid_request", "error_description": 'Send {"text": "..."}.'},
                status_code=400,
            )
        ctx = get_context()
        body = {"accepted": True, "correlation_id": ctx.correlation_id}
        return JSONResponse(body, status_code=202, background=BackgroundTask(run_agent, bus, text))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "connections": bus.connection_count})

    routes = [
        WebSocketRoute("/ws", ws),
        Route("/messages", post_message, methods=["POST"]),
        Route("/health", health),
    ]
    return ContextMiddleware(
        Starlette(routes=routes, lifespan=lifespan),
        authenticator=DemoTokenAuthenticator(tokens if tokens is not None else tokens_from_env()),
        require_authentication=True,
        exempt_paths=("/health",),
        websocket_token_query_param="token",  # browsers cannot set headers on websockets
    )


def _text_of(raw: bytes | str) -> str | None:
    """The ``text`` of a ``{"text": "..."}`` message, or None when it is anything else."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        return None
    return text


app = build_app()
