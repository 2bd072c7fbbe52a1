"""OpenTelemetry: the context's trace id agrees with the active span's (real SDK tracer)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ctxvars_mw import (
    ContextMiddleware,
    ContextThreadPoolExecutor,
    UserExecutionContext,
    get_context,
    use_context,
)
from ctxvars_mw.integrations.otel import SpanTraceMiddleware, current_span_ids, install, uninstall
from ctxvars_mw.propagation import AsyncContextTransport, outgoing_headers
from ctxvars_mw.types import ASGIApp, Receive, Scope, Send
from ctxvars_mw.w3c import parse_traceparent
from tests.integrations import echo_app

tracer = TracerProvider().get_tracer("ctxvars_mw.tests")
CTX = UserExecutionContext(user_id="auth0|5f7c8ec7c33c6c004bbafe82")
INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def installed() -> Iterator[None]:
    """The OpenTelemetry span source, installed for one test."""
    install()
    try:
        yield
    finally:
        uninstall()


def test_current_span_ids_match_the_active_span() -> None:
    """No span: None; inside a span: its trace id, span id and flags (sampled, and the
    level-2 random bit OpenTelemetry sets)."""
    assert current_span_ids() is None
    with tracer.start_as_current_span("work") as span:
        ids = current_span_ids()
        sc = span.get_span_context()
    assert ids == (
        format_trace_id(sc.trace_id),
        format_span_id(sc.span_id),
        f"{sc.trace_flags:02x}",
        None,
    )
    assert int(ids[2], 16) & 1  # sampled


def test_outgoing_headers_use_the_active_span_once_installed(installed: None) -> None:
    """Downstream calls become children of the active span, not of a made-up parent id."""
    with use_context(CTX), tracer.start_as_current_span("call") as span:
        headers = outgoing_headers()
        sc = span.get_span_context()
    assert headers["traceparent"] == (
        f"00-{format_trace_id(sc.trace_id)}-{format_span_id(sc.span_id)}-{sc.trace_flags:02x}"
    )
    without_span = parse_traceparent(outgoing_headers(CTX)["traceparent"])
    assert without_span is not None
    assert without_span[0] != format_trace_id(sc.trace_id)


def test_outgoing_headers_ignore_spans_when_not_installed() -> None:
    """Without install(), an active span does not change the outgoing trace."""
    with tracer.start_as_current_span("call") as span:
        parsed = parse_traceparent(outgoing_headers(CTX)["traceparent"])
    assert parsed is not None
    assert parsed[0] != format_trace_id(span.get_span_context().trace_id)


def _server_span(app: ASGIApp) -> ASGIApp:
    """What OpenTelemetry's ASGI instrumentation does: extract traceparent, start a span."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        carrier = {k.decode(): v.decode() for k, v in scope["headers"]}
        parent = TraceContextTextMapPropagator().extract(carrier)
        with tracer.start_as_current_span("server", context=parent) as span:
            span_context = span.get_span_context()
            scope["state"] = {
                "span_trace_id": format_trace_id(span_context.trace_id),
                "span_flags": int(span_context.trace_flags),
            }
            await app(scope, receive, send)

    return wrapped


async def _report(scope: Scope, receive: Receive, send: Send) -> None:
    ctx, state = get_context(), scope["state"]
    body = {
        "ctx": ctx.trace_id,
        "span": state["span_trace_id"],
        "ctx_flags": ctx.trace_flags,
        "span_flags": state["span_flags"],
    }
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def _call(headers: dict[str, str]) -> dict[str, Any]:
    app = _server_span(ContextMiddleware(SpanTraceMiddleware(_report)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        return (await client.get("/", headers=headers)).json()  # type: ignore[no-any-return]


async def test_span_trace_middleware_gives_the_context_the_spans_trace_id() -> None:
    """With no incoming traceparent, the context takes the server span's new trace id and
    flags (the SDK's default sampler samples it)."""
    seen = await _call({})
    assert seen["ctx"] == seen["span"]
    assert seen["ctx_flags"] == seen["span_flags"]
    assert seen["ctx_flags"] & 0x01


async def test_incoming_traceparent_span_and_context_agree() -> None:
    """With an incoming traceparent, the span continues it and the context names it too."""
    seen = await _call({"traceparent": INCOMING})
    assert seen["ctx"] == seen["span"] == INCOMING.split("-")[1]


async def test_outgoing_call_to_a_downstream_service_continues_the_span(installed: None) -> None:
    """A downstream ContextMiddleware adopts the active span's trace id."""
    client = httpx.AsyncClient(
        transport=AsyncContextTransport(httpx.ASGITransport(echo_app.app)), base_url="http://down"
    )
    async with client, use_context(CTX):
        with tracer.start_as_current_span("client") as span:
            down = (await client.get("/context")).json()
    assert down["trace_id"] == format_trace_id(span.get_span_context().trace_id)


def test_the_active_span_crosses_into_executor_jobs() -> None:
    """ContextThreadPoolExecutor carries OpenTelemetry's context along with ours."""
    with (
        ContextThreadPoolExecutor(max_workers=1) as pool,
        tracer.start_as_current_span("s") as span,
    ):
        ids = pool.submit(current_span_ids).result(timeout=5)
    assert ids is not None
    assert ids[1] == format_span_id(span.get_span_context().span_id)


def test_the_spans_tracestate_goes_out_with_it(installed: None) -> None:
    """A span continuing an incoming trace forwards that trace's tracestate."""
    carrier = {"traceparent": INCOMING, "tracestate": "rojo=00f067aa0ba902b7"}
    parent = TraceContextTextMapPropagator().extract(carrier)
    with use_context(CTX), tracer.start_as_current_span("client", context=parent):
        headers = outgoing_headers()
    assert headers["tracestate"] == "rojo=00f067aa0ba902b7"
    assert headers["traceparent"].split("-")[1] == INCOMING.split("-")[1]
