"""The context across every concurrency boundary: tasks, task groups, threads, executors.

Each test runs several users concurrently and awaits (or sleeps) between setting the context
and reading it, so a leak between users would show.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ctxvars_mw import (
    ContextThreadPoolExecutor,
    UserExecutionContext,
    bind,
    get_context,
    get_context_or_none,
    use_context,
)

USERS = [UserExecutionContext(user_id=f"user_{i:02d}_5f7c8ec7c33c6c00") for i in range(12)]


def _user_after_a_pause() -> str:
    time.sleep(0.002)
    return get_context().user_id


async def test_create_task_inherits_the_context_at_creation() -> None:
    """A task created inside a request sees that request's context, even after the creator's
    block has ended."""

    async def worker() -> str:
        await asyncio.sleep(0.01)
        return get_context().user_id

    tasks = []
    for ctx in USERS:
        with use_context(ctx):
            tasks.append(asyncio.create_task(worker()))
    assert get_context_or_none() is None
    assert await asyncio.gather(*tasks) == [u.user_id for u in USERS]


async def test_a_task_changing_its_context_does_not_touch_its_creator() -> None:
    """A child task's use_context/child_context stays in the child."""

    async def rebinding_child() -> str:
        async with use_context(USERS[1]):
            await asyncio.sleep(0)
            return get_context().user_id

    async with use_context(USERS[0]):
        seen = await asyncio.create_task(rebinding_child())
        await asyncio.sleep(0)
        assert get_context() is USERS[0]
    assert seen == USERS[1].user_id


async def test_task_group_children_see_their_parents_context() -> None:
    """Tasks of a TaskGroup, per user, each see their own user."""

    async def request(ctx: UserExecutionContext) -> list[str]:
        async with use_context(ctx):
            await asyncio.sleep(0)

            async def step() -> str:
                await asyncio.sleep(0.001)
                return get_context().user_id

            async with asyncio.TaskGroup() as group:
                children = [group.create_task(step()) for _ in range(3)]
            return [c.result() for c in children]

    results = await asyncio.gather(*(request(u) for u in USERS))
    assert results == [[u.user_id] * 3 for u in USERS]


async def test_to_thread_carries_the_context() -> None:
    """asyncio.to_thread copies the context into the worker thread."""

    async def request(ctx: UserExecutionContext) -> str:
        async with use_context(ctx):
            await asyncio.sleep(0)
            return await asyncio.to_thread(_user_after_a_pause)

    assert await asyncio.gather(*(request(u) for u in USERS)) == [u.user_id for u in USERS]


async def test_run_in_executor_needs_bind_to_carry_the_context() -> None:
    """loop.run_in_executor does not copy the context; bind() does."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=4) as pool:

        async def request(ctx: UserExecutionContext) -> tuple[str | None, str]:
            async with use_context(ctx):
                await asyncio.sleep(0)
                plain = await loop.run_in_executor(pool, get_context_or_none)
                bound = await loop.run_in_executor(pool, bind(_user_after_a_pause))
                return (None if plain is None else plain.user_id), bound

        results = await asyncio.gather(*(request(u) for u in USERS))
    assert [bound for _, bound in results] == [u.user_id for u in USERS]
    assert all(plain is None for plain, _ in results)


async def test_context_thread_pool_executor_with_run_in_executor() -> None:
    """run_in_executor on a ContextThreadPoolExecutor carries the context without bind()."""
    loop = asyncio.get_running_loop()
    with ContextThreadPoolExecutor(max_workers=4) as pool:

        async def request(ctx: UserExecutionContext) -> str:
            async with use_context(ctx):
                await asyncio.sleep(0)
                return await loop.run_in_executor(pool, _user_after_a_pause)

        results = await asyncio.gather(*(request(u) for u in USERS))
    assert results == [u.user_id for u in USERS]


def test_threading_thread_with_bind_sees_the_starters_context() -> None:
    """A Thread target wrapped in bind() sees the context of the thread that created it."""
    seen: dict[str, str | None] = {}

    def record(name: str) -> None:
        time.sleep(0.002)
        ctx = get_context_or_none()
        seen[name] = None if ctx is None else ctx.user_id

    threads = []
    for ctx in USERS:
        with use_context(ctx):
            threads.append(threading.Thread(target=bind(record), args=(ctx.user_id,)))
    with use_context(USERS[0]):
        threads.append(threading.Thread(target=record, args=("unbound",)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert seen == {**{u.user_id: u.user_id for u in USERS}, "unbound": None}
