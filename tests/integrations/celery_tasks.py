"""Celery tasks for the integration tests, run by a real worker subprocess.

The broker and result backend are the local Redis, under a key prefix and queue name unique to
this test run (chosen at import, or passed to the worker through the environment), so runs never
see each other's messages and every key can be deleted afterwards.
"""

from __future__ import annotations

import os
import secrets
import uuid
from typing import Any

from celery import Celery

from ctxvars_mw import get_context_or_none
from ctxvars_mw.envelope import RedisReplayStore
from ctxvars_mw.integrations.celery import ContextTask, install

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
