"""Put the current context's ids on log records (stdlib ``logging`` and structlog).

Three ways in, pick one:

* :class:`ContextLogFilter` — a filter for your handlers, usable by dotted path in
  ``dictConfig``: ``"filters": {"ctx": {"()": "ctxvars_mw.logging.ContextLogFilter"}}``.
* :func:`install_record_factory` — chains a ``LogRecordFactory`` so *every* record (uvicorn's,
  third-party libraries', records handled by handlers you do not configure) carries the ids.
* :func:`structlog_processor` — a structlog processor that adds the ids to the event dict.

The fields are ``request_id``, ``parent_request_id``, ``correlation_id``, ``user_id``, ``tier``
and ``operation_depth``. For stdlib records they hold ``"-"`` outside a request, and
``parent_request_id`` holds it too in a context that has no parent (a request; a child context
or a Celery task has one). Only ids are added: never a token, claim, session id or metadata value.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

from .current import get_context_or_none
from .errors import ConfigurationError

__all__ = [
    "CONTEXT_FIELDS",
    "ContextLogFilter",
    "install_record_factory",
    "structlog_processor",
    "uninstall_record_factory",
]

#: The record attributes this module sets.
CONTEXT_FIELDS = (
    "request_id",
    "parent_request_id",
    "correlation_id",
    "user_id",
    "tier",
    "operation_depth",
)


def _annotate(record: logging.LogRecord, default: str = "-", id_length: int | None = None) -> None:
    ctx = get_context_or_none()
    if ctx is None:
        record.request_id = record.parent_request_id = record.correlation_id = default
        record.user_id = record.tier = record.operation_depth = default
    else:
        parent = ctx.parent_request_id
        record.request_id = ctx.request_id[:id_length]
        record.parent_request_id = default if parent is None else parent[:id_length]
        record.correlation_id = ctx.correlation_id[:id_length]
        record.user_id = ctx.user_id
        record.tier = ctx.tier.value
        record.operation_depth = ctx.operation_depth


class ContextLogFilter(logging.Filter):
    """A logging filter that adds the current context's ids to each record (never drops one).

    ``default_value`` (``"-"``) is what the fields hold outside a request (and
    ``parent_request_id`` in a context without a parent); ``id_length`` (None: whole ids)
    shortens ``request_id``, ``parent_request_id`` and ``correlation_id`` for compact log lines.
    Both can be given in ``dictConfig`` next to ``"()"``. Values already set on the record
    (by the record factory, say) are kept.
    """

    def __init__(
        self, name: str = "", *, default_value: str = "-", id_length: int | None = None
    ) -> None:
        super().__init__(name)
        if not isinstance(default_value, str):
            raise ConfigurationError("default_value must be a string")
        if id_length is not None and (
            isinstance(id_length, bool) or not isinstance(id_length, int) or id_length < 1
        ):
            raise ConfigurationError("id_length must be a positive int or None")
        self.default_value = default_value
        self.id_length = id_length

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; always keep it."""
        if not hasattr(record, "request_id"):
            _annotate(record, self.default_value, self.id_length)
        return True


RecordFactory = Callable[..., logging.LogRecord]


class _ContextRecordFactory:
    """Wraps the previous factory; annotates each record it returns while ``active``."""

    __slots__ = ("active", "previous")

    def __init__(self, previous: RecordFactory) -> None:
        self.previous = previous
        self.active = True

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        if self.active:
            _annotate(record)
        return record


_factory_lock = threading.Lock()
_installed: _ContextRecordFactory | None = None


def install_record_factory() -> None:
    """Chain a ``LogRecordFactory`` that adds the context's ids to every record.

    The factory that was installed before (the stdlib's, OpenTelemetry's, …) still builds the
    record; ours only adds the fields. Calling this twice installs it once. Because logging
    refuses to let ``extra=`` overwrite an existing record attribute, code that passes one of
    :data:`CONTEXT_FIELDS` in ``extra=`` raises ``KeyError`` while the factory is installed;
    use :class:`ContextLogFilter` instead where that matters. The library's own records (the
    ``ctxvars_mw.audit`` denials included) never pass these names in ``extra=``.
    """
    global _installed
    with _factory_lock:
        if _installed is not None:
            return
        _installed = _ContextRecordFactory(logging.getLogRecordFactory())
        logging.setLogRecordFactory(_installed)


def uninstall_record_factory() -> None:
    """Undo :func:`install_record_factory` (a no-op when it is not installed).

    When another factory was chained on top of ours since, ours cannot be unlinked without
    breaking that one; it is switched off instead and only passes records through.
    """
    global _installed
    with _factory_lock:
        ours = _installed
        if ours is None:
            return
        _installed = None
        if logging.getLogRecordFactory() is ours:
            logging.setLogRecordFactory(ours.previous)
        else:
            ours.active = False


def structlog_processor(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: add the current context's ids to the event dict.

    Outside a request it adds nothing; ``parent_request_id`` is None in a context without a
    parent. Keys the event already has are kept. structlog itself
    is not imported (processors are plain callables), so this works with the ``structlog``
    extra installed or not::

        structlog.configure(processors=[structlog_processor, structlog.processors.JSONRenderer()])
    """
    ctx = get_context_or_none()
    if ctx is not None:
        setdefault = event_dict.setdefault
        setdefault("request_id", ctx.request_id)
        setdefault("parent_request_id", ctx.parent_request_id)
        setdefault("correlation_id", ctx.correlation_id)
        setdefault("user_id", ctx.user_id)
        setdefault("tier", ctx.tier.value)
        setdefault("operation_depth", ctx.operation_depth)
    return event_dict
