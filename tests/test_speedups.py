"""ctxvars_mw._speedups, the C accelerator of ContextMiddleware's anonymous http path.

The middleware's own tests run against both paths (conftest ``implementation``); these check
what is particular to the C one: that it is built and used, that it hands back to Python
what it does not handle, that it holds no references after a request, and, by property,
that it answers every request exactly as the pure-Python path does.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxvars_mw.middleware as middleware_module
from ctxvars_mw import ContextMiddleware, JWTAuthenticator, get_context_or_none
from ctxvars_mw.current import _current, get_context
from ctxvars_mw.ids import IdRules, use_id_rules
from ctxvars_mw.resources import _closed, _current_cleanups, attach_resource
from ctxvars_mw.types import Message, Receive, Scope, Send

from .auth_helpers import AUDIENCE, ISSUER, SECRET, claims, sign
from .conftest import speedups_built

if not speedups_built():  # pragma: no cover - depends on the build
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError("ctxvars_mw._speedups is not built: CI must test the C path")
    pytest.skip("ctxvars_mw._speedups is not built", allow_module_level=True)

from ctxvars_mw._speedups import Accelerator, Exchange

RID = b"req-7f3a9c2e41b84d0e9a55"
CID = b"corr-0b1c2d3e4f5a6b7c8d9e"
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def collector() -> tuple[list[Message], Send]:
    """A list and a send() that appends to it."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    return sent, send


def scope_of(headers: Any) -> Scope:
    return {"type": "http", "method": "GET", "path": "/", "headers": headers}


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    ctx = get_context()
    body = "\n".join([ctx.user_id, ctx.request_id, ctx.correlation_id, str(ctx.trace_id)])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": body.encode()})


async def run(app: Any, headers: Any) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope_of(headers), receive, send)
    return sent


def both() -> tuple[ContextMiddleware, ContextMiddleware]:
    """The same middleware, C path and Python path."""
    c_path = ContextMiddleware(ok_app)
    saved = middleware_module._Accelerator
    middleware_module._Accelerator = None
    try:
        python_path = ContextMiddleware(ok_app)
    finally:
        middleware_module._Accelerator = saved
    assert c_path._start is not None
    assert python_path._start is None
    return c_path, python_path


def test_the_accelerator_is_built_and_used_for_anonymous_http() -> None:
    assert middleware_module._Accelerator is Accelerator
    assert ContextMiddleware(ok_app)._start is not None


def test_trusted_baggage_keeps_the_python_path() -> None:
    assert ContextMiddleware(ok_app, trust_incoming_baggage=True)._start is None


async def test_the_c_path_sets_the_context_and_resets_it() -> None:
    start = ContextMiddleware(ok_app)._start
    assert start is not None
    sent, send = collector()
    scope = scope_of([(b"x-request-id", RID), (b"traceparent", TRACEPARENT)])
    exchange = start(scope, send)
    assert isinstance(exchange, Exchange)
    assert _current.get() is exchange.ctx
    assert exchange.ctx[3] is exchange.stack
    assert _current_cleanups() is exchange.stack
    assert exchange.ctx[4] is scope["headers"]  # how a nested middleware recognises it
    ctx = get_context()
    assert (ctx.request_id, ctx.correlation_id) == (RID.decode(), RID.decode())
    assert ctx.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert exchange.started is False
    await exchange({"type": "http.response.start", "status": 204, "headers": []})
    assert exchange.started is True
    assert sent[0]["headers"] == [(b"x-request-id", RID), (b"x-correlation-id", RID)]
    exchange.finish()
    assert _current.get() is None
    assert _current_cleanups() is None
    assert exchange.stack == [_closed]
    with pytest.raises(RuntimeError, match="finished"):
        exchange.finish()


@pytest.mark.parametrize(
    "scope",
    [
        {"type": "http", "headers": iter([(b"x-request-id", RID)])},  # not a list or tuple
        {"type": "http", "headers": [(b"x-request-id", "a str")]},  # not bytes
        {"type": "http", "headers": [(b"x-request-id", RID, b"3rd")]},  # not a pair
        {"type": "http", "headers": [b"x-request-id"]},
        {"type": "http"},  # no headers at all
    ],
)
def test_requests_it_does_not_handle_go_back_to_python(scope: dict[str, Any]) -> None:
    start = ContextMiddleware(ok_app)._start
    assert start is not None
    before = dict(scope)
    assert start(scope, ok_app) is None
    assert scope == before  # untouched
    assert _current.get() is None


def test_a_middleware_nested_in_the_same_request_goes_back_to_python() -> None:
    """The current frame belongs to this very header list: an outer ContextMiddleware of the
    same request, whose ids the Python path keeps. Another list: a request of its own."""
    start = ContextMiddleware(ok_app)._start
    assert start is not None
    headers: list[tuple[bytes, bytes]] = []
    token = _current.set([None, None, None, [], headers])
    try:
        assert start(scope_of(headers), ok_app) is None
        other = start(scope_of([]), ok_app)
        assert other is not None
        other.finish()
    finally:
        _current.reset(token)


async def test_odd_header_forms_get_the_same_answer_from_both_paths() -> None:
    """Headers the C scan hands back (generators, str values) or that it takes in another
    container form (tuples, lists of lists) answer as in Python."""
    c_path, python_path = both()
    forms: list[Any] = [
        ((b"x-request-id", RID),),
        [[b"x-request-id", RID], [b"x-correlation-id", CID]],
        [(b"x-request-id", RID), (b"x-request-id", RID)],  # repeated: replaced
    ]
    for headers in forms:
        c_sent = await run(c_path, headers)
        py_sent = await run(python_path, headers)
        assert _shape(c_sent) == _shape(py_sent)


async def test_the_send_wrapper_handles_every_header_form_like_python() -> None:
    """The app's response headers: a tuple, a list of lists, uppercase names, our own names
    set by the app, none at all, or a mapping message: the C send gives what Python's
    ``_with_ids`` gives."""
    id_headers = [(b"x-request-id", RID), (b"x-correlation-id", CID)]
    names = frozenset({b"x-request-id", b"x-correlation-id"})
    start = ContextMiddleware(ok_app)._start
    assert start is not None
    cases: list[Any] = [
        [(b"content-type", b"text/plain")],
        ((b"content-type", b"text/plain"),),
        [[b"content-type", b"text/plain"]],
        [(b"Content-Type", b"text/plain"), (b"X-Request-ID", b"app's")],
        [(b"x-correlation-id", b"app's"), (b"x-other", b"1")],
        [],
    ]
    for app_headers in cases:
        sent, send = collector()
        exchange = start(scope_of([(b"x-request-id", RID), (b"x-correlation-id", CID)]), send)
        assert exchange is not None
        try:
            await exchange({"type": "http.response.start", "status": 200, "headers": app_headers})
            await exchange({"type": "http.response.body", "body": b""})
        finally:
            exchange.finish()
        expected = middleware_module._with_ids(app_headers, id_headers, names)
        assert sent[0]["headers"] == expected
        assert sent[0]["headers"] is not app_headers  # a new list: the app's is untouched
        assert sent[1] == {"type": "http.response.body", "body": b""}


async def test_a_start_message_without_headers_gets_ours() -> None:
    start = ContextMiddleware(ok_app)._start
    assert start is not None
    sent, send = collector()
    exchange = start(scope_of([(b"x-request-id", RID)]), send)
    assert exchange is not None
    try:
        with pytest.raises(KeyError):
            await exchange({"no": "type"})  # as the Python wrapper: message["type"]
        await exchange({"type": "http.response.start", "status": 204})
    finally:
        exchange.finish()
    assert sent[0]["headers"] == [(b"x-request-id", RID), (b"x-correlation-id", RID)]


async def test_cleanups_run_and_late_attaches_are_refused() -> None:
    closed: list[str] = []
    late: list[BaseException] = []
    tasks: list[asyncio.Task[None]] = []

    async def outlives() -> None:
        await asyncio.sleep(0.01)
        try:
            attach_resource(object(), lambda: None)
        except LookupError as exc:
            late.append(exc)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        attach_resource(object(), lambda: closed.append("cleanup"))
        tasks.append(asyncio.create_task(outlives()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = ContextMiddleware(app)
    assert mw._start is not None
    await run(mw, [])
    await asyncio.gather(*tasks)
    assert closed == ["cleanup"]
    assert len(late) == 1


async def test_no_reference_is_kept_after_requests() -> None:
    """The Exchange holds send, the scope and the context: all released with it."""

    async def send(message: Message) -> None:
        return None

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    mw = ContextMiddleware(ok_app)
    headers = [(b"x-request-id", RID), (b"traceparent", TRACEPARENT)]
    for _ in range(100):  # warm every cache first
        await mw(scope_of(headers), receive, send)
    gc.collect()
    refs = sys.getrefcount(send), sys.getrefcount(headers), sys.getrefcount(RID)
    for _ in range(2000):
        await mw(scope_of(headers), receive, send)
    gc.collect()
    assert (sys.getrefcount(send), sys.getrefcount(headers), sys.getrefcount(RID)) == refs


async def test_changed_id_rules_are_applied_by_the_c_path() -> None:
    """The rules' safe length is cached by rules object: new rules are read again."""
    c_path, python_path = both()
    headers = [(b"x-request-id", b"tenant-placeholder-000000000000")]
    rules = IdRules.default().forbidding("tenant-placeholder-000000000000")
    for app in (c_path, python_path):
        first = _shape(await run(app, headers))
        with use_id_rules(rules):
            replaced = _shape(await run(app, headers))
        assert first[1] == "tenant-placeholder-000000000000"
        assert replaced[1] == "<generated>"


def test_accelerator_needs_every_option() -> None:
    with pytest.raises(TypeError, match="needs"):
        Accelerator()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Accelerator(1, 2)  # type: ignore[call-arg, misc]


# -- differential: the C path answers exactly as the Python path ----------------------------

_NAMES = [b"x-request-id", b"x-correlation-id", b"traceparent", b"host", b"X-Request-ID", b""]
_VALUES = st.one_of(
    st.sampled_from([RID, CID, TRACEPARENT, b"", b"null", b"test", b"x" * 128, b"x" * 129]),
    st.binary(max_size=40),
    st.text(alphabet="abcdef0123456789-._:", min_size=1, max_size=40).map(str.encode),
)


def _shape(sent: list[Message]) -> tuple[Any, ...]:
    """A response with generated ids replaced by a marker (they differ by design)."""
    start, body = sent[0], sent[1]
    user, rid, cid, trace = body["body"].decode().split("\n")

    def mark(value: str) -> str:
        generated = len(value) == 24 and all(c in "0123456789abcdef" for c in value)
        return "<generated>" if generated else value

    headers = [(k, mark(v.decode())) for k, v in start["headers"]]
    return start["status"], mark(rid), mark(cid), rid == cid, trace, user, headers


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), _VALUES), max_size=6))
def test_property_c_and_python_paths_answer_alike(headers: Iterable[tuple[bytes, bytes]]) -> None:
    c_path, python_path = both()
    pairs = list(headers)

    async def main() -> tuple[Any, Any]:
        return _shape(await run(c_path, list(pairs))), _shape(await run(python_path, pairs))

    c_answer, python_answer = asyncio.run(main())
    assert c_answer == python_answer
    assert get_context_or_none() is None


# -- with an authenticator: the C path scans, Python authenticates, C enters ----------------


def _jwt_middlewares(
    require: bool = False,
) -> tuple[ContextMiddleware, ContextMiddleware]:
    """C-path and Python-path middlewares with the same (real) JWT authenticator."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE)

    def build() -> ContextMiddleware:
        return ContextMiddleware(ok_app, authenticator=auth, require_authentication=require)

    c_path = build()
    saved = middleware_module._Accelerator
    middleware_module._Accelerator = None
    try:
        python_path = build()
    finally:
        middleware_module._Accelerator = saved
    assert c_path._start is not None
    assert python_path._start is None
    return c_path, python_path


async def test_with_an_authenticator_the_exchange_waits_for_python_to_enter() -> None:
    c_path, _ = _jwt_middlewares()
    assert c_path._start is not None
    token = sign(claims()).encode()
    headers = [(b"authorization", b"Bearer " + token), (b"authorization", b"Basic eA==")]
    exchange = c_path._start(scope_of(headers), ok_app)
    assert exchange is not None
    assert exchange.authorization == [b"Bearer " + token, b"Basic eA=="]
    assert exchange.ctx is None
    assert exchange.stack is None
    assert _current.get() is None  # nothing is current until enter()
    with pytest.raises(RuntimeError, match="not entered"):
        exchange.finish()
    with pytest.raises(TypeError, match="frozensets"):
        exchange.enter(None, ["not", "frozen"], frozenset())
    exchange.enter(None, frozenset(), frozenset({"chat"}))
    try:
        assert get_context().user_id == "anonymous"
        with pytest.raises(RuntimeError, match="entered already"):
            exchange.enter(None, frozenset(), frozenset())
    finally:
        exchange.finish()
    assert _current.get() is None


def _auth_headers() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    good = sign(claims()).encode()
    expired = sign(claims(exp=int(time.time()) - 3600)).encode()
    other_key = sign(claims(), key=b"another-secret-another-secret-another-secret").encode()
    values = st.sampled_from(
        [
            b"Bearer " + good,
            b"bearer   " + good,
            b"Bearer " + expired,
            b"Bearer " + other_key,
            b"Bearer " + good[:-3],
            b"Bearer not a token",
            b"Basic dXNlcjpwYXNz",
            b"Bearer",
            b"",
        ]
    )
    auth = st.lists(st.tuples(st.just(b"authorization"), values), max_size=2)
    ids = st.lists(st.tuples(st.sampled_from(_NAMES[:3]), _VALUES), max_size=3)
    return st.tuples(auth, ids).map(lambda pair: pair[0] + pair[1])


def _answer(sent: list[Message]) -> tuple[Any, ...]:
    """A response, with generated ids marked and a body that is either the app's or ours."""
    start = sent[0]
    if start["status"] != 200:
        body = json.loads(sent[1]["body"])
        headers = [(k, v) for k, v in start["headers"] if k not in (b"x-request-id",)]
        return start["status"], body, sorted(k for k, _ in headers)
    return _shape(sent)


@settings(max_examples=200, deadline=None)
@given(_auth_headers(), st.booleans())
def test_property_c_and_python_paths_authenticate_alike(
    headers: list[tuple[bytes, bytes]], require: bool
) -> None:
    c_path, python_path = _jwt_middlewares(require)

    async def main() -> tuple[Any, Any]:
        return (
            _answer(await run(c_path, list(headers))),
            _answer(await run(python_path, list(headers))),
        )

    c_answer, python_answer = asyncio.run(main())
    assert c_answer == python_answer
