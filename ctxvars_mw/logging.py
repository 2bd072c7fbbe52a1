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

The request's metadata (:data:`~ctxvars_mw.request_metadata.REQUEST_METADATA_FIELDS`:
``client_ip``, ``user_agent``, ``method``, ``path``) is added only where asked for, with
``request_metadata=`` naming the fields, on each of the three: a client's address is personal
data, and ``path`` or ``method`` are names code may already pass in ``extra=``. Those values
were sanitised by the middleware (no control characters, bounded), so they cannot break a log
line either; a field the context does not hold shows ``default_value`` (``"-"``) on stdlib
records and ``None`` in structlog's event dict.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

from .current import get_context_or_none
from .errors import ConfigurationError
from .request_metadata import REQUEST_METADATA_FIELDS, check_metadata_names

__all__ = [
    "CONTEXT_FIELDS",
    "REQUEST_METADATA_FIELDS",
    "ContextLogFilter",
    "StructlogProcessor",
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


def _annotate_metadata(record: logging.LogRecord, fields: tuple[str, ...], default: str) -> None:
    ctx = get_context_or_none()
    for name in fields:
        value = None if ctx is None else getattr(ctx, name)
        setattr(record, name, default if value is None else value)


class ContextLogFilter(logging.Filter):
    """A logging filter that adds the current context's ids to each record (never drops one).

    ``default_value`` (``"-"``) is what the fields hold outside a request (and
    ``parent_request_id`` in a context without a parent); ``id_length`` (None: whole ids)
    shortens ``request_id``, ``parent_request_id`` and ``correlation_id`` for compact log lines;
    ``request_metadata`` (none by default) names the request metadata fields to add as well.
    Each can be given in ``dictConfig`` next to ``"()"``. Values already set on the record
    (by the record factory, say) are kept.
    """

    def __init__(
        self,
        name: str = "",
        *,
        default_value: str = "-",
        id_length: int | None = None,
        request_metadata: Iterable[str] = (),
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
        self.request_metadata = check_metadata_names("request_metadata", request_metadata)

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; always keep it."""
        if not hasattr(record, "request_id"):
            _annotate(record, self.default_value, self.id_length)
        fields = self.request_metadata
        if fields and not hasattr(record, fields[0]):
            _annotate_metadata(record, fields, self.default_value)
        return True


RecordFactory = Callable[..., logging.LogRecord]


class _ContextRecordFactory:
    """Wraps the previous factory; annotates each record it returns while ``active``."""

    __slots__ = ("active", "fields", "previous")

    def __init__(self, previous: RecordFactory, fields: tuple[str, ...]) -> None:
        self.previous = previous
        self.fields = fields  # the request metadata fields added too
        self.active = True

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        if self.active:
            _annotate(record)
            if self.fields:
                _annotate_metadata(record, self.fields, "-")
        return record


_factory_lock = threading.Lock()
_installed: _ContextRecordFactory | None = None


def install_record_factory(*, request_metadata: Iterable[str] = ()) -> None:
    """Chain a ``LogRecordFactory`` that adds the context's ids to every record, and the
    request metadata fields named in ``request_metadata`` (none by default).

    The factory that was installed before (the stdlib's, OpenTelemetry's, …) still builds the
    record; ours only adds the fields. Calling this twice installs it once; the later call's
    ``request_metadata`` is the one that applies. Because logging
    refuses to let ``extra=`` overwrite an existing record attribute, code that passes one of
    :data:`CONTEXT_FIELDS` in ``extra=`` raises ``KeyError`` while the factory is installed;
    use :class:`ContextLogFilter` instead where that matters. The library's own records (the
    ``ctxvars_mw.audit`` denials included) never pass these names in ``extra=``.
    """
    global _installed
    fields = check_metadata_names("request_metadata", request_metadata)
    with _factory_lock:
        if _installed is not None:
            _installed.fields = fields
            return
        _installed = _ContextRecordFactory(logging.getLogRecordFactory(), fields)
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


class StructlogProcessor:
    """A structlog processor: add the current context's ids to the event dict, and the
    request metadata fields named in ``request_metadata`` (none by default).

    Outside a request it adds nothing; ``parent_request_id`` (like a metadata field the
    context does not hold) is None in a context without a parent. Keys the event already has
    are kept. structlog itself is not imported (processors are plain callables), so this works
    with the ``structlog`` extra installed or not::

        structlog.configure(processors=[
            StructlogProcessor(request_metadata=["client_ip", "path"]),
            structlog.processors.JSONRenderer(),
        ])

    :data:`structlog_processor` is the one that adds the ids only.
    """

    __slots__ = ("request_metadata",)

    def __init__(self, *, request_metadata: Iterable[str] = ()) -> None:
        self.request_metadata = check_metadata_names("request_metadata", request_metadata)

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Add the fields to ``event_dict`` (inside a request) and return it."""
        ctx = get_context_or_none()
        if ctx is not None:
            setdefault = event_dict.setdefault
            setdefault("request_id", ctx.request_id)
            setdefault("parent_request_id", ctx.parent_request_id)
            setdefault("correlation_id", ctx.correlation_id)
            setdefault("user_id", ctx.user_id)
            setdefault("tier", ctx.tier.value)
            setdefault("operation_depth", ctx.operation_depth)
            for name in self.request_metadata:
                setdefault(name, getattr(ctx, name))
        return event_dict


#: The structlog processor that adds the context's ids (see :class:`StructlogProcessor`)::
#:
#:     structlog.configure(processors=[structlog_processor, structlog.processors.JSONRenderer()])
structlog_processor = StructlogProcessor()
