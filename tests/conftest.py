"""Shared fixtures: a real Redis on 127.0.0.1:6379, unique key prefixes."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator

import pytest

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
