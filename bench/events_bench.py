"""Events: publish → deliver latency (in process and through Redis), memory per connection.

A delivery is timed from just before ``await bus.publish(...)`` to the moment the
connection's ``send_json`` runs (wall clock: this is a latency), one event at a time.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import tracemalloc
import uuid
from contextlib import AsyncExitStack
from typing import Any

from ctxvars_mw import UserExecutionContext, use_context

from .analysis import check
from .driver import loop_factory, redis_answers
from .stats import Summary, rss_bytes

REDIS_URL = "redis://127.0.0.1:6379/0"
USER = "auth0|5f7c8ec7c33c6c004bbafe82"


class _Sink:
    """A websocket stand-in that records when each event reached it."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[int] | None = None

    async def send_json(self, data: Any) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(time.perf_counter_ns())


def available() -> str | None:
    """Why the benchmark cannot run here, or None when it can."""
    try:
        import ctxvars_mw.events  # noqa: F401
    except ImportError:
        return "ctxvars_mw.events is not there yet"
    return None


async def _latency(backend: Any, messages: int) -> list[float]:
    from ctxvars_mw.events import EventBus

    sink = _Sink()
    loop = asyncio.get_running_loop()
    out: list[float] = []
    async with EventBus(backend) as bus:
        with use_context(UserExecutionContext(user_id=USER)):
            async with bus.connect(sink):
                for i in range(messages + 20):
                    sink.waiter = loop.create_future()
                    start = time.perf_counter_ns()
                    await bus.publish(USER, {"kind": "token", "seq": i, "text": "hello"})
                    delivered = await asyncio.wait_for(sink.waiter, 5)
                    if i >= 20:  # the first few warm up connections and caches
                        out.append((delivered - start) / 1e3)
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p90": cuts[89], "p99": cuts[98]}


async def _connections_memory(count: int) -> dict[str, Any]:
    from ctxvars_mw.events import EventBus

    contexts = [UserExecutionContext(user_id=f"user_{i:08d}_bench_events") for i in range(count)]
    sinks = [_Sink() for _ in range(count)]
    async with EventBus() as bus, AsyncExitStack() as stack:
        gc.collect()
        rss0 = rss_bytes()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for ctx, sink in zip(contexts, sinks, strict=True):
            with use_context(ctx):
                await stack.enter_async_context(bus.connect(sink))
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        rss1 = rss_bytes()
        registered = bus.connection_count
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return {
        "connections": count,
        "registered": registered,
        "traced_mib": growth / 2**20,
        "rss_mib": (rss1 - rss0) / 2**20,
        "bytes_per_connection": growth / count,
    }


async def _main(messages: int, connections: int) -> dict[str, Any]:
    from ctxvars_mw.events import RedisBackend

    out: dict[str, Any] = {"local_us": await _latency(None, messages)}
    if redis_answers():
        prefix = f"ctxvars-bench:{uuid.uuid4().hex[:8]}:"
        out["redis_us"] = await _latency(RedisBackend(REDIS_URL, channel_prefix=prefix), messages)
    out["memory"] = await _connections_memory(connections)
    return out


def run(*, messages: int, connections: int) -> dict[str, Any]:
    """Latency percentiles (µs) in process and through Redis, and the cost of connections."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        raw = runner.run(_main(messages, connections))
    result: dict[str, Any] = {"config": {"messages": messages, "connections": connections}}
    result["latency"] = {
        k.removesuffix("_us"): _percentiles(v) for k, v in raw.items() if k.endswith("_us")
    }
    result["memory"] = raw["memory"]
    targets = [("events: publish → deliver p50 in process (µs)", check(
        result["latency"]["local"]["p50"], 50))]  # fmt: skip
    if "redis" in result["latency"]:
        p50 = result["latency"]["redis"]["p50"]
        targets.append(("events: publish → deliver p50 through Redis (µs)", check(p50, 1000)))
    mib = raw["memory"]["traced_mib"] * 10_000 / connections
    targets.append(("events: 10,000 registered connections (MiB, traced)", check(mib, 20)))
    result["targets"] = targets
    result["summary_local"] = Summary.of(raw["local_us"]).as_dict()
    return result


def section(result: dict[str, Any]) -> list[str]:
    """The report's Markdown section for this benchmark."""
    c, m = result["config"], result["memory"]
    lines = [
        "## Events",
        "",
        f"{c['messages']} events published one at a time (wall µs from `publish` to "
        "`send_json`); Redis on 127.0.0.1.",
        "",
        "| backend | p50 µs | p90 µs | p99 µs |",
        "|---|---|---|---|",
    ]
    for name, p in result["latency"].items():
        lines.append(f"| {name} | {p['p50']:.1f} | {p['p90']:.1f} | {p['p99']:.1f} |")
    lines += [
        "",
        f"{m['registered']:,} connections registered (one user each): "
        f"{m['traced_mib']:.2f} MiB traced by tracemalloc ({m['bytes_per_connection']:.0f} B "
        f"per connection), RSS +{m['rss_mib']:.2f} MiB.",
        "",
    ]
    return lines
