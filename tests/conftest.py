"""Shared fixtures: a real Redis on 127.0.0.1:6379, unique key prefixes; a hang watchdog."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Generator
from typing import Any

import pytest

# pytest-timeout fails a test after `timeout` seconds (pyproject.toml) and dumps every
# thread's stack, but a hung coroutine shows there only as the event loop's poll(). Shortly
# before that, this watchdog prints the stack of every unfinished asyncio task instead.
WATCHDOG_SECONDS = 240.0


def _dump_pending_tasks(nodeid: str) -> None:
    out = sys.__stderr__
    if out is None:
        return
    # Read from another thread while the loop is stuck: private, racy, good enough to debug.
    tasks = [t for t in list(asyncio.tasks._all_tasks) if not t.done()]  # type: ignore[attr-defined]
    print(f"\n--- {nodeid} still running: {len(tasks)} pending asyncio task(s) ---", file=out)
    for task in tasks:
        task.print_stack(file=out)
    out.flush()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, Any, Any]:
    """Arm the watchdog for each test's setup, call and teardown."""
    timer = threading.Timer(WATCHDOG_SECONDS, _dump_pending_tasks, args=(item.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()


REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def redis_answers() -> bool:
    """True when something accepts connections on the Redis port."""
    try:
        socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def redis_url() -> str:
    """The local Redis URL; in CI (CI=true) a missing Redis fails the test instead of skipping."""
    if not redis_answers():
        message = f"Redis is not answering on {REDIS_HOST}:{REDIS_PORT}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A Redis key/channel prefix unique to this test."""
    return f"ctxvars-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def redis_client(redis_url: str, key_prefix: str) -> AsyncIterator[object]:
    """A redis.asyncio client; every key under this test's prefix is deleted afterwards."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
