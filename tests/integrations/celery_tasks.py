"""Celery tasks for the integration tests, run by a real worker subprocess.

The broker and result backend are the local Redis, under a key prefix and queue name unique to
this test run (chosen at import, or passed to the worker through the environment), so runs never
see each other's messages and every key can be deleted afterwards. With ``CTXVARS_CELERY_TASK_LOG``
set, the tasks' log records go to that file, one JSON object a line, through ContextLogFilter.
"""

from __future__ import annotations

import logging
import os
import secrets
import uuid
from typing import Any

from celery import Celery

from ctxvars_mw import get_context, get_context_or_none, requires_permission
from ctxvars_mw.envelope import RedisReplayStore
from ctxvars_mw.integrations.celery import ContextTask, install
from ctxvars_mw.logging import ContextLogFilter

RUN = os.environ.get("CTXVARS_CELERY_RUN") or uuid.uuid4().hex[:12]
PREFIX = f"ctxvars-test:celery:{RUN}:"
QUEUE = f"ctxvars-test-{RUN}"
SECRET = os.environ.get("CTXVARS_CELERY_SECRET") or secrets.token_urlsafe(32)
REDIS = "redis://127.0.0.1:6379/0"

app = Celery("ctxvars_tests", task_cls=ContextTask)
app.conf.update(
    broker_url=REDIS,
    result_backend=REDIS,
    broker_transport_options={"global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    accept_content=["json"],
    task_serializer="json",
    result_serializer="json",
    result_expires=600,
)
#: Every worker (and eager run) of this app claims each envelope once in the same Redis.
REPLAY_PREFIX = f"{PREFIX}envelope:"
app_replay_store = RedisReplayStore(REDIS, prefix=REPLAY_PREFIX)
install(app, secret=SECRET, replay_store=app_replay_store)


@app.task
def whoami() -> dict[str, Any] | None:
    """The context the task body runs in, as a dict (None outside any context)."""
    ctx = get_context_or_none()
    return None if ctx is None else ctx.to_dict()


@app.task
def relay() -> str:
    """Publish ``whoami`` from inside the worker; return its task id (the second hop)."""
    return str(whoami.delay().id)


log = logging.getLogger("ctxvars_tests.celery")
#: Each record as JSON: the message (the tests' markers and names, no quotes) and the ids.
LOG_FORMAT = (
    '{"message": "%(message)s", "request_id": "%(request_id)s", '
    '"parent_request_id": "%(parent_request_id)s", "correlation_id": "%(correlation_id)s", '
    '"user_id": "%(user_id)s"}'
)


def log_to(path: str) -> logging.Handler:
    """Send this module's records to ``path`` as JSON lines, through ContextLogFilter."""
    handler = logging.FileHandler(path)
    handler.addFilter(ContextLogFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


if os.environ.get("CTXVARS_CELERY_TASK_LOG"):
    log_to(os.environ["CTXVARS_CELERY_TASK_LOG"])


def _ids() -> dict[str, Any]:
    ctx = get_context()
    return {
        "request_id": ctx.request_id,
        "parent_request_id": ctx.parent_request_id,
        "correlation_id": ctx.correlation_id,
        "user_id": ctx.user_id,
        "is_authenticated": ctx.is_authenticated,
        "permissions": sorted(ctx.permissions),
    }


@app.task
def hop(remaining: int, marker: str) -> dict[str, Any]:
    """Log a line, publish the next hop while ``remaining`` > 0; return this hop's ids and the
    next hop's task id (None at the end of the chain)."""
    log.info("hop %s %d", marker, remaining)
    following = hop.delay(remaining - 1, marker).id if remaining > 0 else None
    return {**_ids(), "next": following}


@app.task
def step(previous: list[dict[str, Any]] | None, marker: str) -> list[dict[str, Any]]:
    """A link of a Celery ``chain``: the ids of the links before, then this one's."""
    log.info("step %s", marker)
    return [*(previous or []), _ids()]


@app.task
def fail(marker: str) -> None:
    """Log a line and fail, for a ``link_error`` callback to run."""
    log.info("fail %s", marker)
    raise ValueError("this task fails")


@app.task
def on_failure(request: Any, exc: Any, traceback: Any, marker: str) -> None:
    """An errback: log a line with the context it runs in."""
    log.info("errback %s", marker)


@app.task(bind=True, max_retries=3, default_retry_delay=0)
def flaky(self: ContextTask, failures: int, marker: str) -> dict[str, Any]:
    """Log each attempt; retry until ``failures`` attempts have failed, then return the ids."""
    log.info("attempt %s %d", marker, self.request.retries)
    if self.request.retries < failures:
        raise self.retry(countdown=0)
    return _ids()


@app.task
@requires_permission("agents:execute")
def needs_permission() -> str:
    """Return the user id, for a context that holds ``agents:execute`` (CTX does, via ``*``)."""
    return get_context().user_id
