"""Celery: tasks published inside a request run, on the worker, inside that request's context.

Set up once per app::

    from ctxvars_mw.integrations.celery import ContextTask, install

    app = Celery("proj", task_cls=ContextTask)
    install(app, secret=settings.CTXVARS_ENVELOPE_SECRET)   # >= 32 bytes, same on every host

* **Publishing.** A ``before_task_publish`` signal handler signs the current context with
  :func:`ctxvars_mw.envelope.dumps` and puts it in the message headers (``ctxvars_envelope``).
  A signal catches every way a task is sent (``delay``, ``apply_async``, ``send_task``, canvas
  primitives, retries), even from a process that does not import the task.
* **Publishing outside a context** (a script, a beat schedule, a worker's start-up code) signs
  a fresh :meth:`~ctxvars_mw.UserExecutionContext.anonymous` context instead: user
  ``"anonymous"``, ``is_authenticated`` False, tier FREE, no roles, permissions, scopes or
  features, and new ids, its ``correlation_id`` included. The task and every task it publishes
  share that correlation id, so their logs correlate, and none of them holds any right. An
  envelope the publisher put in ``headers=`` itself is kept in that case.
* **Running.** :class:`ContextTask` (the app's task base class) verifies the envelope with
  :func:`ctxvars_mw.envelope.loads` and runs the task body in a child of the envelope's context
  (see :func:`task_context`): a new ``request_id``, ``parent_request_id`` the publisher's
  ``request_id``, the same ``correlation_id`` and user. The context stays current while Celery
  publishes the task's callbacks and the rest of its chain, then is reset with its token
  (``task_postrun``), so nothing leaks into the next task on the same worker process or
  thread. A tampered, wrong-secret or expired envelope fails the task with
  ``InvalidTokenError``/``ExpiredTokenError`` before the body runs (a signal handler could not
  fail it: Celery logs and swallows errors raised by signal receivers). A task publishes its
  own sub-tasks (and Celery its ``chain`` successors) in its context, so a chain ``request →
  task → task`` has one correlation id and each hop's ``parent_request_id`` is the previous
  hop's ``request_id``. A message without an envelope (published by a process that did not
  call :func:`install`) runs without a context.
* **Retries.** ``self.retry()`` re-publishes the task in its *publisher's* context, not in the
  failed attempt's: every attempt is a sibling, with a ``request_id`` of its own and the same
  ``parent_request_id`` and ``correlation_id`` as the first (Celery keeps the task id).
* **Eager mode** (``task_always_eager``, ``task.apply()``): no message is published, so
  :class:`ContextTask` signs the caller's context (or an anonymous one) into the request
  headers itself; the task runs in a child of the envelope's context exactly as on a worker,
  and the caller's context is untouched after.

``expires_in`` (default one hour) bounds how long a queued task may wait: a task that starts
later fails with ``ExpiredTokenError`` — raise it for tasks scheduled far ahead (``eta``).
``leeway`` (default :data:`~ctxvars_mw.envelope.DEFAULT_LEEWAY`, 5 s) is the clock skew tolerated
past that.

**Each message runs once** with ``install(app, ..., replay_store=RedisReplayStore(url))``: the
worker claims the envelope's id before the body runs, so a message delivered twice (a broker
redelivery after a lost ack, a copied message, a replayed capture) fails the second time with
``InvalidTokenError`` instead of running again in the user's context. A retry (``self.retry()``)
publishes a new message with a new envelope, so retries still run. With ``acks_late``, a worker
that dies mid-task leaves a redelivery that is refused: the store makes tasks at most once.

A message whose envelope header is present but not a string fails the task with
``InvalidTokenError``: it never runs without a context it was meant to have.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery, Task, current_app
from celery.signals import before_task_publish, task_postrun

from ..context import UserExecutionContext, evolve
from ..current import FrameToken, get_context_or_none, reset_frame, set_context
from ..envelope import (
    DEFAULT_LEEWAY,
    ReplayStore,
    Secret,
    _key,
    _seconds,
    dumps,
    leeway_seconds,
    loads,
)
from ..errors import ConfigurationError, InvalidTokenError
from ..ids import generate_id

__all__ = ["ENVELOPE_HEADER", "ContextTask", "install", "task_context"]

#: The message header that carries the signed context.
ENVELOPE_HEADER = "ctxvars_envelope"

# The envelope's context of the task attempt running in this thread (its publisher's), for
# retry() to re-publish with.
_publisher: ContextVar[UserExecutionContext | None] = ContextVar(
    "ctxvars_mw.celery.publisher", default=None
)
_Tokens = tuple[FrameToken, Token[UserExecutionContext | None]]
# The task runs of this thread whose context is still current, innermost last, with the tokens
# that restore what was current before them (see ContextTask.__call__).
_finishing: ContextVar[tuple[tuple[str, _Tokens], ...]] = ContextVar(
    "ctxvars_mw.celery.finishing", default=()
)


@dataclass(frozen=True, slots=True)
class _Settings:
    secret: Secret
    secrets: tuple[Secret, ...]
    expires_in: int
    leeway: float
    replay_store: ReplayStore | None


_settings: weakref.WeakKeyDictionary[Any, _Settings] = weakref.WeakKeyDictionary()


def install(
    app: Celery,
    *,
    secret: Secret,
    expires_in: float | timedelta = 3600,
    previous_secrets: Sequence[Secret] = (),
    leeway: float | timedelta = DEFAULT_LEEWAY,
    replay_store: ReplayStore | None = None,
) -> None:
    """Carry the context through ``app``'s tasks, signing envelopes with ``secret``.

    ``previous_secrets`` are still accepted when verifying (for rotation). ``leeway`` is the
    clock skew tolerated past an envelope's expiry. With ``replay_store`` (a
    :class:`~ctxvars_mw.envelope.RedisReplayStore` shared by the workers) each message's
    envelope is accepted once. The app must be created with ``task_cls=ContextTask`` (or a
    subclass). Calling it again replaces the settings.
    """
    if not issubclass(app.Task, ContextTask):
        raise ConfigurationError(
            "create the Celery app with task_cls=ContextTask "
            "(ctxvars_mw.integrations.celery:ContextTask) before calling install()"
        )
    if isinstance(previous_secrets, (str, bytes)):
        raise ConfigurationError("previous_secrets must be a sequence of secrets")
    for value in (secret, *previous_secrets):
        _key(value)
    if replay_store is not None and not isinstance(replay_store, ReplayStore):
        raise ConfigurationError("replay_store must have a claim(jti, ttl) method")
    _settings[app] = _Settings(
        secret,
        (secret, *previous_secrets),
        _seconds(expires_in),
        leeway_seconds(leeway),
        replay_store,
    )
    before_task_publish.connect(_attach_envelope, weak=False, dispatch_uid=__name__)
    task_postrun.connect(_end_task_context, weak=False, dispatch_uid=__name__)


def _publishing_settings() -> _Settings | None:
    """The settings of the app that publishes (Celery's signal does not name the app)."""
    found = _settings.get(current_app._get_current_object())
    if found is None and len(_settings) == 1:
        found = next(iter(_settings.values()))
    return found


def _attach_envelope(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish`` receiver: sign the publishing context into the message headers."""
    settings = _publishing_settings()
    if headers is None or settings is None:
        return
    ctx = get_context_or_none()
    if ctx is None:
        if ENVELOPE_HEADER in headers:  # set by the publisher in headers=
            return
        ctx = UserExecutionContext.anonymous()
    headers[ENVELOPE_HEADER] = _sign(ctx, settings)


def _sign(ctx: UserExecutionContext, settings: _Settings) -> str:
    return dumps(ctx, settings.secret, expires_in=settings.expires_in)


def task_context(publisher: UserExecutionContext) -> UserExecutionContext:
    """The context a task body runs in: a child of its ``publisher``'s context.

    A new ``request_id``, ``parent_request_id`` set to the publisher's ``request_id`` and
    ``created_at`` set to now; everything else is the publisher's: the user and their rights,
    ``correlation_id``, ``thread_id``/``run_id``, ``trace_id``, ``websocket_client_id`` (so a
    task can still address the client whose request published it), the metadata and the
    request's ``client_ip``, ``user_agent``, ``method`` and ``path``.

    This is narrower than :meth:`~ctxvars_mw.UserExecutionContext.child`, which also names an
    operation and counts one level of ``operation_depth`` towards its limit of
    :data:`~ctxvars_mw.context.MAX_OPERATION_DEPTH`: a task is the same operation carried on
    elsewhere, and a chain of tasks (a task that re-schedules itself, a paginated crawl) may be
    longer than ten hops. ``operation`` and ``operation_depth`` are kept as published.
    """
    return evolve(
        publisher,
        request_id=generate_id(),
        parent_request_id=publisher.request_id,
        created_at=datetime.now(UTC),
    )


def _end_task_context(task_id: str | None = None, **_: Any) -> None:
    """``task_postrun`` receiver: restore what was current before the task's context."""
    running = _finishing.get()
    if running and running[-1][0] == task_id:
        _finishing.set(running[:-1])
        frame, publisher = running[-1][1]
        _publisher.reset(publisher)
        reset_frame(frame)


def _envelope_of(request: Any) -> str | None:
    """The message's envelope; None when it has none; InvalidTokenError when it is not a str."""
    value = getattr(request, ENVELOPE_HEADER, None)
    if value is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, dict):
            value = headers.get(ENVELOPE_HEADER)
    if value is None or isinstance(value, str):
        return value
    raise InvalidTokenError("The task's context envelope is malformed.")


class ContextTask(Task):  # type: ignore[misc]
    """A Celery task base class that runs the task body in the publisher's context."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Make a child of the envelope's context (if there is one) current, and run the task.

        The context stays current after the body returns, until Celery has finished with the
        task (``task_postrun``): the callbacks, the rest of a ``chain`` and the errbacks that
        Celery publishes after the body are children of the task, as the sub-tasks it
        publishes itself are. Then what was current before is restored.
        """
        envelope = _envelope_of(self.request)
        if envelope is None:
            return super().__call__(*args, **kwargs)
        settings = self._ctxvars_settings()
        publisher = loads(
            envelope, settings.secrets, leeway=settings.leeway, replay_store=settings.replay_store
        )
        tokens = (set_context(task_context(publisher)), _publisher.set(publisher))
        _finishing.set((*_finishing.get(), (self.request.id, tokens)))
        return super().__call__(*args, **kwargs)

    def _ctxvars_settings(self) -> _Settings:
        settings = _settings.get(self._get_app())
        if settings is None:
            raise ConfigurationError("ctxvars_mw.integrations.celery.install() was not called")
        return settings

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Re-publish the task in its publisher's context, so the next attempt is a sibling of
        this one (same ``parent_request_id`` and ``correlation_id``, a new ``request_id``)."""
        publisher = _publisher.get()
        if publisher is None:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        # The envelope goes in the headers for an eager retry (applied after this attempt has
        # returned, in the caller's context); a worker's publish signs the context set here.
        headers = options.pop("headers", None) or self.request.headers or {}
        headers = {**headers, ENVELOPE_HEADER: _sign(publisher, self._ctxvars_settings())}
        frame = set_context(publisher)
        try:
            return super().retry(
                args, kwargs, exc, throw, eta, countdown, max_retries, headers=headers, **options
            )
        finally:
            reset_frame(frame)

    def apply(
        self,
        args: Any = None,
        kwargs: Any = None,
        link: Any = None,
        link_error: Any = None,
        task_id: str | None = None,
        retries: int | None = None,
        throw: bool | None = None,
        logfile: Any = None,
        loglevel: Any = None,
        headers: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Run eagerly; the envelope of the caller's context (or of an anonymous one, outside
        any context) goes in the request headers."""
        settings = _settings.get(self._get_app())
        if settings is not None and ENVELOPE_HEADER not in (headers or {}):
            ctx = get_context_or_none() or UserExecutionContext.anonymous()
            headers = {**(headers or {}), ENVELOPE_HEADER: _sign(ctx, settings)}
        return super().apply(
            args, kwargs, link, link_error, task_id, retries, throw, logfile, loglevel,
            headers=headers, **options,
        )  # fmt: skip
