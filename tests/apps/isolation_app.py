"""A Starlette app that reports, at every step, whose context it runs in.

Used by ``tests/test_isolation_load.py`` in-process and under a real uvicorn server::

    ISOLATION_APP_SECRET=<hex> uvicorn tests.apps.isolation_app:app

Callers authenticate with ``Authorization: Bearer <token_for(secret, user_id)>``: an HS256
JWT verified by the library's ``JWTAuthenticator`` with the same 32-byte secret.

``GET /observe?u=<user>&r=<request id>&threads=<1|0|all>`` reads the context after
awaiting, in tasks (``create_task``, ``TaskGroup``), in a child context, in worker threads
(``run_in_thread``, ``bind`` + executor; ``threads=all`` adds a ``threading.Thread``,
``threads=0`` skips threads) and returns every observation; a background task
that runs after the response records what it sees, next to the ``u``/``r`` the caller
declared (taken from the query string, never from the context). ``GET /background`` returns
and clears those records: the test compares them with what it sent.

``GET /stream?r=<request id>`` streams lines until the client goes away; its
``attach_resource`` cleanup and its generator's ``finally`` record the context they ran in,
returned (and cleared) by ``GET /cleanups``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ctxvars_mw import (
    ContextMiddleware,
    attach_resource,
    bind,
    child_context,
    get_context_or_none,
    run_in_thread,
)
from ctxvars_mw.auth.jwt import JWTAuthenticator

Observation = list[str]

_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="isolation")
_background: list[Observation] = []
_cleanups: list[Observation] = []
_background_lock = threading.Lock()


def token_for(secret: bytes, user_id: str) -> str:
    """An HS256 JWT for ``user_id`` (role ``user``), valid for an hour."""
    claims = {"sub": user_id, "roles": ["user"], "exp": int(time.time()) + 3600}
    return jwt.encode(claims, secret, algorithm="HS256")


def _seen(step: str) -> Observation:
    """``[step, user_id, request_id, correlation_id]`` of the current context (``-`` if none)."""
    ctx = get_context_or_none()
    if ctx is None:
        return [step, "-", "-", "-"]
    return [step, ctx.user_id, ctx.request_id, ctx.correlation_id]


async def _in_task(step: str) -> Observation:
    await asyncio.sleep(0)
    return _seen(step)


async def _in_child_task() -> Observation:
    with child_context("isolation.child") as child:
        await asyncio.sleep(0)
        seen = _seen("child")
        seen[2] = child.parent_request_id or "-"  # the child's own id is new; its parent is ours
        return seen


def _in_plain_thread() -> Observation:
    box: list[Observation] = []
    worker = threading.Thread(target=bind(lambda: box.append(_seen("threading.Thread"))))
    worker.start()
    worker.join()
    return box[0]


async def _record_background(user: str, rid: str, threads: bool) -> None:
    """Runs after the response: record what the context says next to what was declared."""
    await asyncio.sleep(0)
    seen = [_seen("background")]
    if threads:
        seen.append(await run_in_thread(_seen, "background.thread"))
    with _background_lock:
        _background.extend([user, rid, *observed[1:]] for observed in seen)


async def observe(request: Request) -> JSONResponse:
    """Read the context at every step; return what each step saw."""
    seen = [_seen("start")]
    await asyncio.sleep(0)
    seen.append(_seen("after_await"))
    task = asyncio.create_task(_in_task("create_task"))
    async with asyncio.TaskGroup() as group:
        grouped = [group.create_task(_in_task("task_group")) for _ in range(2)]
        grouped.append(group.create_task(_in_child_task()))
    seen.append(await task)
    seen.extend(t.result() for t in grouped)
    threads = request.query_params.get("threads", "1")
    if threads != "0":
        seen.append(await run_in_thread(_seen, "run_in_thread"))
        loop = asyncio.get_running_loop()
        seen.append(await loop.run_in_executor(_executor, bind(_seen), "bind_executor"))
    if threads == "all":
        seen.append(await run_in_thread(_in_plain_thread))
    seen.append(_seen("end"))
    user = request.query_params.get("u", "")
    rid = request.query_params.get("r", "")
    task = BackgroundTask(_record_background, user, rid, threads != "0")
    return JSONResponse({"observations": seen}, background=task)


async def stream(request: Request) -> StreamingResponse:
    """Stream numbered lines for as long as the client reads, with a per-request cleanup.

    The cleanup (``attach_resource``) and the generator's ``finally`` both record the
    context they run in, so a test can see they ran, for whom, after the client went away.
    """
    rid = request.query_params.get("r", "")
    attach_resource(object(), lambda: _record_cleanup(rid, _seen("attach_resource")))

    async def lines() -> AsyncIterator[bytes]:
        try:
            for n in range(10_000):
                yield f"{n}\n".encode()
                await asyncio.sleep(0.01)
        finally:
            _record_cleanup(rid, _seen("stream.finally"))

    return StreamingResponse(lines(), media_type="text/plain")


def _record_cleanup(rid: str, seen: Observation) -> None:
    with _background_lock:
        _cleanups.append([rid, *seen])


async def cleanups(request: Request) -> JSONResponse:
    """Return (and forget) what stream cleanups recorded so far."""
    with _background_lock:
        records = list(_cleanups)
        _cleanups.clear()
    return JSONResponse({"records": records})


async def background(request: Request) -> JSONResponse:
    """Return (and forget) what background tasks recorded so far."""
    with _background_lock:
        records = list(_background)
        _background.clear()
    return JSONResponse({"records": records})


def background_records() -> list[Observation]:
    """Take what background tasks recorded so far (for in-process tests)."""
    with _background_lock:
        records = list(_background)
        _background.clear()
    return records


def build_app(secret: bytes) -> Any:
    """The Starlette app wrapped (outermost) in ContextMiddleware, authenticating JWTs."""
    inner = Starlette(
        routes=[
            Route("/observe", observe),
            Route("/stream", stream),
            Route("/background", background),
            Route("/cleanups", cleanups),
        ],
    )
    return ContextMiddleware(
        inner,
        authenticator=JWTAuthenticator(key=secret, algorithms=["HS256"]),
        require_authentication=True,
        exempt_paths=("/background", "/cleanups"),
    )


def _secret_from_env() -> bytes:
    value = os.environ.get("ISOLATION_APP_SECRET")
    return bytes.fromhex(value) if value else secrets.token_bytes(32)


app = build_app(_secret_from_env())
