"""Where the anonymous request's time goes: the middleware's path rebuilt one step at a time.

Each layer adds one step of ``ContextMiddleware.__call__`` (http, no authenticator) to the
previous one, using the middleware's own helpers, and the whole stack is timed against
bare Starlette in the same interleaved run; the last row is the real middleware. The
differences between consecutive rows are what each step costs. If the middleware's
private helpers change name, this section is skipped (``available()`` says why).
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from ctxvars_mw import ContextMiddleware
from ctxvars_mw.types import ASGIApp, Message, Receive, Scope, Send

from . import tokens
from .apps import bare_app
from .driver import http_scope, loop_factory, sequential

LAYERS = (
    "set + reset one ContextVar (the floor)",
    "+ scan the request headers",
    "+ accept the request and correlation ids",
    "+ parse traceparent",
    "+ build the UserExecutionContext",
    "+ wrap send to add the id headers",
    "+ cleanup stack, error handling",
)
RID, CID = b"x-request-id", b"x-correlation-id"


def available() -> str | None:
    """Why the breakdown cannot run against this version of the middleware, or None."""
    try:
        _helpers()
    except (ImportError, AttributeError) as exc:
        return f"middleware internals changed: {exc}"
    return None


def _anonymous_builder() -> Any:
    """Builds the anonymous context as the middleware does (its fast constructor, FREE)."""
    from ctxvars_mw import Policy, Tier
    from ctxvars_mw.context import ANONYMOUS_USER_ID, request_context
    from ctxvars_mw.frozen import EMPTY

    features = Policy.default().features_for_tier(Tier.FREE)
    none: frozenset[str] = frozenset()

    def build(ids: tuple[str, str], rid: str, cid: str, trace: str | None, ws: str | None) -> Any:
        return request_context(
            ANONYMOUS_USER_ID, ids[0], ids[1], rid, cid, trace, ws, None, Tier.FREE, none, none,
            features, EMPTY, None, False,
        )  # fmt: skip

    return build


def _helpers() -> dict[str, Any]:
    from ctxvars_mw import middleware as mw
    from ctxvars_mw import resources
    from ctxvars_mw.current import _current
    from ctxvars_mw.ids import generate_ids

    return {
        "accept": mw._accept_id,
        "trace": mw._trace_id,
        "with_ids": mw._with_ids,
        "generate_ids": generate_ids,
        "anonymous": _anonymous_builder(),
        "var": _current,
        "open_stack": resources.open_stack,
        "close_stack": resources.close_stack,
        "cleanups": resources.run_cleanups,
    }


class Layer:
    """The anonymous http path of ContextMiddleware up to step ``level`` (0-based)."""

    def __init__(self, app: ASGIApp, level: int) -> None:
        self.app, self.level, self.h = app, level, _helpers()

    def _ids(self, scope: Scope) -> tuple[str, str, str | None]:
        raw_rid = raw_cid = raw_trace = None
        if self.level >= 1:
            for name, value in scope["headers"]:
                if name == RID:
                    raw_rid = value if raw_rid is None else b""
                elif name == CID:
                    raw_cid = value if raw_cid is None else b""
                elif name == b"traceparent":
                    raw_trace = value if raw_trace is None else b""
        rid = cid = "0123456789abcdef01234567"
        if self.level >= 2:
            rid = (self.h["accept"](raw_rid, "request") if raw_rid is not None else None) or rid
            cid = (self.h["accept"](raw_cid, "correlation") if raw_cid is not None else None) or rid
        trace = None
        if self.level >= 3 and raw_trace is not None:
            trace = self.h["trace"](raw_trace)
        return rid, cid, trace

    def _context(self, rid: str, cid: str, trace: str | None) -> Any:
        thread_id, run_id, _ = self.h["generate_ids"]()  # as the middleware draws them
        return self.h["anonymous"]((thread_id, run_id), rid, cid, trace, None)

    def _send(self, send: Send, rid: str, cid: str) -> Send:
        rid_value = rid.encode("ascii")
        id_headers = [(RID, rid_value), (CID, rid_value if cid is rid else cid.encode())]
        with_ids = self.h["with_ids"]
        started = False

        async def send_with_ids(message: Message) -> None:
            nonlocal started
            if not started and message["type"] == "http.response.start":
                started = True
                message["headers"] = with_ids(message.get("headers", ()), id_headers)
            await send(message)

        return send_with_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid, cid, trace = self._ids(scope)
        ctx = self._context(rid, cid, trace) if self.level >= 4 else None
        inner = self._send(send, rid, cid) if self.level >= 5 else send
        var = self.h["var"]
        if self.level < 6:
            token = var.set(ctx)
            try:
                await self.app(scope, receive, inner)
            finally:
                var.reset(token)
            return
        stack, stack_token = self.h["open_stack"]()
        token = var.set(ctx)
        try:
            await self.app(scope, receive, inner)
        finally:
            try:
                if stack:
                    await self.h["cleanups"](stack)
            finally:
                var.reset(token)
                self.h["close_stack"](stack, stack_token)


async def _main(n: int, repeats: int) -> dict[str, Any]:
    templates = [http_scope(tokens.mint("HS256", unique=False))]
    apps: dict[str, Any] = {"bare Starlette": bare_app()}
    apps.update({name: Layer(bare_app(), i) for i, name in enumerate(LAYERS)})
    apps["ContextMiddleware (real)"] = ContextMiddleware(bare_app())
    samples: dict[str, list[float]] = {name: [] for name in apps}
    for app in apps.values():
        await sequential(app, templates, min(n, 300))
    for _ in range(repeats):
        for name, app in apps.items():
            samples[name].append((await sequential(app, templates, n))[0])
    bare = samples["bare Starlette"]
    return {
        name: statistics.median([v - b for v, b in zip(values, bare, strict=True)])
        for name, values in samples.items()
    }


def run(*, n: int, repeats: int) -> dict[str, Any]:
    """Median Δ over bare Starlette (CPU µs/request, sequential) of every layer."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        deltas = runner.run(_main(n, repeats))
    return {"config": {"n": n, "repeats": repeats}, "delta_us": deltas}


def section(result: dict[str, Any]) -> list[str]:
    """The report's Markdown section."""
    c = result["config"]
    lines = [
        "## Where the anonymous request's time goes",
        "",
        f"The middleware's http path rebuilt step by step from its own helpers "
        f"(`bench/breakdown.py`), {c['n']} sequential requests x {c['repeats']} interleaved "
        "repeats; CPU µs per request over bare Starlette (median of paired differences).",
        "",
        "| layer | Δ over bare µs | this step µs |",
        "|---|---|---|",
    ]
    previous = 0.0
    for name, delta in result["delta_us"].items():
        if name == "bare Starlette":
            continue
        step = "" if name.endswith("(real)") else f"{delta - previous:.2f}"
        lines.append(f"| {name} | {delta:.2f} | {step} |")
        previous = delta
    return [*lines, ""]
