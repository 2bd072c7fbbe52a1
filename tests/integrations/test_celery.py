"""Celery: the envelope travels in the task headers to a REAL worker on the local Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from ctxvars_mw import (
    ConfigurationError,
    ExpiredTokenError,
    InvalidTokenError,
    Tier,
    UserExecutionContext,
    get_context_or_none,
    use_context,
)
from ctxvars_mw.envelope import ENVELOPE_TYP, InMemoryReplayStore, dumps
from ctxvars_mw.integrations.celery import ENVELOPE_HEADER, install
from tests.integrations import celery_tasks as tasks
from tests.servers import ROOT

CTX = UserExecutionContext(
    user_id="auth0|5f7c8ec7c33c6c004bbafe82",
    tier=Tier.ENTERPRISE,
    roles={"admin"},
    permissions={"agents:*"},
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    agent_context={"model": "m-large"},
)
TIMEOUT = 20


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real ``celery worker --pool=solo`` on this run's queue; its Redis keys deleted after."""
    from tests.conftest import redis_answers

    if not redis_answers():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Redis is not answering on 127.0.0.1:6379")
        pytest.skip("Redis is not answering on 127.0.0.1:6379")
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CTXVARS_CELERY_RUN": tasks.RUN,
        "CTXVARS_CELERY_SECRET": tasks.SECRET,
    }
    command = [sys.executable, "-m", "celery", "-A", "tests.integrations.celery_tasks", "worker",
               "--pool=solo", "-Q", tasks.QUEUE, "--without-gossip", "--without-mingle",
               "--without-heartbeat", "--loglevel=INFO", f"--logfile={log}"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        tasks.whoami.delay().get(timeout=30)  # the worker is consuming
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _delete_keys(tasks.PREFIX)


def _delete_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(tasks.REDIS)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _forged(payload: dict[str, Any], key: str) -> str:
    return jwt.encode(payload, key, algorithm="HS256", headers={"typ": ENVELOPE_TYP})


def test_task_published_in_a_context_runs_in_it_on_the_worker(worker: Path) -> None:
    """The worker's task body sees a context equal to the publisher's."""
    child = CTX.child("agent.plan")
    with use_context(child):
        result = tasks.whoami.delay()
    seen = result.get(timeout=TIMEOUT)
    assert UserExecutionContext.from_dict(seen) == child


def test_task_published_outside_a_context_runs_without_one(worker: Path) -> None:
    """No context at publish time: no envelope, no context in the worker — and nothing left
    over from the previous task on the same (solo) worker."""
    with use_context(CTX):
        tasks.whoami.delay().get(timeout=TIMEOUT)
    assert tasks.whoami.delay().get(timeout=TIMEOUT) is None


def test_context_follows_a_task_published_by_a_task(worker: Path) -> None:
    """A task the worker publishes from inside a task carries the same context on."""
    with use_context(CTX):
        second_id = tasks.relay.delay().get(timeout=TIMEOUT)
    seen = tasks.app.AsyncResult(second_id).get(timeout=TIMEOUT)
    assert UserExecutionContext.from_dict(seen) == CTX


def test_send_task_by_name_carries_the_envelope(worker: Path) -> None:
    """Publishing by name (no task object) still attaches the envelope."""
    with use_context(CTX):
        result = tasks.app.send_task("tests.integrations.celery_tasks.whoami")
    assert UserExecutionContext.from_dict(result.get(timeout=TIMEOUT)) == CTX


@pytest.mark.parametrize(
    ("key", "age", "error"),
    [("other-secret-" + "x" * 32, 0, InvalidTokenError), (None, 120, ExpiredTokenError)],
    ids=["wrong-secret", "expired"],
)
def test_worker_refuses_a_forged_or_expired_envelope(
    worker: Path, key: str | None, age: int, error: type[Exception]
) -> None:
    """A bad envelope fails the task before its body runs; the token is not in the error."""
    now = int(time.time()) - age
    token = _forged({"ctx": CTX.to_dict(), "iat": now, "exp": now + 60}, key or tasks.SECRET)
    result = tasks.whoami.apply_async(headers={ENVELOPE_HEADER: token})
    with pytest.raises(error) as info:
        result.get(timeout=TIMEOUT)
    assert token not in str(info.value)
    log = worker.read_text()
    assert result.id in log  # the worker logged the failure...
    assert token not in log  # ...without the envelope
    assert tasks.SECRET not in log


def test_eager_mode_runs_the_task_in_the_envelopes_context() -> None:
    """With task_always_eager (and with apply()), the task sees an equal context and the
    caller's context is unchanged afterwards."""
    tasks.app.conf.task_always_eager = True
    try:
        with use_context(CTX) as ctx:
            eager = tasks.whoami.delay().get()
            applied = tasks.whoami.apply().get()
            assert get_context_or_none() is ctx
        outside = tasks.whoami.apply().get()
    finally:
        tasks.app.conf.task_always_eager = False
    assert UserExecutionContext.from_dict(eager) == CTX
    assert UserExecutionContext.from_dict(applied) == CTX
    assert outside is None


def test_eager_mode_refuses_an_expired_envelope() -> None:
    """Eager runs verify the envelope the same way a worker does."""
    now = int(time.time()) - 120
    token = _forged({"ctx": CTX.to_dict(), "iat": now, "exp": now + 60}, tasks.SECRET)
    result = tasks.whoami.apply(headers={ENVELOPE_HEADER: token})
    assert isinstance(result.result, ExpiredTokenError)


def test_install_checks_its_configuration() -> None:
    """A short secret or an app without ContextTask is refused at install time."""
    from celery import Celery

    with pytest.raises(ConfigurationError):
        install(tasks.app, secret="too-short")
    with pytest.raises(ConfigurationError):
        install(Celery("plain", set_as_current=False), secret="s" * 32)


def test_worker_runs_a_message_once_with_a_replay_store(worker: Path) -> None:
    """The same envelope delivered twice (a copied or redelivered message) runs once."""
    token = dumps(CTX, tasks.SECRET)
    first = tasks.whoami.apply_async(headers={ENVELOPE_HEADER: token})
    assert UserExecutionContext.from_dict(first.get(timeout=TIMEOUT)) == CTX
    again = tasks.whoami.apply_async(headers={ENVELOPE_HEADER: token})
    with pytest.raises(InvalidTokenError, match="already used"):
        again.get(timeout=TIMEOUT)
    with use_context(CTX):  # ordinary publishing signs a fresh envelope every time
        runs = [tasks.whoami.delay() for _ in range(3)]
    assert [UserExecutionContext.from_dict(r.get(timeout=TIMEOUT)) for r in runs] == [CTX] * 3


@pytest.mark.parametrize("header", [12345, {"ctx": "x"}, ["a"], True], ids=repr)
def test_worker_fails_a_task_whose_envelope_header_is_not_a_string(
    worker: Path, header: object
) -> None:
    """A present but non-string envelope header fails the task; the body never runs."""
    result = tasks.whoami.apply_async(headers={ENVELOPE_HEADER: header})
    with pytest.raises(InvalidTokenError, match="malformed"):
        result.get(timeout=TIMEOUT)


def test_install_takes_the_leeway() -> None:
    """install(leeway=0) refuses an envelope 3 s past exp; the default 5 s accepts it."""
    now = int(time.time())
    payload = {"ctx": CTX.to_dict(), "iat": now - 63, "exp": now - 3, "jti": "j" * 22}
    try:
        install(tasks.app, secret=tasks.SECRET, leeway=0, replay_store=InMemoryReplayStore())
        strict = tasks.whoami.apply(headers={ENVELOPE_HEADER: _forged(payload, tasks.SECRET)})
        install(tasks.app, secret=tasks.SECRET, replay_store=InMemoryReplayStore())
        default = tasks.whoami.apply(headers={ENVELOPE_HEADER: _forged(payload, tasks.SECRET)})
    finally:
        install(tasks.app, secret=tasks.SECRET, replay_store=tasks.app_replay_store)
    assert isinstance(strict.result, ExpiredTokenError)
    assert UserExecutionContext.from_dict(default.result) == CTX
    for bad in (-1, "5"):
        with pytest.raises(ConfigurationError, match="leeway"):
            install(tasks.app, secret=tasks.SECRET, leeway=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="replay_store"):
        install(tasks.app, secret=tasks.SECRET, replay_store=object())  # type: ignore[arg-type]
