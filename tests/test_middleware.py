"""ContextMiddleware, the non-authentication parts (API.md §3).

The core tests drive the raw ASGI callable (no framework); the Starlette tests use a real
Starlette app with its TestClient, and httpx.ASGITransport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket

from ctxvars_mw import (
    AuthenticationRequiredError,
    ConfigurationError,
    Connection,
    ContextMiddleware,
    Identity,
    PermissionDeniedError,
    Policy,
    Tier,
    UserExecutionContext,
    child_context,
    get_context,
    get_context_or_none,
    use_context,
)
from ctxvars_mw.ids import HEADER_ID_RE, is_valid_id
from ctxvars_mw.types import Message, Receive, Scope, Send
from ctxvars_mw.w3c import parse_traceparent
from tests.scopes import http_scope

FREE_FEATURES = frozenset({"chat", "basic_agents", "history_7d"})
VALID_RID = "req-7f3a9c2e41b84d0e9a55"
VALID_CID = "corr-0b1c2d3e4f5a6b7c8d9e"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


# -- a raw ASGI driver ---------------------------------------------------------------------


@dataclass
class Result:
    """What an ASGI app sent back for one request."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    messages: list[Message] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        """Every value of response header ``name``."""
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == key]

    def header(self, name: str) -> str:
        """The one value of header ``name`` (fails if absent or repeated)."""
        (value,) = self.values(name)
        return value

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


async def request(app: Any, path: str = "/", headers: Iterable[tuple[bytes, bytes]] = ()) -> Result:
    """Run one GET request through ``app`` in this task; collect the response."""
    result = Result()
    received = False

    async def receive() -> Message:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # a client that never disconnects
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        result.messages.append(message)
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            result.body += message.get("body", b"")

    await app(http_scope(path, headers), receive, send)
    return result


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw ASGI app answering with the current context as JSON."""
    await asyncio.sleep(0)
    ctx = get_context()
    body = json.dumps(ctx.to_dict()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def hdr(name: str, value: str | bytes) -> tuple[bytes, bytes]:
    """A raw request header."""
    return name.lower().encode(), value if isinstance(value, bytes) else value.encode()


# -- scopes --------------------------------------------------------------------------------


async def test_http_request_gets_a_context_and_id_headers() -> None:
    """An http request runs with a context whose ids are on the response."""
    result = await request(ContextMiddleware(echo_app))
    ctx = result.json()
    assert result.status == 200
    assert len(ctx["request_id"]) >= 20
    assert ctx["correlation_id"] == ctx["request_id"]
    assert result.header("X-Request-ID") == ctx["request_id"]
    assert result.header("X-Correlation-ID") == ctx["correlation_id"]
    assert ctx["websocket_client_id"] is None


async def test_each_request_gets_a_new_request_id() -> None:
    """Requests without an id header each get a fresh one."""
    app = ContextMiddleware(echo_app)
    ids = {(await request(app)).header("X-Request-ID") for _ in range(50)}
    assert len(ids) == 50


async def test_without_authenticator_every_request_is_anonymous() -> None:
    """No authenticator: anonymous, unauthenticated, FREE, no roles/permissions, free features."""
    app = ContextMiddleware(echo_app)
    for headers in ([], [hdr("authorization", "Bearer abc.def.ghi")]):
        data = (await request(app, headers=headers)).json()
        assert data["user_id"] == "anonymous"
        assert data["is_authenticated"] is False
        assert data["tier"] == "free"
        assert data["roles"] == data["permissions"] == []
        assert set(data["features"]) == FREE_FEATURES


async def test_anonymous_features_follow_the_policy() -> None:
    """The anonymous context gets the free tier's features of the configured policy."""
    policy = Policy(tier_features={"free": ["chat_lite"]}, role_permissions={})
    data = (await request(ContextMiddleware(echo_app, policy=policy))).json()
    assert data["features"] == ["chat_lite"]


async def test_request_context_round_trips() -> None:
    """The middleware's context survives to_json/from_json (anonymous included)."""
    seen: list[UserExecutionContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_context())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await request(ContextMiddleware(app), headers=[hdr("traceparent", TRACEPARENT)])
    (ctx,) = seen
    assert UserExecutionContext.from_json(ctx.to_json()) == ctx
    assert ctx.replace(operation="x").request_id == ctx.request_id


async def websocket_session(
    app: Any, headers: Iterable[tuple[bytes, bytes]] = (), *, extensions: bool = True
) -> list[Message]:
    """Open a websocket to ``app``, send one text frame, then disconnect; return what it sent."""
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    for message in (
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "hello"},
        {"type": "websocket.disconnect", "code": 1000},
    ):
        incoming.put_nowait(message)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {**http_scope("/ws", headers), "type": "websocket", "scheme": "ws", "subprotocols": []}
    del scope["method"]
    if extensions:
        scope["extensions"] = {"websocket.http.response": {}}
    await app(scope, incoming.get, send)
    return sent


async def test_websocket_gets_a_context_and_ids_on_accept() -> None:
    """A websocket connection runs with a context; its accept carries the id headers."""
    seen: list[UserExecutionContext] = []

    async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        message = await receive()
        await asyncio.sleep(0)
        seen.append(get_context())
        await send({"type": "websocket.send", "text": message["text"]})
        await receive()

    sent = await websocket_session(ContextMiddleware(ws_app), [hdr("x-request-id", VALID_RID)])
    (ctx,) = seen
    assert ctx.request_id == VALID_RID
    assert ctx.websocket_client_id == VALID_RID
    assert ctx.user_id == "anonymous"
    accept = sent[0]
    assert accept["type"] == "websocket.accept"
    assert (b"x-request-id", VALID_RID.encode()) in accept["headers"]
    assert (b"x-correlation-id", VALID_RID.encode()) in accept["headers"]
    assert get_context_or_none() is None


@pytest.mark.parametrize("scope_type", ["lifespan", "custom.protocol"])
async def test_other_scopes_pass_through_untouched(scope_type: str) -> None:
    """Lifespan and unknown scopes reach the app as they are, without a context."""
    calls: list[tuple[Any, Any, Any, Any]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((scope, receive, send, get_context_or_none()))

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        return None

    scope = {"type": scope_type, "asgi": {"version": "3.0"}, "state": {}}
    before = dict(scope)
    await ContextMiddleware(app)(scope, receive, send)
    (seen_scope, seen_receive, seen_send, ctx) = calls[0]
    assert seen_scope is scope
    assert scope == before
    assert seen_receive is receive
    assert seen_send is send
    assert ctx is None


# -- nothing left behind -------------------------------------------------------------------


async def test_nothing_is_left_set_after_a_request() -> None:
    """After a request the caller's context is what it was (None, or its own)."""
    app = ContextMiddleware(echo_app)
    await request(app)
    assert get_context_or_none() is None
    outer = UserExecutionContext(user_id="user_outer_5f7c8ec7c33c")
    async with use_context(outer):
        data = (await request(app)).json()
        assert data["user_id"] == "anonymous"
        assert get_context() is outer


async def test_nothing_is_left_set_after_an_exception() -> None:
    """An app that raises leaves no context behind."""

    async def boom(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError("app bug")

    with pytest.raises(ValueError):
        await request(ContextMiddleware(boom))
    assert get_context_or_none() is None


async def test_nothing_is_left_set_after_cancellation() -> None:
    """A request cancelled mid-flight restores the caller's context in the same frame."""
    outer = UserExecutionContext(user_id="user_outer_5f7c8ec7c33c")
    inside = asyncio.Event()
    after_cancel: list[UserExecutionContext | None] = []

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        assert get_context().user_id == "anonymous"
        inside.set()
        await asyncio.Event().wait()

    async def caller() -> None:
        async with use_context(outer):
            try:
                await request(ContextMiddleware(slow))
            finally:
                after_cancel.append(get_context_or_none())

    task = asyncio.create_task(caller())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after_cancel == [outer]


# -- concurrency ---------------------------------------------------------------------------

JWT_KEY = "k" * 64


class HS256Authenticator:
    """A real Authenticator: verifies HS256 bearer tokens with PyJWT, subject = user id."""

    async def authenticate(self, conn: Connection) -> Identity | None:
        """The identity of the token's subject, or None without a token."""
        if conn.token is None:
            return None
        claims = jwt.decode(conn.token, JWT_KEY, algorithms=["HS256"])
        return Identity(user_id=claims["sub"], tier=Tier(claims["tier"]), auth_method="jwt")


def token_for(user_id: str, tier: Tier = Tier.BUSINESS) -> str:
    """A signed token for ``user_id``."""
    claims = {"sub": user_id, "tier": tier.value, "exp": int(time.time()) + 600}
    return jwt.encode(claims, JWT_KEY, algorithm="HS256")


async def _concurrent_endpoint(request: Request) -> JSONResponse:
    await asyncio.sleep(0)
    first = get_context()
    await asyncio.sleep(random.random() / 200)
    async with child_context("work") as child:
        await asyncio.sleep(random.random() / 500)
        assert get_context() is child
    await asyncio.sleep(0)
    last = get_context()
    return JSONResponse(
        {
            "first": [first.user_id, first.request_id],
            "last": [last.user_id, last.request_id],
            "child_parent": child.parent_request_id,
            "child_user": child.user_id,
        }
    )


def _concurrent_sync_endpoint(request: Request) -> JSONResponse:
    time.sleep(random.random() / 2000)
    ctx = get_context()
    return JSONResponse(
        {"first": [ctx.user_id, ctx.request_id], "last": [ctx.user_id, ctx.request_id]}
    )


async def test_2000_concurrent_requests_never_see_another_users_context() -> None:
    """2,000 concurrent requests with distinct users and ids, awaiting in between: 0 mismatches."""
    starlette_app = Starlette(
        routes=[Route("/async", _concurrent_endpoint), Route("/sync", _concurrent_sync_endpoint)]
    )
    app = ContextMiddleware(starlette_app, authenticator=HS256Authenticator())
    users = [f"user_{i:05d}_{random.getrandbits(40):010x}" for i in range(2000)]

    async def one(i: int) -> list[str]:
        user = users[i]
        rid = f"req-{i:05d}-{random.getrandbits(64):016x}"
        path = "/sync" if i % 8 == 0 else "/async"
        headers = [hdr("authorization", f"Bearer {token_for(user)}"), hdr("x-request-id", rid)]
        result = await request(app, path, headers)
        data = result.json()
        problems = []
        for key in ("first", "last"):
            if data[key] != [user, rid]:
                problems.append(f"{i}: {key} saw {data[key]}")
        if path == "/async" and (data["child_parent"], data["child_user"]) != (rid, user):
            problems.append(f"{i}: child saw {data['child_parent']}, {data['child_user']}")
        if result.header("X-Request-ID") != rid:
            problems.append(f"{i}: header {result.header('X-Request-ID')}")
        return problems

    results = await asyncio.gather(*(one(i) for i in range(2000)))
    mismatches = [p for problems in results for p in problems]
    assert mismatches == []
    assert get_context_or_none() is None


# -- incoming ids --------------------------------------------------------------------------


async def test_valid_incoming_ids_are_accepted() -> None:
    """A valid X-Request-ID and X-Correlation-ID become the context's ids and come back."""
    app = ContextMiddleware(echo_app)
    result = await request(
        app, headers=[hdr("x-request-id", VALID_RID), hdr("x-correlation-id", VALID_CID)]
    )
    data = result.json()
    assert (data["request_id"], data["correlation_id"]) == (VALID_RID, VALID_CID)
    assert result.header("X-Request-ID") == VALID_RID
    assert result.header("X-Correlation-ID") == VALID_CID
    only_rid = await request(app, headers=[hdr("x-request-id", VALID_RID)])
    assert only_rid.header("X-Correlation-ID") == VALID_RID


@pytest.mark.parametrize(
    "value",
    ["a", "A.b_c:d-e", "0123456789" * 12 + "01234567", "auth0|5f7c8ec7c33c6c004bbafe82"[6:]],
)
async def test_ids_of_the_allowed_alphabet_are_accepted(value: str) -> None:
    """Ids of 1 to 128 characters from ``[A-Za-z0-9._:-]`` are accepted."""
    result = await request(ContextMiddleware(echo_app), headers=[hdr("x-request-id", value)])
    assert result.json()["request_id"] == value


BAD_IDS: list[bytes] = [
    b"evil-id\r\nSet-Cookie: session=stolen",
    b"evil-id\nX-Injected: 1",
    b"evil-id\rX-Injected: 1",
    b"Z" * 200,
    b"Z" * 129,
    b"has spaces in-it",
    b" leading-space-id",
    b"caf\xc3\xa9-non-ascii-id",
    b"raw-\xff\xfe-bytes-id",
    b"<script>alert(1)</script>",
    b"id;with;semicolons",
    b"",
    b"test",
    b"TEST",
    b"placeholder",
    b"null",
    b"mock_12345",
    b"anonymous",
]


@pytest.mark.parametrize("raw", BAD_IDS)
@pytest.mark.parametrize("header", ["x-request-id", "x-correlation-id"])
async def test_invalid_incoming_ids_are_replaced_never_echoed_never_logged(
    raw: bytes, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad id header is replaced by a generated id and appears nowhere in the output or logs."""
    caplog.set_level(logging.DEBUG)
    result = await request(ContextMiddleware(echo_app), headers=[hdr(header, raw)])
    data = result.json()
    key = "request_id" if header == "x-request-id" else "correlation_id"
    assert data[key] != raw.decode("latin-1")
    assert len(data[key]) >= 20
    assert result.header("X-Request-ID") == data["request_id"]
    assert result.header("X-Correlation-ID") == data["correlation_id"]
    if raw and raw.lower() not in (b"test", b"null", b"anonymous", b"placeholder"):
        # Distinctive values: they must not appear anywhere at all.
        for _, value in result.headers:
            assert raw not in value
        assert raw not in result.body
        assert raw.decode("latin-1") not in result.body.decode("latin-1")
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + repr(record.__dict__)
        if raw:
            assert raw.decode("latin-1") not in text
    assert any("replaced an invalid incoming" in r.getMessage() for r in caplog.records)


async def test_duplicated_id_header_is_replaced() -> None:
    """Two X-Request-ID headers are ambiguous: neither value is used nor echoed."""
    first, second = b"req-first-0123456789abcd", b"req-second-0123456789abc"
    result = await request(
        ContextMiddleware(echo_app),
        headers=[hdr("x-request-id", first), hdr("x-request-id", second)],
    )
    request_id = result.header("X-Request-ID").encode()
    assert request_id not in (first, second)
    assert first not in result.body
    assert second not in result.body


async def test_incoming_ids_follow_the_id_rules() -> None:
    """A header id is also checked against the id rules in force."""
    from ctxvars_mw import IdRules, use_id_rules

    app = ContextMiddleware(echo_app)
    with use_id_rules(IdRules.default().forbidding("acme_")):
        refused = await request(app, headers=[hdr("x-request-id", "acme_1")])
    assert refused.json()["request_id"] != "acme_1"
    accepted = await request(app, headers=[hdr("x-request-id", "acme_1")])
    assert accepted.json()["request_id"] == "acme_1"


async def test_untrusted_incoming_ids_are_ignored() -> None:
    """With trust_incoming_ids=False, incoming ids are never used: fresh ones are generated."""
    app = ContextMiddleware(echo_app, trust_incoming_ids=False)
    result = await request(
        app, headers=[hdr("x-request-id", VALID_RID), hdr("x-correlation-id", VALID_CID)]
    )
    data = result.json()
    assert VALID_RID not in (data["request_id"], data["correlation_id"])
    assert VALID_CID not in (data["request_id"], data["correlation_id"])
    assert data["correlation_id"] == data["request_id"]
    assert result.header("X-Request-ID") == data["request_id"]
    assert result.header("X-Correlation-ID") == data["request_id"]
    assert VALID_RID.encode() not in result.body + b"".join(v for _, v in result.headers)


async def test_untrusted_ids_are_not_read_from_a_header_with_an_empty_name() -> None:
    """The "no header name" of trust_incoming_ids=False matches no header, not even b""."""
    app = ContextMiddleware(echo_app, trust_incoming_ids=False)
    result = await request(app, headers=[(b"", VALID_RID.encode())])
    data = result.json()
    assert data["request_id"] != VALID_RID
    assert result.header("X-Request-ID") == data["request_id"]


async def test_trust_incoming_ids_must_be_a_bool() -> None:
    """trust_incoming_ids is checked at construction."""
    with pytest.raises(ConfigurationError):
        ContextMiddleware(echo_app, trust_incoming_ids="no")  # type: ignore[arg-type]


async def test_ids_are_set_not_appended() -> None:
    """When the app sets its own id headers, ours replace them: exactly one of each."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"X-Request-ID", b"app-chosen-request-id-1234"),
            (b"x-request-id", b"another-app-value-12345678"),
            (b"x-correlation-id", b"app-chosen-correlation-12"),
            (b"x-other", b"kept"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    result = await request(ContextMiddleware(app), headers=[hdr("x-request-id", VALID_RID)])
    assert result.values("X-Request-ID") == [VALID_RID]
    assert result.values("X-Correlation-ID") == [VALID_RID]
    assert result.values("X-Other") == ["kept"]


async def test_app_headers_in_another_case_are_kept_unless_they_are_ours() -> None:
    """A non-lowercase header name sends the response through the case-insensitive filter,
    which drops only our two names."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"X-Other", b"kept"), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    result = await request(ContextMiddleware(app), headers=[hdr("x-request-id", VALID_RID)])
    assert result.headers[:2] == [(b"X-Other", b"kept"), (b"content-type", b"text/plain")]
    assert result.values("X-Request-ID") == [VALID_RID]
    assert len(result.headers) == 4


async def test_starlette_app_setting_its_own_request_id_gets_it_replaced() -> None:
    """A Starlette response carrying X-Request-ID ends up with exactly ours."""

    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok", headers={"X-Request-ID": "app-own-id-1234567890"})

    app = ContextMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        response = await client.get("/", headers={"X-Request-ID": VALID_RID})
    assert response.headers.get_list("x-request-id") == [VALID_RID]


async def test_custom_header_names() -> None:
    """Custom request/correlation header names are read and set; the defaults are not."""
    app = ContextMiddleware(
        echo_app, request_id_header="X-Amzn-Trace-Req", correlation_id_header="Request-Chain"
    )
    result = await request(
        app,
        headers=[
            hdr("x-amzn-trace-req", VALID_RID),
            hdr("request-chain", VALID_CID),
            hdr("x-request-id", "ignored-default-header-id"),
        ],
    )
    data = result.json()
    assert (data["request_id"], data["correlation_id"]) == (VALID_RID, VALID_CID)
    assert result.header("x-amzn-trace-req") == VALID_RID
    assert result.header("request-chain") == VALID_CID
    assert result.values("x-request-id") == []
    assert result.values("x-correlation-id") == []


# -- nested middleware ---------------------------------------------------------------------

NESTED_SECRET = b"nested-secret-" + bytes(range(32))
NESTED_USER = "auth0|5f7c8ec7c33c6c004bbafe82"


def _nested_app(seen: dict[str, UserExecutionContext]) -> ContextMiddleware:
    """An anonymous outer ContextMiddleware; under /api a sub-app with its own, authenticating
    ContextMiddleware (as a mounted FastAPI/Starlette sub-application would have)."""
    from starlette.routing import Mount

    from ctxvars_mw import JWTAuthenticator

    async def inner_endpoint(request: Request) -> JSONResponse:
        seen["inner"] = get_context()
        return JSONResponse({"user_id": seen["inner"].user_id})

    inner = ContextMiddleware(
        Starlette(routes=[Route("/whoami", inner_endpoint)]),
        authenticator=JWTAuthenticator(key=NESTED_SECRET, algorithms=["HS256"]),
        require_authentication=True,
    )

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen["outer"] = get_context()
        await Starlette(routes=[Mount("/api", app=inner)])(scope, receive, send)

    return ContextMiddleware(spy)


def _nested_token() -> bytes:
    claims = {"sub": NESTED_USER, "exp": int(time.time()) + 600}
    return b"Bearer " + jwt.encode(claims, NESTED_SECRET, algorithm="HS256").encode()


async def test_a_nested_middleware_keeps_the_outer_requests_ids() -> None:
    """The inner middleware authenticates but keeps the request's ids, incoming or generated:
    the app's context and the one response header agree."""
    seen: dict[str, UserExecutionContext] = {}
    app = _nested_app(seen)
    given = await request(
        app,
        "/api/whoami",
        [hdr("authorization", _nested_token()), hdr("x-request-id", VALID_RID),
         hdr("traceparent", TRACEPARENT)],
    )  # fmt: skip
    assert given.status == 200
    inner, outer = seen["inner"], seen["outer"]
    assert inner.user_id == NESTED_USER
    assert inner.is_authenticated
    assert not outer.is_authenticated
    assert inner.request_id == outer.request_id == VALID_RID == given.header("x-request-id")
    assert inner.correlation_id == outer.correlation_id == given.header("x-correlation-id")
    assert (inner.thread_id, inner.run_id) == (outer.thread_id, outer.run_id)
    assert inner.trace_id == outer.trace_id == TRACE_ID
    generated = await request(app, "/api/whoami", [hdr("authorization", _nested_token())])
    assert seen["inner"].request_id == seen["outer"].request_id
    assert generated.header("x-request-id") == seen["inner"].request_id != VALID_RID


async def test_a_nested_middleware_refusal_carries_the_same_ids() -> None:
    """The inner middleware's 401 goes out with the outer request's ids, once each."""
    seen: dict[str, UserExecutionContext] = {}
    refused = await request(_nested_app(seen), "/api/whoami", [hdr("x-request-id", VALID_RID)])
    assert refused.status == 401
    assert refused.header("x-request-id") == VALID_RID == seen["outer"].request_id
    assert refused.header("x-correlation-id") == seen["outer"].correlation_id


async def test_an_in_process_call_made_by_a_handler_is_a_request_of_its_own() -> None:
    """A handler calling another ContextMiddleware app in process (httpx.ASGITransport) makes
    a new request, with its own header list: new ids, not the calling request's."""
    inner = ContextMiddleware(echo_app)
    seen: dict[str, Any] = {}

    async def outer_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen["outer"] = get_context().request_id
        transport = httpx.ASGITransport(app=inner)
        async with httpx.AsyncClient(transport=transport, base_url="http://inner") as client:
            seen["inner"] = (await client.get("/")).json()["request_id"]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    result = await request(ContextMiddleware(outer_app), headers=[hdr("x-request-id", VALID_RID)])
    assert result.status == 204
    assert seen["outer"] == VALID_RID
    assert seen["inner"] != VALID_RID


async def test_a_scope_dict_used_again_gets_new_ids() -> None:
    """The ids handed to nested middleware leave the scope with the request: a harness that
    reuses its scope dict still gets a new request id each time."""
    app = ContextMiddleware(echo_app)
    scope = http_scope()
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    ids = []
    for _ in range(2):
        await app(scope, receive, send)
        ids.append(json.loads(sent[-1]["body"])["request_id"])
        assert "ctxvars_mw.context" not in scope
    assert ids[0] != ids[1]


# -- traceparent ---------------------------------------------------------------------------


async def test_valid_traceparent_sets_trace_id() -> None:
    """A valid W3C traceparent's trace id becomes ctx.trace_id."""
    data = (
        await request(ContextMiddleware(echo_app), headers=[hdr("traceparent", TRACEPARENT)])
    ).json()
    assert data["trace_id"] == TRACE_ID
    future = f"cc-{TRACE_ID}-00f067aa0ba902b7-01-what-the-future-holds"
    data = (await request(ContextMiddleware(echo_app), headers=[hdr("traceparent", future)])).json()
    assert data["trace_id"] == TRACE_ID


@pytest.mark.parametrize(
    "value",
    [
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}a-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-00f067aa0ba902b-01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-1",
        f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-00F067AA0BA902B7-01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",
        f"00-{TRACE_ID}-00f067aa0ba902b7-01x",
        f"0-{TRACE_ID}-00f067aa0ba902b7-01",
        "not a traceparent",
        "",
    ],
)
async def test_invalid_traceparent_is_ignored(value: str) -> None:
    """Invalid traceparent variants leave trace_id None (and never fail the request)."""
    result = await request(ContextMiddleware(echo_app), headers=[hdr("traceparent", value)])
    assert result.status == 200
    assert result.json()["trace_id"] is None


hex_chars = "0123456789abcdefABCDEF-x0"
traceparents = st.one_of(
    st.tuples(
        st.sampled_from(["00", "01", "ff", "0", "000", "cc", "0A"]),
        st.sampled_from([TRACE_ID, "0" * 32, TRACE_ID.upper(), TRACE_ID[:31]]),
        st.sampled_from(["00f067aa0ba902b7", "0" * 16, "00f067aa0ba902b"]),
        st.sampled_from(["01", "00", "1", "zz"]),
        st.sampled_from(["", "-", "-more", "x", " "]),
    ).map(lambda parts: "-".join(parts[:4]) + parts[4]),
    st.text(alphabet=hex_chars, max_size=70),
).map(str.encode)


@settings(max_examples=300, deadline=None)
@given(raw=traceparents)
def test_request_trace_id_is_parse_traceparents_verdict(raw: bytes) -> None:
    """A request's trace_id is the trace id parse_traceparent finds in its header, or None."""
    parsed = parse_traceparent(raw)
    result = asyncio.run(request(ContextMiddleware(echo_app), headers=[(b"traceparent", raw)]))
    assert result.json()["trace_id"] == (None if parsed is None else parsed[0])


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=140)
    | st.text(alphabet="aZ09._:- tesTMOCK_", max_size=140).map(str.encode)
)
def test_header_id_check_agrees_with_is_valid_id(raw: bytes) -> None:
    """An id header is accepted iff it matches the header pattern and is a valid id
    (through the middleware)."""
    expected = HEADER_ID_RE.fullmatch(raw) is not None and is_valid_id(raw.decode("ascii"))
    headers = [(b"x-request-id", raw), (b"x-correlation-id", raw)]
    result = asyncio.run(request(ContextMiddleware(echo_app), headers=headers))
    body = result.json()
    assert (body["request_id"].encode() == raw) is expected
    assert (body["correlation_id"].encode() == raw) is expected
    assert result.header("x-request-id") == body["request_id"]


async def test_repeated_traceparent_is_ignored() -> None:
    """Two traceparent headers are ambiguous: trace_id stays None."""
    other = f"00-{'a' * 32}-00f067aa0ba902b7-01"
    headers = [hdr("traceparent", TRACEPARENT), hdr("traceparent", other)]
    assert (await request(ContextMiddleware(echo_app), headers=headers)).json()["trace_id"] is None


@pytest.mark.parametrize("value", [TRACEPARENT, bytearray(TRACEPARENT.encode())])
async def test_a_traceparent_that_is_not_bytes_is_ignored(value: object) -> None:
    """A server that hands a header value over as anything but bytes (not ASGI) gets no trace
    from it: the value is never taken for a parsed trace id."""
    headers: Any = [(b"traceparent", value)]
    result = await request(ContextMiddleware(echo_app), headers=headers)
    assert result.status == 200
    assert (result.json()["trace_id"], result.json()["trace_flags"]) == (None, 0)


# -- errors inside the app -----------------------------------------------------------------


async def test_raw_app_crash_gets_a_json_500_with_id_headers() -> None:
    """An exception before the response starts: a 500 with the id headers, then re-raised."""
    sent: list[Message] = []

    async def boom(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("app bug")

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    scope = http_scope(headers=[hdr("x-request-id", VALID_RID)])
    with pytest.raises(RuntimeError):
        await ContextMiddleware(boom)(scope, receive, send)
    assert sent[0]["status"] == 500
    assert (b"x-request-id", VALID_RID.encode()) in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"] == "server_error"


async def test_crash_after_response_started_is_reraised_without_a_second_response() -> None:
    """Once the response has started, an exception propagates and nothing more is sent."""

    async def half(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("mid-stream")

    with pytest.raises(RuntimeError):
        await request(ContextMiddleware(half))


def _raising_routes() -> list[Route]:
    async def crash(request: Request) -> PlainTextResponse:
        raise RuntimeError("endpoint bug")

    async def needs_login(request: Request) -> PlainTextResponse:
        raise AuthenticationRequiredError()

    async def needs_admin(request: Request) -> PlainTextResponse:
        raise PermissionDeniedError("Admins only.", required=["users:manage"])

    return [Route("/crash", crash), Route("/login", needs_login), Route("/admin", needs_admin)]


def test_crash_gets_id_headers_when_wrapped_outermost() -> None:
    """Wrapped around Starlette, the 500 from ServerErrorMiddleware carries the id headers."""
    app = ContextMiddleware(Starlette(routes=_raising_routes()))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/crash", headers={"X-Request-ID": VALID_RID})
    assert response.status_code == 500
    assert response.headers.get_list("x-request-id") == [VALID_RID]
    assert response.headers.get_list("x-correlation-id") == [VALID_RID]


def test_crash_gets_id_headers_with_add_middleware() -> None:
    """Added with add_middleware, the 500 carries the id headers too."""
    starlette_app = Starlette(routes=_raising_routes())
    starlette_app.add_middleware(ContextMiddleware)
    with TestClient(starlette_app, raise_server_exceptions=False) as client:
        response = client.get("/crash", headers={"X-Request-ID": VALID_RID})
    assert response.status_code == 500
    assert response.headers.get_list("x-request-id") == [VALID_RID]
    assert "endpoint bug" not in response.text


def test_authentication_required_raised_by_the_app_becomes_401() -> None:
    """AuthenticationRequiredError before the response: 401 exactly as for missing credentials."""
    starlette_app = Starlette(routes=_raising_routes())
    starlette_app.add_middleware(ContextMiddleware)
    with TestClient(starlette_app) as client:
        response = client.get("/login", headers={"X-Request-ID": VALID_RID})
    assert response.status_code == 401
    assert response.json() == {
        "error": "authentication_required",
        "error_description": "Authentication is required.",
    }
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get_list("x-request-id") == [VALID_RID]


def test_permission_denied_raised_by_the_app_becomes_403() -> None:
    """PermissionDeniedError before the response: 403 JSON naming what was required."""
    starlette_app = Starlette(routes=_raising_routes())
    starlette_app.add_middleware(ContextMiddleware)
    with TestClient(starlette_app) as client:
        plain = client.get("/admin")
        bearer = client.get("/admin", headers={"Authorization": "Bearer some.jwt.token"})
        basic = client.get("/admin", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    for response in (plain, bearer, basic):
        assert response.status_code == 403
        assert response.json() == {
            "error": "insufficient_scope",
            "error_description": "Admins only.",
            "required": ["users:manage"],
        }
        assert len(response.headers["x-request-id"]) >= 20
    assert "www-authenticate" not in plain.headers
    assert "www-authenticate" not in basic.headers
    assert bearer.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'


async def test_permission_denied_from_a_raw_app_becomes_403() -> None:
    """The raw ASGI path answers 403 too, with the id headers."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0)
        raise PermissionDeniedError(required=["billing:read"])

    result = await request(ContextMiddleware(app), headers=[hdr("x-request-id", VALID_RID)])
    assert result.status == 403
    assert result.json()["required"] == ["billing:read"]
    assert result.header("x-request-id") == VALID_RID


@pytest.mark.parametrize("exc", [AuthenticationRequiredError(), PermissionDeniedError()])
async def test_auth_errors_after_the_response_started_are_reraised(exc: Exception) -> None:
    """Once the response started, our 401/403 errors propagate unchanged."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise exc

    with pytest.raises(type(exc)):
        await request(ContextMiddleware(app))


async def test_websocket_denied_before_accept_gets_http_denial_response() -> None:
    """On a websocket, PermissionDeniedError before accept becomes a 403 denial response."""

    async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise PermissionDeniedError(required=["agents:execute"])

    sent = await websocket_session(ContextMiddleware(ws_app), [hdr("x-request-id", VALID_RID)])
    assert sent[0]["type"] == "websocket.http.response.start"
    assert sent[0]["status"] == 403
    assert (b"x-request-id", VALID_RID.encode()) in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["required"] == ["agents:execute"]


async def test_websocket_denied_without_the_extension_closes_with_1008() -> None:
    """Without the denial-response extension the handshake is closed with code 1008."""

    async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise AuthenticationRequiredError()

    sent = await websocket_session(ContextMiddleware(ws_app), extensions=False)
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "authentication_required"}]


@pytest.mark.parametrize("placement", ["outermost", "add_middleware"])
def test_starlette_websocket_denied_before_accept_gets_403(placement: str) -> None:
    """A Starlette websocket endpoint raising PermissionDeniedError gets a 403 denial."""

    async def ws(websocket: WebSocket) -> None:
        raise PermissionDeniedError(required=["agents:execute"])

    starlette_app = Starlette(routes=[WebSocketRoute("/ws", ws)])
    app: Any = starlette_app
    if placement == "outermost":
        app = ContextMiddleware(starlette_app)
    else:
        starlette_app.add_middleware(ContextMiddleware)
    headers = {"Authorization": "Bearer a.b.c", "X-Request-ID": VALID_RID}

    def connect(client: TestClient) -> None:
        with client.websocket_connect("/ws", headers=headers):
            raise AssertionError("the handshake should have been refused")

    with TestClient(app) as client, pytest.raises(WebSocketDenialResponse) as info:
        connect(client)
    denial = info.value
    assert denial.status_code == 403
    assert denial.json()["required"] == ["agents:execute"]
    assert denial.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    assert denial.headers["x-request-id"] == VALID_RID


async def test_websocket_error_after_close_is_reraised() -> None:
    """Once the app closed the websocket, a later PermissionDeniedError propagates."""

    async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.close", "code": 1000})
        raise PermissionDeniedError()

    with pytest.raises(PermissionDeniedError):
        await websocket_session(ContextMiddleware(ws_app))
    assert get_context_or_none() is None


async def test_websocket_denial_sent_by_the_app_carries_id_headers() -> None:
    """An app's own websocket denial response gets the id headers like any HTTP response."""

    async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.http.response.start", "status": 404, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"no such room"})

    sent = await websocket_session(ContextMiddleware(ws_app), [hdr("x-request-id", VALID_RID)])
    assert (b"x-request-id", VALID_RID.encode()) in sent[0]["headers"]


# -- the context in a real Starlette app ---------------------------------------------------

background_seen: list[tuple[str, str, str]] = []


def _starlette_app() -> Starlette:
    async def async_endpoint(request: Request) -> JSONResponse:
        await asyncio.sleep(0)
        return JSONResponse({"request_id": get_context().request_id})

    def sync_endpoint(request: Request) -> JSONResponse:
        return JSONResponse(
            {"request_id": get_context().request_id, "thread": threading.get_ident()}
        )

    async def stream(request: Request) -> StreamingResponse:
        async def chunks():  # type: ignore[no-untyped-def]
            for i in range(5):
                await asyncio.sleep(0)
                yield f"{i}:{get_context().request_id}\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    async def with_background(request: Request) -> PlainTextResponse:
        async def after() -> None:
            await asyncio.sleep(0)
            ctx = get_context()
            background_seen.append(("async", ctx.request_id, ctx.user_id))

        def after_sync() -> None:
            ctx = get_context()
            background_seen.append(("sync", ctx.request_id, ctx.user_id))

        tasks = BackgroundTasks()
        tasks.add_task(after)
        tasks.add_task(after_sync)
        return PlainTextResponse("queued", background=tasks)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            await asyncio.sleep(0)
            ctx = get_context()
            await websocket.send_json(
                {"echo": text, "request_id": ctx.request_id, "ws": ctx.websocket_client_id}
            )

    return Starlette(
        routes=[
            Route("/async", async_endpoint),
            Route("/sync", sync_endpoint),
            Route("/stream", stream),
            Route("/background", with_background),
            WebSocketRoute("/ws", ws),
        ]
    )


@pytest.fixture(params=["outermost", "add_middleware"])
def client(request: pytest.FixtureRequest) -> Any:
    """A TestClient for the Starlette app, with the middleware placed both supported ways."""
    if request.param == "outermost":
        app: Any = ContextMiddleware(_starlette_app())
    else:
        app = _starlette_app()
        app.add_middleware(ContextMiddleware)
    with TestClient(app) as test_client:
        yield test_client


def test_context_in_async_endpoint(client: TestClient) -> None:
    """An async endpoint sees the request's context."""
    response = client.get("/async", headers={"X-Request-ID": VALID_RID})
    assert response.json() == {"request_id": VALID_RID}


def test_context_in_sync_endpoint_run_in_thread_pool(client: TestClient) -> None:
    """A sync endpoint, run in Starlette's thread pool, sees the request's context."""
    response = client.get("/sync", headers={"X-Request-ID": VALID_RID})
    assert response.json()["request_id"] == VALID_RID
    assert response.json()["thread"] != threading.get_ident()


def test_context_in_every_chunk_of_a_streaming_body(client: TestClient) -> None:
    """Every chunk of a streaming response is produced with the request's context."""
    with client.stream("GET", "/stream", headers={"X-Request-ID": VALID_RID}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines == [f"{i}:{VALID_RID}" for i in range(5)]
    assert response.headers["x-request-id"] == VALID_RID


def test_context_in_background_tasks_after_the_response(client: TestClient) -> None:
    """Async and sync background tasks, run after the response, see the context."""
    background_seen.clear()
    response = client.get("/background", headers={"X-Request-ID": VALID_RID})
    assert response.text == "queued"
    assert background_seen == [
        ("async", VALID_RID, "anonymous"),
        ("sync", VALID_RID, "anonymous"),
    ]


def test_context_in_websocket_handler(client: TestClient) -> None:
    """A websocket handler sees the connection's context on every message."""
    with client.websocket_connect("/ws", headers={"X-Request-ID": VALID_RID}) as ws:
        for text in ("one", "two"):
            ws.send_text(text)
            assert ws.receive_json() == {"echo": text, "request_id": VALID_RID, "ws": VALID_RID}


async def test_context_through_httpx_asgi_transport() -> None:
    """Through httpx.ASGITransport the context and id headers behave the same."""
    app = ContextMiddleware(_starlette_app())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        responses = await asyncio.gather(
            *(
                client.get("/async", headers={"X-Request-ID": f"req-{i:03d}-abcdef"})
                for i in range(50)
            )
        )
    for i, response in enumerate(responses):
        assert response.json() == {"request_id": f"req-{i:03d}-abcdef"}
        assert response.headers["x-request-id"] == f"req-{i:03d}-abcdef"
    assert get_context_or_none() is None


# -- options -------------------------------------------------------------------------------


class _NoAuthenticate:
    pass


@pytest.mark.parametrize(
    "options",
    [
        {"authenticator": _NoAuthenticate()},
        {"policy": {"tier_features": {}}},
        {"require_authentication": "yes"},
        {"require_authentication": True},
        {"exempt_paths": "/health"},
        {"exempt_paths": ["health"]},
        {"exempt_paths": [None]},
        {"session_store": object()},
        {"session_failure": "maybe"},
        {"retry_after": 0},
        {"retry_after": True},
        {"retry_after": 2.5},
        {"request_id_header": ""},
        {"request_id_header": "X Request ID"},
        {"request_id_header": "X-Request-ID\r\n"},
        {"request_id_header": b"X-Request-ID"},
        {"request_id_header": "Authorization"},
        {"correlation_id_header": "traceparent"},
        {"correlation_id_header": "Sec-WebSocket-Protocol"},
        {"correlation_id_header": "Baggage"},
        {"request_id_header": "tracestate"},
        {"correlation_id_header": "x-request-id"},
        {"websocket_token_query_param": ""},
        {"websocket_token_query_param": 5},
        {"exempt_paths": 5},
        {"exempt_paths": None},
        {"exempt_paths": b"/health"},
        {"exempt_paths": [5]},
        {"policy": {"roles": {}}},
        {"session_failure": ["open"]},
        {"trust_incoming_ids": "yes"},
        {"trust_incoming_baggage": 1},
    ],
)
def test_bad_options_raise_configuration_error_at_construction(options: dict[str, Any]) -> None:
    """Every bad option is refused with ConfigurationError (a ValueError) naming the option."""
    (name,) = options
    with pytest.raises(ConfigurationError, match=name):
        ContextMiddleware(echo_app, **options)
    with pytest.raises(ValueError):
        ContextMiddleware(echo_app, **options)


def test_non_callable_app_is_refused() -> None:
    """The wrapped app must be callable."""
    with pytest.raises(ConfigurationError):
        ContextMiddleware("not an app")  # type: ignore[arg-type]


def test_options_are_keyword_only() -> None:
    """Options cannot be passed positionally."""
    with pytest.raises(TypeError):
        ContextMiddleware(echo_app, None)  # type: ignore[misc]


# -- one context per request ---------------------------------------------------------------


async def test_a_request_builds_one_context_that_every_reader_shares() -> None:
    """One context object per request, built before the app runs, the same for every reader."""
    from ctxvars_mw.testing import context_registry

    counts: list[int] = []
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        counts.append(context_registry.active_count())
        seen.append(get_context())
        await asyncio.sleep(0)
        seen.append(await asyncio.create_task(_read_context()))
        counts.append(context_registry.active_count())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = ContextMiddleware(app)
    context_registry.enable()
    context_registry.clear()
    try:
        await request(middleware, headers=[hdr("X-Request-ID", VALID_RID)])
    finally:
        context_registry.disable()
    assert counts == [1, 1]
    assert seen[0] is seen[1]


async def test_every_reader_of_a_request_gets_the_same_context_object() -> None:
    """Threads racing to read a new request's context, tasks and the endpoint all get one
    object: one set of generated thread and run ids, however the first read happens."""
    from ctxvars_mw import bind, run_in_thread

    seen: list[UserExecutionContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        barrier = threading.Barrier(8)

        def read() -> UserExecutionContext:
            barrier.wait(timeout=5)
            return get_context()

        threads = [threading.Thread(target=bind(lambda: seen.append(read()))) for _ in range(8)]
        for thread in threads:
            thread.start()
        await asyncio.sleep(0.01)
        for thread in threads:
            thread.join(timeout=5)

        async def in_task() -> UserExecutionContext:
            await asyncio.sleep(0)
            return get_context()

        seen.append(await asyncio.create_task(in_task()))
        seen.append(await run_in_thread(get_context))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await request(ContextMiddleware(app))
    assert len(seen) == 10
    assert all(ctx is seen[0] for ctx in seen)
    assert seen[0].user_id == "anonymous"


async def test_created_at_is_when_the_request_started_not_when_first_read() -> None:
    """The context is dated by the request, however late the endpoint first reads it."""
    from datetime import UTC, datetime, timedelta

    stamps: list[datetime] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        stamps.append(datetime.now(UTC))
        await asyncio.sleep(0.05)
        stamps.append(get_context().created_at)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await request(ContextMiddleware(app))
    entered, created_at = stamps
    assert created_at.tzinfo is not None
    assert created_at <= entered
    assert entered - created_at < timedelta(seconds=1)


async def test_use_context_inside_a_request_shadows_the_request_context_and_restores_it() -> None:
    """A context made current inside a request wins until its block ends."""
    other = UserExecutionContext(user_id="user_2hNqYf3kT9xWzL")
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with use_context(other):
            await asyncio.sleep(0)
            seen.append(get_context().user_id)
        seen.append(get_context().request_id)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await request(ContextMiddleware(app), headers=[hdr("X-Request-ID", VALID_RID)])
    assert seen == ["user_2hNqYf3kT9xWzL", VALID_RID]


async def _read_context() -> object:
    await asyncio.sleep(0)
    return get_context()


# -- incoming id options ----------------------------------------------------------------------


async def _seen_headers(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the request's own id headers as the app sees them."""
    seen = {k.decode(): v.decode() for k, v in scope["headers"] if k.startswith(b"x-")}
    body = json.dumps(seen).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize(
    "headers",
    [[], [hdr("X-Request-ID", "<script>")], [hdr("X-Request-ID", VALID_RID)]],
    ids=["none", "refused", "accepted-without-correlation"],
)
async def test_the_request_headers_show_the_ids_in_use(headers: list[tuple[bytes, bytes]]) -> None:
    """The app reads the ids in use in the request's own headers, not what the client sent;
    the scope leaves the middleware with the headers it came with."""
    app = ContextMiddleware(_seen_headers)
    scope = http_scope("/", headers)
    before = scope["headers"]
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    seen = json.loads(sent[-1]["body"])
    response = dict(sent[0]["headers"])
    assert seen == {
        "x-request-id": response[b"x-request-id"].decode(),
        "x-correlation-id": response[b"x-correlation-id"].decode(),
    }
    assert scope["headers"] is before


async def _header_list(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the request's whole header list as the app sees it, and its ids."""
    ctx = get_context()
    seen = {
        "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
        "ids": [ctx.request_id, ctx.correlation_id],
    }
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(seen).encode()})


@pytest.mark.parametrize(
    ("headers", "options"),
    [
        ([], {}),
        ([hdr("X-Request-ID", VALID_RID)], {}),
        ([hdr("X-Correlation-ID", VALID_CID)], {}),
        ([hdr("X-Request-ID", VALID_RID), hdr("X-Correlation-ID", "<bad>")], {}),
        ([hdr("X-Request-ID", "<bad>"), hdr("X-Correlation-ID", VALID_CID)], {}),
        ([hdr("X-Request-ID", VALID_RID), hdr("X-Request-ID", VALID_CID)], {}),
        (
            [hdr("X-Request-ID", VALID_RID), hdr("X-Correlation-ID", VALID_CID)],
            {"trust_incoming_ids": False},
        ),
    ],
    ids=[
        "none",
        "request-id-only",
        "correlation-id-only",
        "correlation-id-refused",
        "request-id-refused",
        "request-id-repeated",
        "untrusted",
    ],
)
async def test_the_request_carries_each_id_header_once_with_the_id_in_use(
    headers: list[tuple[bytes, bytes]], options: dict[str, Any]
) -> None:
    """Whatever came in, the app's request has each id header exactly once, holding the id in
    use, and every other header as it came, in its order."""
    others = [hdr("Host", "api.example.org"), hdr("Accept", "*/*")]
    result = await request(
        ContextMiddleware(_header_list, **options), headers=[others[0], *headers, others[1]]
    )
    body = result.json()
    seen = [tuple(pair) for pair in body["headers"]]
    names = ("x-request-id", "x-correlation-id")
    ids = [(name, value) for name, value in seen if name in names]
    assert sorted(ids) == sorted(zip(names, body["ids"], strict=True))
    assert [pair for pair in seen if pair not in ids] == [
        (k.decode(), v.decode()) for k, v in others
    ]
    if options.get("trust_incoming_ids") is False:
        assert VALID_RID not in body["ids"]


def test_a_websocket_endpoint_reads_the_ids_in_use_from_its_headers() -> None:
    """On a websocket, ``websocket.headers`` shows the generated id, as ctx.request_id."""

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(
            {"header": websocket.headers["x-request-id"], "ctx": get_context().request_id}
        )
        await websocket.close()

    app = ContextMiddleware(Starlette(routes=[WebSocketRoute("/ws", ws)]))
    with TestClient(app) as client, client.websocket_connect("/ws") as socket:
        seen = socket.receive_json()
    assert seen["header"] == seen["ctx"]
    assert len(seen["ctx"]) >= 20


async def test_update_request_headers_off_leaves_the_request_as_sent() -> None:
    """``update_request_headers=False``: the app sees only what the client sent."""
    result = await request(ContextMiddleware(_seen_headers, update_request_headers=False))
    assert result.json() == {}


async def test_an_id_validator_refuses_ids_it_does_not_accept() -> None:
    """``id_validator`` (UUIDs only, as asgi-correlation-id checks by default): other ids are
    replaced; a validator that raises refuses the id rather than answering 500."""
    import uuid

    def uuid_only(value: str) -> bool:
        return uuid.UUID(value).version == 4  # raises ValueError for non-UUIDs

    app = ContextMiddleware(echo_app, id_validator=uuid_only)
    good = str(uuid.uuid4())
    accepted = await request(app, headers=[hdr("X-Request-ID", good)])
    refused = await request(app, headers=[hdr("X-Request-ID", VALID_RID)])
    assert accepted.json()["request_id"] == good
    assert refused.status == 200
    assert refused.json()["request_id"] != VALID_RID


async def test_an_id_generator_makes_the_ids_of_requests_that_bring_none() -> None:
    """``id_generator`` is called for each request without an acceptable id."""
    import uuid

    app = ContextMiddleware(echo_app, id_generator=lambda: str(uuid.uuid4()))
    first, second = (await request(app)).json(), (await request(app)).json()
    assert uuid.UUID(first["request_id"]).version == 4
    assert first["request_id"] != second["request_id"]
    assert first["correlation_id"] == first["request_id"]


@pytest.mark.parametrize(
    "generator", [lambda: "not an id!", lambda: "", lambda: 5, "uuid4"], ids=str
)
def test_a_generator_that_makes_bad_ids_is_refused_at_construction(generator: Any) -> None:
    """A generator whose ids would break the headers is a ConfigurationError at start-up."""
    with pytest.raises(ConfigurationError, match="id_generator"):
        ContextMiddleware(echo_app, id_generator=generator)


async def test_reject_invalid_ids_answers_400_and_never_echoes_the_value() -> None:
    """``reject_invalid_ids``: a refused incoming id is a 400 invalid_request naming the
    header, with generated ids on the response; a valid one passes."""
    app = ContextMiddleware(echo_app, reject_invalid_ids=True)
    refused = await request(app, headers=[hdr("X-Correlation-ID", "evil<script>")])
    assert refused.status == 400
    assert refused.json()["error"] == "invalid_request"
    assert "X-Correlation-ID" in refused.json()["error_description"]
    assert b"evil" not in refused.body
    assert len(refused.header("x-request-id")) >= 20
    ok = await request(app, headers=[hdr("X-Correlation-ID", VALID_RID)])
    assert ok.status == 200
    assert ok.json()["correlation_id"] == VALID_RID
