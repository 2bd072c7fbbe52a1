"""ctxvars_mw.testing.ContextRegistry: opt-in tracking of live contexts (API.md §7)."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from ctxvars_mw import ContextMiddleware, UserExecutionContext, get_context
from ctxvars_mw.testing import ContextRegistry, context_registry
from ctxvars_mw.types import Message, Receive, Scope, Send

ALICE = "user_alice_5f7c8ec7c33c"
BOB = "user_bob_004bbafe82aa"


@pytest.fixture
def registry() -> Iterator[ContextRegistry]:
    """A fresh registry, enabled and cleared; disabled again afterwards."""
    reg = ContextRegistry()
    with reg:
        yield reg


def test_registry_is_disabled_by_default() -> None:
    """A new registry (and the process-wide one) tracks nothing until enabled."""
    reg = ContextRegistry()
    assert reg.enabled is False
    kept = UserExecutionContext(user_id=ALICE)
    assert reg.active_count() == 0
    assert context_registry.enabled is False
    assert kept.user_id == ALICE


def test_enabled_registry_counts_live_contexts_per_user(registry: ContextRegistry) -> None:
    """While enabled, every new context is counted, per user when asked."""
    alice = UserExecutionContext(user_id=ALICE)
    alice_child = alice.child("op")
    bob = UserExecutionContext(user_id=BOB).with_db_session(object())
    assert registry.enabled is True
    assert registry.active_count() == 3  # alice, her child, bob with a session
    assert registry.active_count(ALICE) == 2
    assert registry.active_count(BOB) == 1
    assert registry.active_count("user_nobody_0123456789") == 0
    assert alice_child.parent_request_id == alice.request_id
    assert bob.db_session is not None


def test_equal_contexts_are_counted_separately(registry: ContextRegistry) -> None:
    """Distinct but equal live contexts (a session copy, a deserialized twin) each count."""
    original = UserExecutionContext(user_id=ALICE)
    with_session = original.with_db_session(object())
    twin = UserExecutionContext.from_json(original.to_json())
    assert original == with_session == twin
    assert registry.active_count(ALICE) == 3
    del original, twin
    gc.collect()
    assert registry.active_count(ALICE) == 1
    assert with_session.db_session is not None


def test_contexts_created_in_many_threads_are_all_counted(registry: ContextRegistry) -> None:
    """Tracking is thread-safe: contexts made concurrently in 8 threads are all counted."""

    def make_many(i: int) -> list[UserExecutionContext]:
        return [UserExecutionContext(user_id=f"user_{i}_{n:04d}_threads") for n in range(250)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        made = [ctx for batch in pool.map(make_many, range(8)) for ctx in batch]
    assert registry.active_count() == len(made) == 2000


def test_collected_contexts_are_no_longer_counted(registry: ContextRegistry) -> None:
    """Tracking is by weak reference: a dropped context stops counting once collected."""
    ctx = UserExecutionContext(user_id=ALICE)
    ref = weakref.ref(ctx)
    assert registry.active_count() == 1
    del ctx
    gc.collect()
    assert ref() is None
    assert registry.active_count() == 0


def test_clear_forgets_tracked_contexts(registry: ContextRegistry) -> None:
    """clear() forgets what was tracked; tracking goes on."""
    kept = [UserExecutionContext(user_id=ALICE) for _ in range(3)]
    registry.clear()
    assert registry.active_count() == 0
    kept.append(UserExecutionContext(user_id=ALICE))
    assert registry.active_count() == 1


def test_disabled_registry_tracks_nothing_new() -> None:
    """After disable(), new contexts are not tracked; tracked ones stay until collected."""
    reg = ContextRegistry()
    reg.enable()
    try:
        tracked = UserExecutionContext(user_id=ALICE)
    finally:
        reg.disable()
    assert reg.enabled is False
    untracked = [UserExecutionContext(user_id=BOB) for _ in range(5)]
    assert reg.active_count() == 1
    assert reg.active_count(BOB) == 0
    assert tracked.user_id == ALICE
    assert len(untracked) == 5


def test_only_one_registry_may_be_enabled() -> None:
    """Enabling a second registry while one is enabled raises RuntimeError."""
    first, second = ContextRegistry(), ContextRegistry()
    with first:
        with pytest.raises(RuntimeError):
            second.enable()
        second.disable()  # harmless: it never took over
        first.enable()  # enabling again is harmless
        kept = UserExecutionContext(user_id=ALICE)
        assert first.active_count() == 1
        assert second.active_count() == 0
    with second:
        assert second.enabled
    assert kept.user_id == ALICE


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(0)
    ctx = get_context()
    child = ctx.child("handler")
    body = json.dumps({"request_id": ctx.request_id, "child": child.request_id}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def _one_request(app: ContextMiddleware) -> bytes:
    body = b""

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        nonlocal body
        body += message.get("body", b"")

    scope = {"type": "http", "path": "/", "headers": [], "query_string": b""}
    await app(scope, receive, send)
    return body


async def test_no_context_outlives_its_request(registry: ContextRegistry) -> None:
    """After N requests through the middleware (and gc), no context is alive."""
    app = ContextMiddleware(_app)
    bodies = await asyncio.gather(*(_one_request(app) for _ in range(200)))
    assert len(set(bodies)) == 200
    gc.collect()
    assert registry.active_count() == 0
    assert registry.active_count("anonymous") == 0


async def test_context_is_live_during_its_request(registry: ContextRegistry) -> None:
    """While a request is in flight its context (and child) are counted."""
    counts: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        child = get_context().child("step")
        counts.append(registry.active_count("anonymous"))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        assert child.operation == "step"

    await _one_request(ContextMiddleware(app))
    gc.collect()
    assert counts == [2]
    assert registry.active_count() == 0


async def test_disabled_registry_sees_no_requests() -> None:
    """Requests made while no registry is enabled are not tracked."""
    reg = ContextRegistry()
    await _one_request(ContextMiddleware(_app))
    assert reg.active_count() == 0
