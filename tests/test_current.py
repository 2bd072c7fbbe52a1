"""The current context: get/use/child_context, bind and run_in_thread (API.md §2)."""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ctxvars_mw import (
    ContextNotSetError,
    UserExecutionContext,
    bind,
    child_context,
    get_context,
    get_context_or_none,
    run_in_thread,
    use_context,
)

ALICE = UserExecutionContext(user_id="user_alice_5f7c8ec7c33c")
BOB = UserExecutionContext(user_id="user_bob_004bbafe82aa")
_probe: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="unset")


def test_get_context_outside_raises_context_not_set_error() -> None:
    """Outside a request get_context raises ContextNotSetError, a LookupError."""
    with pytest.raises(ContextNotSetError):
        get_context()
    with pytest.raises(LookupError):
        get_context()
    assert get_context_or_none() is None


def test_use_context_sets_and_restores() -> None:
    """use_context makes the context current and restores None after the block."""
    with use_context(ALICE) as ctx:
        assert ctx is ALICE
        assert get_context() is ALICE
        assert get_context_or_none() is ALICE
    assert get_context_or_none() is None


async def test_use_context_with_async_with() -> None:
    """use_context works with async with, across awaits."""
    async with use_context(ALICE) as ctx:
        await asyncio.sleep(0)
        assert ctx is ALICE
        assert get_context() is ALICE
    assert get_context_or_none() is None


def test_use_context_restores_on_error() -> None:
    """An exception in the block still restores the previous context."""
    with use_context(BOB):
        with pytest.raises(RuntimeError), use_context(ALICE):
            raise RuntimeError("boom")
        assert get_context() is BOB
    assert get_context_or_none() is None


async def test_async_use_context_restores_on_error() -> None:
    """async with restores on error too."""

    async def fail_inside() -> None:
        async with use_context(ALICE):
            await asyncio.sleep(0)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await fail_inside()
    assert get_context_or_none() is None


def test_use_context_nests() -> None:
    """Nested blocks restore the outer context on exit."""
    with use_context(ALICE):
        with use_context(BOB):
            assert get_context() is BOB
            with use_context(ALICE):
                assert get_context() is ALICE
            assert get_context() is BOB
        assert get_context() is ALICE
    assert get_context_or_none() is None


def test_one_use_context_object_can_be_reentered() -> None:
    """The same use_context object may be entered again while active."""
    block = use_context(ALICE)
    with block, use_context(BOB), block:
        assert get_context() is ALICE
    assert get_context_or_none() is None


def test_use_context_refuses_other_values() -> None:
    """use_context takes only a UserExecutionContext."""
    with pytest.raises(TypeError):
        use_context({"user_id": "x"})  # type: ignore[arg-type]


def test_child_context_derives_and_restores() -> None:
    """child_context makes a child of the current context current for the block."""
    with use_context(ALICE):
        with child_context("agent.plan", agent_context={"step": 1}) as child:
            assert get_context() is child
            assert child.parent_request_id == ALICE.request_id
            assert child.operation == "agent.plan"
            assert child.agent_context["step"] == 1
            with child_context("tool.search") as grandchild:
                assert grandchild.parent_request_id == child.request_id
                assert grandchild.operation_depth == 2
            assert get_context() is child
        assert get_context() is ALICE


async def test_child_context_with_async_with() -> None:
    """child_context works with async with."""
    async with use_context(ALICE), child_context("agent.run") as child:
        await asyncio.sleep(0)
        assert get_context() is child
        assert child.correlation_id == ALICE.correlation_id
    assert get_context_or_none() is None


def test_child_context_outside_raises() -> None:
    """child_context needs a current context."""
    with pytest.raises(ContextNotSetError):
        child_context("orphan")


def test_bind_with_thread_pool_submit() -> None:
    """A bound callable sees the caller's context in a ThreadPoolExecutor worker."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        unbound = pool.submit(get_context_or_none).result()
        with use_context(ALICE):
            bound = bind(get_context)
        assert pool.submit(bound).result() is ALICE
    assert unbound is None


def test_bind_with_threading_thread() -> None:
    """A bound target sees the context in a plain threading.Thread."""
    seen: list[UserExecutionContext | None] = []
    with use_context(BOB):
        thread = threading.Thread(target=bind(lambda: seen.append(get_context_or_none())))
    thread.start()
    thread.join()
    assert seen == [BOB]


async def test_bind_with_run_in_executor() -> None:
    """A bound callable carries the context through loop.run_in_executor."""
    loop = asyncio.get_running_loop()
    async with use_context(ALICE):
        assert await loop.run_in_executor(None, get_context_or_none) is None
        assert await loop.run_in_executor(None, bind(get_context)) is ALICE


def test_bind_passes_arguments_and_keeps_metadata() -> None:
    """The bound callable forwards arguments and keeps the wrapped function's name."""

    def describe(prefix: str, *, suffix: str) -> str:
        return f"{prefix}{get_context().user_id}{suffix}"

    with use_context(ALICE):
        bound = bind(describe)
    assert bound("<", suffix=">") == f"<{ALICE.user_id}>"
    assert bound.__name__ == "describe"


def test_bound_callable_runs_concurrently_in_many_threads() -> None:
    """One bound callable may run at once in many threads, each seeing the context."""
    barrier = threading.Barrier(16)

    def work() -> str:
        barrier.wait(timeout=10)
        return get_context().user_id

    with use_context(ALICE):
        bound = bind(work)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: bound(), range(16)))
    assert results == [ALICE.user_id] * 16


def test_values_set_inside_a_bound_call_do_not_leak() -> None:
    """Context variables set inside one call are seen neither by the caller nor later calls."""

    def set_and_read() -> tuple[str, UserExecutionContext | None]:
        before = _probe.get()
        _probe.set("inside")
        with use_context(BOB):
            pass
        return before, get_context_or_none()

    with use_context(ALICE):
        bound = bind(set_and_read)
        assert bound() == ("unset", ALICE)
        assert bound() == ("unset", ALICE)
        assert _probe.get() == "unset"
        assert get_context() is ALICE


def test_bind_captures_at_bind_time() -> None:
    """The context is the one current when bind() was called, not when the call runs."""
    with use_context(ALICE):
        bound = bind(get_context)
    with use_context(BOB):
        assert bound() is ALICE


async def test_run_in_thread_carries_the_context() -> None:
    """run_in_thread runs a sync function in another thread with the current context."""
    main_thread = threading.get_ident()

    def work(a: int, *, b: int) -> tuple[int, str, int]:
        return a + b, get_context().user_id, threading.get_ident()

    async with use_context(BOB):
        total, user, thread = await run_in_thread(work, 1, b=2)
    assert (total, user) == (3, BOB.user_id)
    assert thread != main_thread


async def test_run_in_thread_propagates_exceptions() -> None:
    """An exception in the worker is raised in the awaiting task."""

    def fail() -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError):
        await run_in_thread(fail)


async def test_gathered_tasks_are_isolated() -> None:
    """Each task sees only its own context, even when all of them await in between."""

    async def one(i: int) -> tuple[str, str]:
        ctx = UserExecutionContext(user_id=f"user_{i:05d}_isolation")
        await asyncio.sleep(random.random() / 1000)
        async with use_context(ctx):
            for _ in range(3):
                await asyncio.sleep(random.random() / 1000)
                assert get_context() is ctx
            async with child_context("step") as child:
                await asyncio.sleep(0)
                seen = get_context()
                assert seen is child
        return ctx.user_id, seen.user_id

    results = await asyncio.gather(*(one(i) for i in range(300)))
    assert all(expected == seen for expected, seen in results)
    assert len({expected for expected, _ in results}) == 300
    assert get_context_or_none() is None


async def test_task_started_in_a_block_keeps_its_copy() -> None:
    """A task created inside a block keeps the context after the block exits."""
    release = asyncio.Event()

    async def later() -> UserExecutionContext | None:
        await release.wait()
        return get_context_or_none()

    async with use_context(ALICE):
        task = asyncio.create_task(later())
    release.set()
    assert await task is ALICE
    assert get_context_or_none() is None
