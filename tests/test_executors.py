"""ContextThreadPoolExecutor: jobs run in the submitter's context, and never leak into the next."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest

from ctxvars_mw import (
    ContextThreadPoolExecutor,
    UserExecutionContext,
    get_context,
    get_context_or_none,
    use_context,
)
from ctxvars_mw.current import _current

ALICE = UserExecutionContext(user_id="auth0|5f7c8ec7c33c6c004bbafe82")
BOB = UserExecutionContext(user_id="google-oauth2|1234567890")
_probe: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="unset")


def _user() -> str | None:
    ctx = get_context_or_none()
    return None if ctx is None else ctx.user_id


def test_submit_runs_the_job_in_the_submitters_context() -> None:
    """get_context() inside the job is the submitter's context."""
    with ContextThreadPoolExecutor(max_workers=2) as pool:
        with use_context(ALICE):
            alice = pool.submit(get_context)
        with use_context(BOB):
            bob = pool.submit(get_context)
        outside = pool.submit(_user)
        assert alice.result(timeout=5) is ALICE
        assert bob.result(timeout=5) is BOB
        assert outside.result(timeout=5) is None


def test_map_carries_the_context_to_every_item() -> None:
    """map() runs each item in the context current when map() was called."""
    with ContextThreadPoolExecutor(max_workers=3) as pool, use_context(ALICE):
        users = list(pool.map(lambda _: _user(), range(20), timeout=5))
    assert users == [ALICE.user_id] * 20


def test_a_value_set_in_one_job_never_leaks_into_the_next_on_the_same_thread() -> None:
    """With one worker thread, job 2 sees neither job 1's context nor its other variables."""

    def set_things() -> str:
        _current.set(BOB)
        _probe.set("job-1")
        return threading.current_thread().name

    def read_things() -> tuple[str | None, str, str]:
        return _user(), _probe.get(), threading.current_thread().name

    with ContextThreadPoolExecutor(max_workers=1) as pool:
        with use_context(ALICE):
            first_thread = pool.submit(set_things).result(timeout=5)
            user, probe, second_thread = pool.submit(read_things).result(timeout=5)
        none_user, _, _ = pool.submit(read_things).result(timeout=5)
    assert first_thread == second_thread
    assert (user, probe) == (ALICE.user_id, "unset")
    assert none_user is None
    assert get_context_or_none() is None


def test_a_job_cannot_change_the_submitters_context() -> None:
    """Setting a value inside the job changes only the job's copy."""
    with ContextThreadPoolExecutor(max_workers=1) as pool, use_context(ALICE):
        pool.submit(lambda: _current.set(BOB)).result(timeout=5)
        assert get_context() is ALICE


def test_many_users_submitting_concurrently_stay_apart() -> None:
    """Threads that submit for different users each get their own user back."""
    users = [UserExecutionContext(user_id=f"user_{i:02d}_5f7c8ec7c33c6c00") for i in range(16)]
    results: dict[str, list[str | None]] = {}

    def slow_user() -> str | None:
        time.sleep(0.001)
        return _user()

    with ContextThreadPoolExecutor(max_workers=4) as pool:

        def submitter(ctx: UserExecutionContext) -> None:
            with use_context(ctx):
                futures = [pool.submit(slow_user) for _ in range(5)]
                results[ctx.user_id] = [f.result(timeout=5) for f in futures]

        threads = [threading.Thread(target=submitter, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert results == {u.user_id: [u.user_id] * 5 for u in users}


def test_submit_passes_arguments_and_exceptions_through() -> None:
    """Arguments reach the function; its exception reaches the future."""
    with ContextThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(pow, 2, exp=10).result(timeout=5) == 1024
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(timeout=5)
