"""Celery: the envelope travels in the task headers to a REAL worker on the local Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ctxvars_mw import (
    ConfigurationError,
    ContextMiddleware,
    ExpiredTokenError,
    InvalidTokenError,
    JWTAuthenticator,
    Tier,
    UserExecutionContext,
    get_context,
    get_context_or_none,
    use_context,
)
from ctxvars_mw.envelope import ENVELOPE_TYP, InMemoryReplayStore, dumps
from ctxvars_mw.integrations.celery import ENVELOPE_HEADER, install, task_context
from ctxvars_mw.testing import mint_token
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


@dataclass(frozen=True)
class Worker:
    """The running worker's own log, and the file its tasks' records go to (JSON lines)."""

    log: Path
    task_log: Path

    def task_records(self, marker: str) -> list[dict[str, str]]:
        """The task records whose message names ``marker``, in the order they were written."""
        lines = self.task_log.read_text().splitlines()
        return [r for r in map(json.loads, lines) if marker in r["message"].split()]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A real ``celery worker --pool=solo`` on this run's queue; its Redis keys deleted after."""
    from tests.conftest import redis_answers

    if not redis_answers():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Redis is not answering on 127.0.0.1:6379")
        pytest.skip("Redis is not answering on 127.0.0.1:6379")
    folder = tmp_path_factory.mktemp("celery")
    running = Worker(folder / "worker.log", folder / "tasks.jsonl")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CTXVARS_CELERY_RUN": tasks.RUN,
        "CTXVARS_CELERY_SECRET": tasks.SECRET,
        "CTXVARS_CELERY_TASK_LOG": str(running.task_log),
    }
    command = [sys.executable, "-m", "celery", "-A", "tests.integrations.celery_tasks", "worker",
               "--pool=solo", "-Q", tasks.QUEUE, "--without-gossip", "--without-mingle",
               "--without-heartbeat", "--loglevel=INFO", f"--logfile={running.log}"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        tasks.whoami.delay().get(timeout=30)  # the worker is consuming
        yield running
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


def _assert_child_of(seen: dict[str, Any], publisher: UserExecutionContext) -> None:
    """``seen`` (a task's context as a dict) is a task child of ``publisher``: a new request
    id, ``parent_request_id`` the publisher's, and every other field (but the time) the same."""
    ctx = UserExecutionContext.from_dict(seen)
    assert ctx.request_id != publisher.request_id
    assert ctx.parent_request_id == publisher.request_id
    assert ctx.created_at >= publisher.created_at
    same = ctx.replace(
        request_id=publisher.request_id,
        parent_request_id=publisher.parent_request_id,
        created_at=publisher.created_at,
    )
    assert same == publisher


def _chain(first: Any) -> list[dict[str, Any]]:
    """The ids of every hop of a ``hop`` chain, following each hop's ``next`` task id."""
    hops = [first.get(timeout=TIMEOUT)]
    while hops[-1]["next"] is not None:
        hops.append(tasks.app.AsyncResult(hops[-1]["next"]).get(timeout=TIMEOUT))
    return hops


def _assert_linked(hops: list[dict[str, Any]], publisher_request_id: str, correlation: str) -> None:
    """Each hop has a request id of its own, its parent is the previous hop (the publisher for
    the first), and all share ``correlation``."""
    parents = [publisher_request_id] + [h["request_id"] for h in hops[:-1]]
    assert [h["parent_request_id"] for h in hops] == parents
    assert len({h["request_id"] for h in hops} | {publisher_request_id}) == len(hops) + 1
    assert {h["correlation_id"] for h in hops} == {correlation}


def _marker() -> str:
    return f"m{uuid.uuid4().hex[:12]}"


JWT_SECRET = "a-jwt-secret-for-the-celery-tests-0123456789"


def _publishing_app() -> Starlette:
    """An app whose endpoint publishes a three-hop chain and answers with its own ids."""

    async def publish(request: Request) -> JSONResponse:
        ctx = get_context()
        first = tasks.hop.delay(2, request.query_params["marker"])
        return JSONResponse(
            {"task": first.id, "request_id": ctx.request_id, "user_id": ctx.user_id}
        )

    app = Starlette(routes=[Route("/publish", publish, methods=["POST"])])
    authenticator = JWTAuthenticator(key=JWT_SECRET, algorithms=["HS256"])
    return ContextMiddleware(app, authenticator=authenticator, require_authentication=True)  # type: ignore[return-value]


def test_task_runs_in_a_child_of_the_publishing_context(worker: Worker) -> None:
    """The worker's task body sees a child of the publisher's context: new request id, parent
    the publisher's, same correlation id, user, rights, operation and depth."""
    published = CTX.child("agent.plan")
    with use_context(published):
        result = tasks.whoami.delay()
    _assert_child_of(result.get(timeout=TIMEOUT), published)


def test_request_task_task_task_chain_links_each_hop_to_the_previous(worker: Worker) -> None:
    """A request publishes a task that publishes a task that publishes a task: each hop has a
    new request id whose parent is the previous hop's, all keep the request's correlation id
    and user, and every hop's log record carries those ids."""
    marker, correlation = _marker(), f"corr-{uuid.uuid4().hex}"
    token = mint_token(JWT_SECRET, user_id="auth0|chain-user-0042", permissions=["agents:run"])
    with TestClient(_publishing_app()) as client:
        response = client.post(
            f"/publish?marker={marker}",
            headers={"Authorization": f"Bearer {token}", "X-Correlation-ID": correlation},
        )
    assert response.status_code == 200
    request = response.json()
    hops = _chain(tasks.app.AsyncResult(request["task"]))
    assert len(hops) == 3
    _assert_linked(hops, request["request_id"], correlation)
    assert {h["user_id"] for h in hops} == {"auth0|chain-user-0042"}
    assert all(h["permissions"] == ["agents:run"] for h in hops)
    records = worker.task_records(marker)
    fields = ("request_id", "parent_request_id", "correlation_id", "user_id")
    assert [{k: r[k] for k in fields} for r in records] == [{k: h[k] for k in fields} for h in hops]


def test_a_celery_chain_and_errback_run_as_children_of_the_task_before_them(
    worker: Worker,
) -> None:
    """Celery publishes the next link of a ``chain`` after the task body has returned: each is
    still a child of the task before it. An errback taking ``(request, exc, traceback)``, which
    Celery calls inline after the failure, runs in the failed task's context. The worker's next
    task starts clean."""
    from celery import chain

    marker = _marker()
    with use_context(CTX):
        result = chain(tasks.step.s(None, marker), tasks.step.s(marker), tasks.step.s(marker))()
        failing = tasks.fail.apply_async((marker,), link_error=tasks.on_failure.s(marker))
    hops = result.get(timeout=TIMEOUT)
    assert len(hops) == 3
    _assert_linked(hops, CTX.request_id, CTX.correlation_id)
    with pytest.raises(ValueError, match="this task fails"):
        failing.get(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while len(worker.task_records(marker)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)  # the errback is queued after the failure is stored
    by_message = {r["message"]: r for r in worker.task_records(marker)}
    failed, errback = by_message[f"fail {marker}"], by_message[f"errback {marker}"]
    assert errback == {**failed, "message": f"errback {marker}"}
    assert errback["correlation_id"] == CTX.correlation_id
    after = tasks.whoami.delay().get(timeout=TIMEOUT)
    assert after["user_id"] == "anonymous"


def test_task_published_outside_a_context_gets_an_anonymous_root_context(
    worker: Worker,
) -> None:
    """Outside any context the task runs as nobody (anonymous, unauthenticated, no rights)
    with a generated correlation id, which its sub-task inherits; each such publish gets its
    own correlation id."""
    marker = _marker()
    hops = _chain(tasks.hop.delay(1, marker))
    root = hops[0]["correlation_id"]
    assert root  # generated at publish: the parent of the first hop is that publish
    _assert_linked(hops, root, root)
    assert {(h["user_id"], h["is_authenticated"]) for h in hops} == {("anonymous", False)}
    assert all(h["permissions"] == [] for h in hops)
    other = tasks.hop.delay(0, _marker()).get(timeout=TIMEOUT)
    assert other["correlation_id"] != root
    records = worker.task_records(marker)
    assert [r["correlation_id"] for r in records] == [root, root]
    assert [r["parent_request_id"] for r in records] == [root, hops[0]["request_id"]]


def test_an_anonymous_task_is_refused_what_needs_a_permission(worker: Worker) -> None:
    """A task published outside a context cannot do what a permission guards: the anonymous
    context it runs in holds none, so the guard raises before the guarded code."""
    result = tasks.needs_permission.delay()
    with pytest.raises(Exception) as info:
        result.get(timeout=TIMEOUT)
    assert type(info.value).__name__ == "AuthenticationRequiredError"
    with use_context(CTX):  # the same task in a context that holds it
        assert tasks.needs_permission.delay().get(timeout=TIMEOUT) == CTX.user_id


def test_context_does_not_leak_into_the_next_task_on_the_worker(worker: Worker) -> None:
    """The solo worker runs every task in one thread: after a task in CTX, a task published
    outside a context is anonymous, and a message without an envelope runs with none."""
    with use_context(CTX):
        inside = tasks.whoami.delay().get(timeout=TIMEOUT)
    after = tasks.whoami.delay().get(timeout=TIMEOUT)
    bare = tasks.whoami.apply_async(headers={ENVELOPE_HEADER: None}).get(timeout=TIMEOUT)
    assert inside["user_id"] == CTX.user_id
    assert (after["user_id"], after["is_authenticated"]) == ("anonymous", False)
    assert after["correlation_id"] != CTX.correlation_id
    assert bare is None


def test_context_follows_a_task_published_by_a_task(worker: Worker) -> None:
    """A task the worker publishes from inside a task is a child of that task's context."""
    with use_context(CTX):
        second_id = tasks.relay.delay().get(timeout=TIMEOUT)
    seen = UserExecutionContext.from_dict(tasks.app.AsyncResult(second_id).get(timeout=TIMEOUT))
    assert seen.correlation_id == CTX.correlation_id
    assert seen.user_id == CTX.user_id
    assert seen.parent_request_id not in (None, CTX.request_id)  # the first task's id


def test_retries_are_siblings_of_the_first_attempt(worker: Worker) -> None:
    """Every attempt of a retried task has its own request id and the publisher's request id
    as parent (not the failed attempt's); the correlation id and the Celery task id stay."""
    marker = _marker()
    with use_context(CTX):
        result = tasks.flaky.delay(2, marker)
    final = result.get(timeout=TIMEOUT)
    records = worker.task_records(marker)
    assert [r["message"] for r in records] == [f"attempt {marker} {n}" for n in range(3)]
    assert {r["parent_request_id"] for r in records} == {CTX.request_id}
    assert {r["correlation_id"] for r in records} == {CTX.correlation_id}
    assert len({r["request_id"] for r in records}) == 3
    assert final["request_id"] == records[-1]["request_id"]


def test_send_task_by_name_carries_the_envelope(worker: Worker) -> None:
    """Publishing by name (no task object) still attaches the envelope."""
    with use_context(CTX):
        result = tasks.app.send_task("tests.integrations.celery_tasks.whoami")
    _assert_child_of(result.get(timeout=TIMEOUT), CTX)


@pytest.mark.parametrize(
    ("key", "age", "error"),
    [("other-secret-" + "x" * 32, 0, InvalidTokenError), (None, 120, ExpiredTokenError)],
    ids=["wrong-secret", "expired"],
)
def test_worker_refuses_a_forged_or_expired_envelope(
    worker: Worker, key: str | None, age: int, error: type[Exception]
) -> None:
    """A bad envelope fails the task before its body runs; the token is not in the error."""
    now = int(time.time()) - age
    token = _forged({"ctx": CTX.to_dict(), "iat": now, "exp": now + 60}, key or tasks.SECRET)
    result = tasks.whoami.apply_async(headers={ENVELOPE_HEADER: token})
    with pytest.raises(error) as info:
        result.get(timeout=TIMEOUT)
    assert token not in str(info.value)
    log = worker.log.read_text()
    assert result.id in log  # the worker logged the failure...
    assert token not in log  # ...without the envelope
    assert tasks.SECRET not in log


def test_eager_mode_runs_the_task_in_a_child_of_the_callers_context() -> None:
    """With task_always_eager (and with apply()), the task runs in a child of the caller's
    context, which is unchanged afterwards; outside a context it runs as anonymous."""
    tasks.app.conf.task_always_eager = True
    try:
        with use_context(CTX) as ctx:
            eager = tasks.whoami.delay().get()
            applied = tasks.whoami.apply().get()
            assert get_context_or_none() is ctx
        outside = tasks.whoami.apply().get()
        assert get_context_or_none() is None  # nothing left current after the task
    finally:
        tasks.app.conf.task_always_eager = False
    _assert_child_of(eager, CTX)
    _assert_child_of(applied, CTX)
    assert eager["request_id"] != applied["request_id"]
    assert (outside["user_id"], outside["is_authenticated"]) == ("anonymous", False)
    assert outside["permissions"] == []
    assert outside["roles"] == []


def test_eager_chains_and_retries_link_ids_as_a_worker_does(tmp_path: Path) -> None:
    """Eagerly, a chain of hops links each to the previous one and retries are siblings, with
    the same ids in the records ContextLogFilter annotates."""
    handler = tasks.log_to(str(tmp_path / "eager.jsonl"))
    records = Worker(tmp_path / "unused.log", tmp_path / "eager.jsonl").task_records
    chain, retried = _marker(), _marker()
    tasks.app.conf.task_always_eager = True
    try:
        with use_context(CTX):
            tasks.hop.delay(2, chain).get()
            final = tasks.flaky.delay(2, retried).get()
    finally:
        tasks.app.conf.task_always_eager = False
        tasks.log.removeHandler(handler)
        handler.close()
    hops = records(chain)
    assert [h["message"] for h in hops] == [f"hop {chain} {n}" for n in (2, 1, 0)]
    _assert_linked(hops, CTX.request_id, CTX.correlation_id)  # type: ignore[arg-type]
    attempts = records(retried)
    assert len(attempts) == 3
    assert {r["parent_request_id"] for r in attempts} == {CTX.request_id}
    assert len({r["request_id"] for r in attempts}) == 3
    assert final["request_id"] == attempts[-1]["request_id"]


def test_task_context_keeps_the_request_metadata_of_its_publisher() -> None:
    """A task runs for the request that published it: same client, agent, method, path."""
    publisher = CTX.replace(
        client_ip="203.0.113.8", user_agent="ui/2", method="POST", path="/exports"
    )
    ctx = task_context(publisher)
    assert (ctx.client_ip, ctx.user_agent, ctx.method, ctx.path) == (
        "203.0.113.8",
        "ui/2",
        "POST",
        "/exports",
    )


def test_task_context_is_a_child_that_keeps_operation_and_depth() -> None:
    """task_context() only changes the request id, the parent and the time: the operation and
    its depth stay, so a chain of tasks longer than MAX_OPERATION_DEPTH hops is fine."""
    published = CTX.child("agent.plan").with_websocket_client("ws-client-0001")
    ctx = published
    for _ in range(20):
        parent, ctx = ctx, task_context(ctx)
        assert ctx.parent_request_id == parent.request_id
    assert (ctx.operation, ctx.operation_depth) == ("agent.plan", 1)
    assert ctx.websocket_client_id == "ws-client-0001"
    _assert_child_of(task_context(published).to_dict(), published)


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


def test_worker_runs_a_message_once_with_a_replay_store(worker: Worker) -> None:
    """The same envelope delivered twice (a copied or redelivered message) runs once."""
    token = dumps(CTX, tasks.SECRET)
    first = tasks.whoami.apply_async(headers={ENVELOPE_HEADER: token})
    _assert_child_of(first.get(timeout=TIMEOUT), CTX)
    again = tasks.whoami.apply_async(headers={ENVELOPE_HEADER: token})
    with pytest.raises(InvalidTokenError, match="already used"):
        again.get(timeout=TIMEOUT)
    with use_context(CTX):  # ordinary publishing signs a fresh envelope every time
        runs = [tasks.whoami.delay() for _ in range(3)]
    for run in runs:
        _assert_child_of(run.get(timeout=TIMEOUT), CTX)


@pytest.mark.parametrize("header", [12345, {"ctx": "x"}, ["a"], True], ids=repr)
def test_worker_fails_a_task_whose_envelope_header_is_not_a_string(
    worker: Worker, header: object
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
    _assert_child_of(default.result, CTX)
    for bad in (-1, "5"):
        with pytest.raises(ConfigurationError, match="leeway"):
            install(tasks.app, secret=tasks.SECRET, leeway=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="replay_store"):
        install(tasks.app, secret=tasks.SECRET, replay_store=object())  # type: ignore[arg-type]
