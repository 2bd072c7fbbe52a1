"""Where the anonymous request's time goes: the middleware's path rebuilt one step at a time.

Each layer adds one step of ``ContextMiddleware.__call__``'s pure-Python path (http, no
authenticator) to the previous one, using the middleware's own helpers, and the whole stack
is timed against bare Starlette in the same interleaved run; the last rows are the real
middleware, on its pure-Python path and (when built) on the C accelerator that runs the same
steps. The differences between consecutive rows are what each step costs in Python. If the
middleware's private helpers change name, this section is skipped (``available()`` says
why).
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from ctxvars_mw import ContextMiddleware
from ctxvars_mw.types import ASGIApp, Message, Receive, Scope, Send

from . import tokens
from .apps import bare_app, pure_python
from .driver import http_scope, loop_factory, sequential

LAYERS = (
    "set + reset one ContextVar (the floor)",
    "+ scan the request headers",
    "+ accept the request and correlation ids",
    "+ the pending context (built on first read)",
    "+ wrap send to add the id headers",
    "+ cleanup list, error handling",
)
RID, CID = b"x-request-id", b"x-correlation-id"


def available() -> str | None:
    """Why the breakdown cannot run against this version of the middleware, or None."""
    try:
        _helpers()
    except (ImportError, AttributeError) as exc:
        return f"middleware internals changed: {exc}"
    return None


def _helpers() -> dict[str, Any]:
    from ctxvars_mw import Policy, Tier, resources
    from ctxvars_mw import middleware as mw
    from ctxvars_mw.current import _current
    from ctxvars_mw.ids import HEADER_ID_CHARS, HEADER_ID_MAX, get_id_rules

    return {
        "accept": mw._accept_id,
        "rules": get_id_rules,
        "chars": HEADER_ID_CHARS,
        "longest": HEADER_ID_MAX,
        "build": mw._request_context,
        "features": Policy.default().features_for_tier(Tier.FREE),
        "with_ids": mw._with_ids,
        "var": _current,
        "closed": resources._closed,
        "cleanups": resources.run_cleanups,
    }


class Layer:
    """The anonymous http path of ContextMiddleware up to step ``level`` (0-based)."""

    def __init__(self, app: ASGIApp, level: int) -> None:
        self.app, self.level, self.h = app, level, _helpers()

    def _ids(self, scope: Scope) -> tuple[str, str, bytes | None]:
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
            rules = self.h["rules"]()
            rid = self._accept(raw_rid, rules, "request") or rid
            cid = self._accept(raw_cid, rules, "correlation") or rid
        return rid, cid, raw_trace

    def _accept(self, raw: bytes | None, rules: Any, kind: str) -> str | None:
        if raw is None:
            return None
        longest = self.h["longest"]
        if rules._safe_length <= len(raw) <= longest and not raw.translate(None, self.h["chars"]):
            return raw.decode("ascii")
        return self.h["accept"](raw, kind, rules)  # type: ignore[no-any-return]

    def _pending(self, rid: str, cid: str, trace: bytes | None) -> Any:
        return [None, self.h["build"], (None, frozenset(), self.h["features"], rid, cid, trace,
                None, None, None, 0.0), []]  # fmt: skip

    def _send(self, send: Send, rid: str, cid: str) -> Send:
        rid_value = rid.encode("ascii")
        id_headers = [(RID, rid_value), (CID, rid_value if cid is rid else cid.encode())]
        with_ids = self.h["with_ids"]
        names = frozenset({RID, CID})
        started = False

        def send_with_ids(message: Message) -> Any:
            nonlocal started
            if not started and message["type"] == "http.response.start":
                started = True
                message["headers"] = with_ids(message.get("headers", ()), id_headers, names)
            return send(message)

        return send_with_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid, cid, trace = self._ids(scope)
        ctx = self._pending(rid, cid, trace) if self.level >= 3 else None
        inner = self._send(send, rid, cid) if self.level >= 4 else send
        var = self.h["var"]
        if self.level < 5:
            token = var.set(ctx)
            try:
                await self.app(scope, receive, inner)
            finally:
                var.reset(token)
            return
        stack: list[Any] = ctx[3]
        token = var.set(ctx)
        try:
            await self.app(scope, receive, inner)
        finally:
            try:
                if stack:
                    await self.h["cleanups"](stack)
            finally:
                var.reset(token)
                stack.append(self.h["closed"])


async def _main(n: int, repeats: int) -> dict[str, Any]:
    templates = [http_scope(tokens.mint("HS256", unique=False))]
    apps: dict[str, Any] = {"bare Starlette": bare_app()}
    apps.update({name: Layer(bare_app(), i) for i, name in enumerate(LAYERS)})
    apps["ContextMiddleware (real, pure Python)"] = pure_python(ContextMiddleware, bare_app())
    real = ContextMiddleware(bare_app())
    if real._start is not None:
        apps["ContextMiddleware (real, C accelerator)"] = real
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
        step = "" if name.startswith("ContextMiddleware (real") else f"{delta - previous:.2f}"
        lines.append(f"| {name} | {delta:.2f} | {step} |")
        previous = delta
    return [*lines, ""]
