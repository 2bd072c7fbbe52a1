"""Memory: after many requests through the middleware, RSS and live contexts are back at base.

Two passes over the same app, after a warm-up: one measures RSS (``/proc/self/statm``)
without tracing, the other Python allocations with ``tracemalloc``. Live contexts are
counted by :data:`ctxvars_mw.testing.context_registry` (weak references).
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

from ctxvars_mw import ContextMiddleware
from ctxvars_mw.testing import context_registry

from . import tokens
from .apps import reading_app
from .driver import concurrent, http_scope, loop_factory
from .stats import rss_bytes


def _apps() -> dict[str, tuple[Any, list[dict[str, Any]]]]:
    # The endpoints read the context: the middleware builds it on first use, and a context
    # never built could not leak.
    token = tokens.mint("HS256", unique=False)
    apps = {"ctxvars_mw anonymous": (ContextMiddleware(reading_app()), [http_scope(token)])}
    auth = tokens.jwt_authenticator("HS256")
    if auth is not None:
        app = ContextMiddleware(reading_app(), authenticator=auth)
        apps["ctxvars_mw JWT HS256, cached"] = (app, [http_scope(token)])
    return apps


async def _pass(app: Any, templates: list[dict[str, Any]], requests: int) -> None:
    step = 10_000
    for start in range(0, requests, step):
        await concurrent(app, templates, min(step, requests - start), 100)


async def _measure(app: Any, templates: list[dict[str, Any]], requests: int) -> dict[str, Any]:
    await _pass(app, templates, min(5_000, requests))
    gc.collect()
    with context_registry:
        rss0 = rss_bytes()
        await _pass(app, templates, requests)
        gc.collect()
        rss1 = rss_bytes()
        live_after_rss_pass = context_registry.active_count()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            await _pass(app, templates, requests)
            gc.collect()
            after = tracemalloc.take_snapshot()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        live = context_registry.active_count()
    diff = after.compare_to(before, "lineno")
    growth = sum(stat.size_diff for stat in diff)
    return {
        "requests": requests,
        "rss_before_mib": rss0 / 2**20,
        "rss_after_mib": rss1 / 2**20,
        "rss_growth_kib": (rss1 - rss0) / 1024,
        "live_contexts_after": max(live, live_after_rss_pass),
        "tracemalloc_growth_kib": growth / 1024,
        "tracemalloc_peak_kib": peak / 1024,
        "top_growth": [str(stat) for stat in diff[:4]],
    }


def run(*, requests: int) -> dict[str, Any]:
    """RSS growth, traced-allocation growth and live contexts after ``requests`` requests."""

    async def main() -> dict[str, Any]:
        return {name: await _measure(app, t, requests) for name, (app, t) in _apps().items()}

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return {"config": {"requests": requests}, "apps": runner.run(main())}
