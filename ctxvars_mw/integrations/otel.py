"""OpenTelemetry: keep the context's trace id and the active span's trace id the same.

Two small pieces (extra ``otel``: only ``opentelemetry-api`` is needed; the SDK, exporters and
instrumentations are yours to choose):

* :class:`SpanTraceMiddleware` — ASGI middleware for inside ``ContextMiddleware``. When a span
  is active for the request (started by OpenTelemetry's ASGI instrumentation, or by you) and the
  context's ``trace_id`` differs — no ``traceparent`` came in, or the instrumentation started a
  new trace — the request runs with a context whose ``trace_id`` and ``trace_flags`` are the
  span's (set and reset with a token). Log lines, envelopes and outgoing calls then name the
  trace your spans are in.
* :func:`install` — makes :func:`ctxvars_mw.propagation.outgoing_headers` (and so the httpx
  transports) send the active span's trace id, its span id as the parent id, its sampled flag
  and its ``tracestate``, so downstream spans become children of yours. Without an active span
  the usual per-hop parent id is used.

Placement::

    app = ContextMiddleware(SpanTraceMiddleware(app))
    app = OpenTelemetryMiddleware(app)      # opentelemetry-instrumentation-asgi, outermost
    install()
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import format_span_id, format_trace_id

from .. import propagation
from ..current import get_context_or_none, reset_frame, set_context
from ..types import ASGIApp, Receive, Scope, Send

__all__ = ["SpanTraceMiddleware", "current_span_ids", "install", "uninstall"]


def current_span_ids() -> tuple[str, str, str, str | None] | None:
    """``(trace_id, span_id, flags, tracestate)`` of the active span, as W3C hex strings.

    None when no valid span is active. ``tracestate`` is None when the span has none.
    """
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    state = span_context.trace_state.to_header() if span_context.trace_state else None
    return (
        format_trace_id(span_context.trace_id),
        format_span_id(span_context.span_id),
        f"{span_context.trace_flags:02x}",
        state or None,
    )


def current_trace_id() -> str | None:
    """The active span's trace id (32 lowercase hex characters), or None."""
    span_trace = _current_trace()
    return None if span_trace is None else span_trace[0]


def _current_trace() -> tuple[str, int] | None:
    """The active span's ``(trace id, trace flags)``, or None."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format_trace_id(span_context.trace_id), int(span_context.trace_flags)


def install() -> None:
    """Make outgoing headers use the active span's ids (idempotent)."""
    propagation.set_span_source(current_span_ids)


def uninstall() -> None:
    """Undo :func:`install`: outgoing headers go back to the context's own trace id."""
    propagation.set_span_source(None)


class SpanTraceMiddleware:
    """ASGI middleware: the request's context takes the active span's trace id.

    Place it inside ``ContextMiddleware`` (which builds the context) and inside whatever starts
    the server span. Scopes without a context or without an active span pass through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context_or_none()
        span_trace = _current_trace() if ctx is not None else None
        if ctx is None or span_trace is None or ctx.trace_id == span_trace[0]:
            await self.app(scope, receive, send)
            return
        trace_id, flags = span_trace
        token = set_context(ctx.replace(trace_id=trace_id, trace_flags=flags))
        try:
            await self.app(scope, receive, send)
        finally:
            reset_frame(token)
