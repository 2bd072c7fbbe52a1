"""Isolation under load: many users at once, and no request ever sees another's context.

Every request declares who it is (bearer token) and carries a unique ``X-Request-ID``; the
app (``tests/apps/isolation_app.py``) reports the context it saw after awaits, in tasks, in a
child context, in threads and in a background task after the response. Any observation
that names another user or another request is a cross-user mismatch.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from ctxvars_mw import get_context_or_none
from tests.apps.isolation_app import background_records, build_app, token_for
from tests.servers import uvicorn_server

USERS = [f"user_{i:03d}_{secrets.token_hex(4)}" for i in range(100)]
IN_PROCESS_REQUESTS = 50_000
STEPS = ["start", "after_await", "create_task", "task_group", "task_group", "child", "end"]


Job = tuple[str, str, str]  # user, request id, threads mode ("1", "0" or "all")


def _plan(total: int, workers: int, thread_every: int) -> list[list[Job]]:
    """``workers`` queues of jobs; consecutive jobs of a queue are for different users.

    One job in ``thread_every`` also reads the context in worker threads; one in
    ``10 * thread_every`` in a ``threading.Thread`` too.
    """
    queues: list[list[Job]] = [[] for _ in range(workers)]
    for n in range(total):
        user = USERS[(n * 7 + n // len(USERS)) % len(USERS)]
        threads = "0" if n % thread_every else "all" if n % (10 * thread_every) == 0 else "1"
        queues[n % workers].append((user, f"req-{n:06d}-{secrets.token_hex(6)}", threads))
    return queues


def _expected_steps(threads: str) -> list[str]:
    """The steps /observe reports for a threads mode, sorted."""
    steps = list(STEPS)
    if threads != "0":
        steps += ["run_in_thread", "bind_executor"]
    if threads == "all":
        steps.append("threading.Thread")
    return sorted(steps)


def _background_count(queues: list[list[Job]]) -> int:
    """How many records the background tasks of ``queues`` write (two when threads are used)."""
    return sum(1 if threads == "0" else 2 for queue in queues for _, _, threads in queue)


def _mismatches(job: Job, status: int, headers: Any, body: bytes) -> list[str]:
    """Everything in one response that does not belong to (user, rid)."""
    user, rid, threads = job
    problems: list[str] = []
    if status != 200:
        return [f"{rid}: status {status}"]
    if headers.get("x-request-id") != rid or headers.get("x-correlation-id") != rid:
        problems.append(f"{rid}: id headers {headers.get('x-request-id')}")
    seen = json.loads(body)["observations"]
    if sorted(step for step, *_ in seen) != _expected_steps(threads):
        problems.append(f"{rid}: steps {[s for s, *_ in seen]}")
    for step, seen_user, seen_rid, seen_cid in seen:
        if (seen_user, seen_rid, seen_cid) != (user, rid, rid):
            problems.append(f"{rid} {step}: saw {seen_user} {seen_rid} {seen_cid}")
    return problems


def _background_mismatches(records: list[list[str]], expected: int) -> list[str]:
    """Background records that saw another user or request, or a missing/extra record."""
    problems = [
        f"background: declared {u} {r}, saw {su} {sr} {sc}"
        for u, r, su, sr, sc in records
        if (su, sr, sc) != (u, r, r)
    ]
    if len(records) != expected:
        problems.append(f"background: {len(records)} records, expected {expected}")
    return problems


@pytest.fixture
def secret() -> bytes:
    """A fresh HS256 key for this test's JWTs."""
    return secrets.token_bytes(32)


@pytest.fixture
def server(secret: bytes) -> Iterator[str]:
    """The isolation app under a real uvicorn server on 127.0.0.1."""
    env = {"ISOLATION_APP_SECRET": secret.hex()}
    with uvicorn_server(
        "tests.apps.isolation_app:app", env=env, extra_args=("--no-access-log",)
    ) as url:
        yield url


async def _collect_background(client: httpx.AsyncClient, expected: int) -> list[list[str]]:
    """What the server's background tasks recorded, waiting up to 10 s for all of them."""
    records: list[list[str]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records += (await client.get("/background")).json()["records"]
        if len(records) >= expected:
            break
        await asyncio.sleep(0.05)
    return records


def _query(job: Job) -> str:
    """The /observe query string for ``job``."""
    user, rid, threads = job
    return urlencode({"u": user, "r": rid, "threads": threads})


@pytest.mark.slow
async def test_10k_requests_from_100_users_through_uvicorn_never_cross(
    server: str, secret: bytes
) -> None:
    """10,000 requests of 100 users via uvicorn, 50 in flight: every step sees its own user."""
    tokens = {user: token_for(secret, user) for user in USERS}
    queues = _plan(10_000, workers=50, thread_every=1)
    expected_records = _background_count(queues)
    problems: list[str] = []
    # Five clients with bounded pools of 10 connections (50 in flight): one pool of 50 spends
    # more time in httpcore's pool bookkeeping than the server spends answering.
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
    clients = [httpx.AsyncClient(base_url=server, limits=limits, timeout=60) for _ in range(5)]

    async def worker(client: httpx.AsyncClient, queue: list[Job]) -> None:
        for job in queue:
            response = await client.get(
                f"/observe?{_query(job)}",
                headers={"Authorization": f"Bearer {tokens[job[0]]}", "X-Request-ID": job[1]},
            )
            problems.extend(
                _mismatches(job, response.status_code, response.headers, response.content)
            )

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(clients[n % 5], q) for n, q in enumerate(queues)))
        elapsed = time.perf_counter() - started
        records = await _collect_background(clients[0], expected_records)
    finally:
        for client in clients:
            await client.aclose()
    problems += _background_mismatches(records, expected_records)
    print(f"uvicorn: 10,000 requests in {elapsed:.1f}s = {10_000 / elapsed:.0f} req/s")
    assert problems == []


async def _drive(app: Any, token: str, job: Job) -> tuple[int, Any, bytes]:
    """One GET /observe through the raw ASGI callable; returns status, headers, body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/observe",
        "raw_path": b"/observe",
        "root_path": "",
        "query_string": _query(job).encode("ascii"),
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {token}".encode("ascii")),
            (b"x-request-id", job[1].encode("ascii")),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], headers, body


@pytest.mark.slow
async def test_50k_requests_in_process_never_cross(secret: bytes) -> None:
    """50,000 in-process requests of 100 users, 200 in flight: every step sees its own user."""
    app = build_app(secret)
    tokens = {user: token_for(secret, user) for user in USERS}
    queues = _plan(IN_PROCESS_REQUESTS, workers=200, thread_every=5)
    background_records()  # start from an empty side channel
    problems: list[str] = []

    async def worker(queue: list[Job]) -> None:
        for job in queue:
            status, headers, body = await _drive(app, tokens[job[0]], job)
            problems.extend(_mismatches(job, status, headers, body))

    started = time.perf_counter()
    await asyncio.gather(*(worker(q) for q in queues))
    elapsed = time.perf_counter() - started
    problems += _background_mismatches(background_records(), _background_count(queues))
    rate = IN_PROCESS_REQUESTS / elapsed
    print(f"in-process: {IN_PROCESS_REQUESTS:,} requests in {elapsed:.1f}s = {rate:.0f} req/s")
    assert problems == []
    assert get_context_or_none() is None


def test_the_checker_reports_a_step_that_saw_another_user() -> None:
    """The mismatch check is not vacuous: one foreign observation is reported, by step."""
    job = ("user_a_0123456789", "req-a-0123456789", "0")
    seen = [[step, job[0], job[1], job[1]] for step in STEPS[:-1]]
    seen.append(["end", "user_b_0123456789", "req-b-0123456789", "req-b-0123456789"])
    headers = {"x-request-id": job[1], "x-correlation-id": job[1]}
    body = json.dumps({"observations": seen}).encode()
    assert _mismatches(job, 200, headers, body) == [
        "req-a-0123456789 end: saw user_b_0123456789 req-b-0123456789 req-b-0123456789"
    ]
    records = [[job[0], job[1], "user_b_0123456789", job[1], job[1]]]
    assert _background_mismatches(records, 1) == [
        f"background: declared {job[0]} {job[1]}, saw user_b_0123456789 {job[1]} {job[1]}"
    ]
