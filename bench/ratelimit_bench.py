"""Metering: what a rate check costs, beside the ``limits`` library, in the same run.

In memory (CPU time per check, medians of interleaved repeats): the middleware's whole check
(``Limiter.check_request``: the caller's key, the tier's plan, the GCRA step, the two
RateLimit headers) and the store's GCRA step alone, against ``limits``' fixed-window,
moving-window and sliding-window-counter limiters on its memory storage (sync, and the
asyncio moving window). Checks that never suspend are run to completion by hand (inside a
running loop, which limits' asyncio storage needs), so no scheduling is counted for either
library. Then a whole request: the paired difference between ContextMiddleware with a
metering policy and without one.

Through Redis (wall time: a round trip is a latency): one check by ``RedisLimitStore`` and
by ``limits``' asyncio moving window on redis-py, and the round trips per check (counted by
the client connection's sends).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from ctxvars_mw import ContextMiddleware, InMemoryLimitStore, Limiter, Policy, UserExecutionContext

from .driver import complete, http_scope, loop_factory, redis_answers, sequential
from .stats import Summary

REDIS_URL = "redis://127.0.0.1:6379/0"
USERS = [f"user_{n:06d}_bench_limits" for n in range(1000)]
#: High enough that no benchmarked check is ever refused: every library does its full work.
RATE = "1000000/minute"
POLICY = Policy.from_mapping(
    {**Policy.default().to_mapping(), "tier_limits": {"free": {"rate": RATE}}}
)


def available() -> str | None:
    """Why the benchmark cannot run here, or None when it can."""
    try:
        import limits  # noqa: F401
    except ImportError:
        return "the limits library is not installed (pip install -e '.[dev]')"
    return None


def _memory_cases() -> dict[str, Callable[[int], None]]:
    """Each case: a function doing ``n`` checks, cycling through USERS."""
    import limits
    from limits.aio import strategies as aio_strategies
    from limits.aio.storage import MemoryStorage as AioMemoryStorage

    limiter = Limiter(POLICY, store=InMemoryLimitStore())
    contexts = [UserExecutionContext(user_id=u) for u in USERS]  # free tier, authenticated
    scope = {"type": "http", "path": "/", "client": ("127.0.0.1", 5000)}
    plan = limiter.plan("/", contexts[0].tier)
    assert plan is not None
    store = limiter.store
    keys = [[f"u:{u}{plan.suffixes[0]}"] for u in USERS]
    item = limits.parse(RATE)
    storage = limits.storage.MemoryStorage()
    fixed = limits.strategies.FixedWindowRateLimiter(storage)
    moving = limits.strategies.MovingWindowRateLimiter(storage)
    sliding = limits.strategies.SlidingWindowCounterRateLimiter(storage)
    aio_moving = aio_strategies.MovingWindowRateLimiter(AioMemoryStorage())
    size = len(USERS)

    def ours(n: int) -> None:
        check = limiter.check_request
        for i in range(n):
            complete(check(scope, contexts[i % size]))

    def ours_store(n: int) -> None:
        hit, rates = store.hit, plan.rates
        for i in range(n):
            complete(hit(keys[i % size], rates))

    def theirs(strategy: Any) -> Callable[[int], None]:
        def run(n: int) -> None:
            hit = strategy.hit
            for i in range(n):
                hit(item, USERS[i % size])

        return run

    def theirs_aio(n: int) -> None:
        hit = aio_moving.hit
        for i in range(n):
            complete(hit(item, USERS[i % size]))

    return {
        "ctxvars_mw: Limiter.check_request (key, GCRA, headers)": ours,
        "ctxvars_mw: InMemoryLimitStore.hit (GCRA only)": ours_store,
        "limits: FixedWindowRateLimiter.hit": theirs(fixed),
        "limits: MovingWindowRateLimiter.hit": theirs(moving),
        "limits: SlidingWindowCounterRateLimiter.hit": theirs(sliding),
        "limits: aio MovingWindowRateLimiter.hit": theirs_aio,
    }


def _time_memory(n: int, repeats: int) -> dict[str, list[float]]:
    cases = _memory_cases()
    for case in cases.values():
        case(n // 10 or 1)  # warm up
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.thread_time_ns()
            cases[name](n)
            samples[name].append((time.thread_time_ns() - start) / n / 1e3)
    return samples


async def _in_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn`` inside the running loop (limits' asyncio storage schedules its expiry)."""
    return fn(*args)


async def _bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _time_requests(n: int, repeats: int) -> dict[str, list[float]]:
    """CPU µs per request: ContextMiddleware (anonymous callers) with and without metering."""
    apps = {
        "without limits": ContextMiddleware(_bare),
        "metering (in memory)": ContextMiddleware(_bare, policy=POLICY),
    }
    templates = []
    for n_addr in range(256):
        scope = http_scope("x.y.z")
        scope["client"] = (f"10.0.0.{n_addr}", 5000)
        templates.append(scope)
    for app in apps.values():
        await sequential(app, templates, n // 10 or 1)
    samples: dict[str, list[float]] = {name: [] for name in apps}
    names = list(apps)
    for r in range(repeats):
        for name in names[r % 2 :] + names[: r % 2]:
            cpu, _ = await sequential(apps[name], templates, n)
            samples[name].append(cpu)
    return samples


def _counting_connection() -> tuple[type, dict[str, int]]:
    """A redis-py asyncio Connection class that counts what it sends (one send per round
    trip: a command, or a pipeline), and its counter."""
    import redis.asyncio as redis

    sent = {"n": 0}

    class Counting(redis.Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent["n"] += 1
            await super().send_packed_command(command, check_health)

    return Counting, sent


async def _time_redis(n: int, blocks: int = 5) -> dict[str, Any]:
    """Wall µs and round trips per check, each library in turn, block by block."""
    import limits
    import redis.asyncio as redis
    from limits.aio import strategies as aio_strategies

    from ctxvars_mw import RedisLimitStore, Tier

    counting, sent = _counting_connection()
    prefix = f"ctxvars-bench:{uuid.uuid4().hex[:8]}:"
    pool = redis.ConnectionPool.from_url(REDIS_URL, connection_class=counting)
    client = redis.Redis(connection_pool=pool)
    store = RedisLimitStore(client, prefix=prefix, timeout=2.0)
    plan = Limiter(POLICY, store=store).plan("/", Tier.FREE)
    assert plan is not None
    item = limits.parse(RATE)
    storage = limits.storage.storage_from_string(
        REDIS_URL.replace("redis://", "async+redis://"),
        implementation="redispy",
        connection_class=counting,
    )
    theirs = aio_strategies.MovingWindowRateLimiter(storage)

    async def ours_check(user: str) -> None:
        await store.hit([f"u:{user}{plan.suffixes[0]}"], plan.rates)

    async def theirs_check(user: str) -> None:
        await theirs.hit(item, prefix, user)

    checks = {
        "ctxvars_mw: RedisLimitStore.hit": ours_check,
        "limits: aio MovingWindowRateLimiter.hit (redis-py)": theirs_check,
    }
    latency: dict[str, list[float]] = {name: [] for name in checks}
    trips: dict[str, list[float]] = {name: [] for name in checks}
    per_block = max(1, n // blocks)
    try:
        for check in checks.values():
            for i in range(50):  # warm up connections, load the scripts
                await check(f"warm{i}")
        for _ in range(blocks):
            for name, check in checks.items():
                before = sent["n"]
                for i in range(per_block):
                    start = time.perf_counter_ns()
                    await check(USERS[i % len(USERS)])
                    latency[name].append((time.perf_counter_ns() - start) / 1e3)
                trips[name].append((sent["n"] - before) / per_block)
    finally:
        for pattern in (f"{prefix}*", f"LIMITS*{prefix}*"):
            keys = [k async for k in client.scan_iter(match=pattern)]
            if keys:
                await client.delete(*keys)
        await client.aclose(close_connection_pool=True)
        await storage.bridge.storage.aclose()  # limits keeps its redis-py client there
    return {"latency_us": latency, "round_trips_per_check": trips}


def run(*, n: int, repeats: int, redis_checks: int) -> dict[str, Any]:
    """Memory checks, whole requests and (with a Redis on 127.0.0.1:6379) Redis checks."""
    out: dict[str, Any] = {"config": {"n": n, "repeats": repeats, "redis_checks": redis_checks}}
    factory = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        out["memory_us"] = runner.run(_in_loop(_time_memory, n, repeats))
        out["request_us"] = runner.run(_time_requests(n, repeats))
        if redis_answers():
            out["redis_us"] = runner.run(_time_redis(redis_checks))
    return out


def section(result: dict[str, Any]) -> list[str]:
    """The Markdown section of the report."""
    memory = {name: Summary.of(v) for name, v in result["memory_us"].items()}
    ours = memory["ctxvars_mw: Limiter.check_request (key, GCRA, headers)"].median
    lines = [
        "## Metering (rate checks)",
        "",
        "CPU µs per check in memory, medians [min..max] of interleaved repeats; ratio = the "
        "row ÷ ctxvars_mw's whole check.",
        "",
        "| check | µs | ratio |",
        "|---|---|---|",
    ]
    for name, s in memory.items():
        lines.append(
            f"| {name} | {s.median:.2f} [{s.low:.2f}..{s.high:.2f}] | {s.median / ours:.2f}x |"
        )
    req = result["request_us"]
    delta = [a - b for a, b in zip(req["metering (in memory)"], req["without limits"], strict=True)]
    lines += [
        "",
        f"Whole request through ContextMiddleware (anonymous, CPU µs): without limits "
        f"{statistics.median(req['without limits']):.2f}, metering in memory "
        f"{statistics.median(req['metering (in memory)']):.2f}; paired Δ "
        f"{statistics.median(delta):.2f} µs (target ≤ 2 µs).",
        "",
    ]
    redis_result = result.get("redis_us")
    if redis_result:
        latency, trips = redis_result["latency_us"], redis_result["round_trips_per_check"]
        first = statistics.median(next(iter(latency.values())))
        lines += [
            "Through Redis on 127.0.0.1 (wall µs per check, sequential; round trips counted "
            "by the client's connection):",
            "",
            "| check | p50 µs | ratio | round trips per check |",
            "|---|---|---|---|",
        ]
        for name, values in latency.items():
            p50 = statistics.median(values)
            lines.append(
                f"| {name} | {p50:.1f} | {p50 / first:.2f}x | "
                f"{statistics.median(trips[name]):.2f} |"
            )
        lines.append("")
    return lines
