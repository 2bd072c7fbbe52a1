"""Per-request resources: LIFO cleanups after the response, on error, on cancellation."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ctxvars_mw import (
    ContextMiddleware,
    ContextNotSetError,
    UserExecutionContext,
    attach_resource,
    child_context,
    get_context,
    get_context_or_none,
    managed_context,
    resource_scope,
    run_in_thread,
    use_context,
)
from ctxvars_mw.types import Message
from tests.servers import free_port

USER = UserExecutionContext(user_id="auth0|5f7c8ec7c33c6c004bbafe82")


def build_app(log: list[str]) -> ContextMiddleware:
    """A Starlette app whose endpoints attach resources that record their cleanup."""

    def attach(name: str) -> None:
        attach_resource(name, lambda: log.append(f"close {name}"))

    async def ordered(request: Request) -> PlainTextResponse:
        for name in ("a", "b", "c"):
            attach(name)
        return PlainTextResponse("ok", background=BackgroundTask(lambda: log.append("background")))

    async def crash(request: Request) -> PlainTextResponse:
        attach("a")
        attach("b")
        raise RuntimeError("the handler failed")

    async def hang(request: Request) -> PlainTextResponse:
        attach("a")

        async def async_close() -> None:
            await asyncio.sleep(0)
            log.append("close async")

        attach_resource(object(), async_close)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def stream(request: Request) -> StreamingResponse:
        attach("stream")

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                yield b"chunk\n"
                await asyncio.sleep(0.02)

        return StreamingResponse(chunks(), media_type="text/plain")

    routes = [
        Route("/ordered", ordered),
        Route("/crash", crash),
        Route("/hang", hang),
        Route("/stream", stream),
    ]
    return ContextMiddleware(Starlette(routes=routes))


async def drive(app: Any, path: str, log: list[str]) -> None:
    """Call the ASGI app directly, logging when the response body is sent."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            log.append(f"status {message['status']}")
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            log.append("response sent")

    await app(scope, receive, send)


async def test_cleanups_run_lifo_after_the_response_and_background_tasks() -> None:
    """Cleanups run last-in-first-out, after the body is sent and the background task ran."""
    log: list[str] = []
    await drive(build_app(log), "/ordered", log)
    assert log == ["status 200", "response sent", "background", "close c", "close b", "close a"]


async def test_cleanups_run_when_the_handler_raises() -> None:
    """A crashing handler still gets its resources closed, in LIFO order."""
    log: list[str] = []
    with pytest.raises(RuntimeError, match="the handler failed"):
        await drive(build_app(log), "/crash", log)
    assert log[-2:] == ["close b", "close a"]
    assert "status 500" in log


async def test_cleanups_run_when_the_request_is_cancelled() -> None:
    """A cancelled request runs its sync and async cleanups, then stays cancelled."""
    log: list[str] = []
    task = asyncio.create_task(drive(build_app(log), "/hang", log))
    for _ in range(20):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["close async", "close a"]


async def test_client_disconnect_mid_stream_runs_cleanups_through_uvicorn() -> None:
    """A real client leaving a streaming response mid-way still triggers the cleanup."""
    log: list[str] = []
    port = free_port()
    config = uvicorn.Config(
        build_app(log), host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
                await asyncio.sleep(0.01)
            async with (
                httpx.AsyncClient() as client,
                client.stream("GET", f"http://127.0.0.1:{port}/stream") as response,
            ):
                async for chunk in response.aiter_bytes():
                    assert chunk.startswith(b"chunk")
                    break
            while "close stream" not in log:  # noqa: ASYNC110 - the cleanup appends to a list
                await asyncio.sleep(0.01)
    finally:
        server.should_exit = True
        await serving
    assert log == ["close stream"]


async def test_a_failing_cleanup_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One cleanup raising does not stop the ones attached before it."""
    log: list[str] = []

    def broken() -> None:
        raise OSError("disk gone")

    with caplog.at_level(logging.ERROR, logger="ctxvars_mw.resources"):
        async with resource_scope():
            attach_resource("first", lambda: log.append("first"))
            attach_resource("broken", broken)
            attach_resource("last", lambda: log.append("last"))
    assert log == ["last", "first"]
    assert "a request cleanup failed" in caplog.text


async def test_managed_context_closes_a_sqlite_db_session() -> None:
    """managed_context(close_db_session=True) closes a real sqlite3 connection (sync close)."""
    conn = sqlite3.connect(":memory:")
    ctx = USER.with_db_session(conn)
    async with managed_context(ctx, close_db_session=True) as current:
        assert get_context() is current
        current.db_session.execute("create table t (x int)")
        current.db_session.execute("insert into t values (1)")
        assert conn.execute("select count(*) from t").fetchone() == (1,)
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("select 1")


class TcpSession:
    """An async 'session' over a real TCP connection, closed with ``aclose()``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> TcpSession:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def query(self, line: bytes) -> bytes:
        self.writer.write(line + b"\n")
        await self.writer.drain()
        return await self.reader.readline()

    async def aclose(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_managed_context_acloses_an_async_db_session_after_other_resources() -> None:
    """An async db_session is aclose()d on exit, after the block's own resources."""
    order: list[str] = []
    peer_closed = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        order.append("peer saw EOF")
        peer_closed.set()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = await TcpSession.open(port)
    async with managed_context(USER.with_db_session(session)) as ctx:
        assert await ctx.db_session.query(b"ping") == b"PING\n"
        attach_resource("cache", lambda: order.append("cache closed"))
    await asyncio.wait_for(peer_closed.wait(), 2)
    assert order == ["cache closed", "peer saw EOF"]
    assert session.writer.is_closing()
    server.close()
    await server.wait_closed()


async def test_managed_context_can_leave_the_db_session_open() -> None:
    """close_db_session=False leaves the session to its owner."""
    conn = sqlite3.connect(":memory:")
    async with managed_context(USER.with_db_session(conn), close_db_session=False):
        pass
    assert conn.execute("select 1").fetchone() == (1,)
    conn.close()


async def test_attaching_outside_a_request_raises() -> None:
    """attach_resource() with no request or scope raises ContextNotSetError."""
    with pytest.raises(ContextNotSetError):
        attach_resource(sqlite3.connect(":memory:"))


async def test_attaching_from_a_task_that_outlived_its_request_raises() -> None:
    """A task spawned by a request that attaches after the request ended is refused."""
    attached = asyncio.Event()
    results: list[BaseException | None] = []

    async def late() -> None:
        await attached.wait()
        try:
            attach_resource("late", lambda: None)
        except ContextNotSetError as exc:
            results.append(exc)
        else:
            results.append(None)

    async with resource_scope():
        task = asyncio.create_task(late())
    attached.set()
    await task
    assert isinstance(results[0], ContextNotSetError)


async def test_resources_attached_from_a_worker_thread_are_cleaned_up() -> None:
    """run_in_thread carries the request's stack: a thread's attachment is cleaned up too."""
    closed: list[str] = []
    async with resource_scope():
        await run_in_thread(attach_resource, "from-thread", lambda: closed.append("thread"))
    assert closed == ["thread"]


async def test_attach_needs_a_cleanup_for_objects_without_close() -> None:
    """Objects without close()/aclose() need an explicit callable cleanup."""
    async with resource_scope():
        with pytest.raises(TypeError):
            attach_resource(object())
        with pytest.raises(TypeError):
            attach_resource(object(), "not callable")  # type: ignore[arg-type]


# -- the cleanup list travels with the context (one ContextVar per request) ----------------


async def _run_raw(app: Any) -> None:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    await app(scope, receive, send)


async def test_attaching_inside_use_context_in_a_request_belongs_to_the_request() -> None:
    """A child context made current inside a request (an agent's tool call) still attaches
    to the request: its cleanup runs when the request ends, not before."""
    log: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        request_ctx = get_context()
        with child_context("tool.search") as child:
            assert get_context() is child
            attach_resource("tool", lambda: log.append("tool closed"))
        assert get_context() is request_ctx
        log.append("handler done")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await _run_raw(ContextMiddleware(app))
    assert log == ["handler done", "tool closed"]


async def test_a_resource_scope_inside_a_request_is_its_own_and_keeps_the_context() -> None:
    """A resource_scope() inside a request closes its own resources at its end; the context
    inside it is the request's very object (built once, whichever is read first)."""
    log: list[str] = []
    seen: list[UserExecutionContext] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        attach_resource("request", lambda: log.append("request closed"))
        async with resource_scope():
            seen.append(get_context())  # first read: inside the scope
            attach_resource("scoped", lambda: log.append("scoped closed"))
        log.append("after scope")
        seen.append(get_context())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await _run_raw(ContextMiddleware(app))
    assert log == ["scoped closed", "after scope", "request closed"]
    assert seen[0] is seen[1]


async def test_a_request_inside_an_outer_resource_scope_keeps_its_own_cleanups() -> None:
    """An app called inside a resource_scope() (a test, a worker) attaches to the request,
    and the outer scope's own resources wait for the scope."""
    log: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        attach_resource("request", lambda: log.append("request closed"))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with resource_scope():
        attach_resource("outer", lambda: log.append("outer closed"))
        await _run_raw(ContextMiddleware(app))
        assert log == ["request closed"]
    assert log == ["request closed", "outer closed"]


async def test_a_resource_scope_without_a_context_has_none() -> None:
    async with resource_scope():
        assert get_context_or_none() is None
        with pytest.raises(ContextNotSetError):
            get_context()
        with use_context(USER):
            assert get_context() is USER
            attach_resource("inside", lambda: None)
        assert get_context_or_none() is None
