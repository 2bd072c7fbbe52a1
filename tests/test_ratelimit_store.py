"""Limit stores, in memory and in Redis, through one fixture and an injected clock: GCRA
bursts and smoothing, window edges, quota periods and month rollover, bounded memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from ctxvars_mw import ConfigurationError
from ctxvars_mw.ratelimit import InMemoryLimitStore, Quota, Rate
from ctxvars_mw.ratelimit.store import LimitStore

START = datetime(2026, 5, 31, 23, 59, 0, tzinfo=UTC).timestamp()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    """A hand-moved clock at 2026-05-31 23:59:00 UTC."""
    return Clock()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[LimitStore]:
    """Each store kind on the same clock (Redis: a private key prefix, removed after)."""
    if request.param == "memory":
        yield InMemoryLimitStore(clock=clock)
        return
    import redis.asyncio as redis

    from ctxvars_mw.ratelimit.redis_store import RedisLimitStore

    url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("key_prefix")
    store = RedisLimitStore(url, prefix=prefix, clock=clock)
    try:
        yield store
    finally:
        await store.aclose()
        client = redis.Redis.from_url(url)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def hits(store: LimitStore, rate: Rate, count: int, key: str = "u:alice") -> list[bool]:
    """Whether each of ``count`` requests in a row is admitted."""
    return [(await store.hit([key], [rate])).allowed for _ in range(count)]


async def test_a_burst_of_the_limit_passes_then_one_per_interval(
    store: LimitStore, clock: Clock
) -> None:
    """60/minute: 60 at once, the 61st refused; one more each second after."""
    rate = Rate(60, "minute")
    assert await hits(store, rate, 60) == [True] * 60
    refused = await store.hit(["u:alice"], [rate])
    assert not refused.allowed
    assert refused.retry_after_us == 1_000_000
    assert refused.states == ((0, 60_000_000),)
    clock.advance(0.999)
    assert await hits(store, rate, 1) == [False]
    clock.advance(0.001)  # exactly one interval after the burst
    assert await hits(store, rate, 2) == [True, False]
    clock.advance(5)
    assert await hits(store, rate, 6) == [True] * 5 + [False]


async def test_remaining_and_reset_count_down_and_refill(store: LimitStore, clock: Clock) -> None:
    """Each admitted request lowers ``remaining``; after the window it is full again."""
    rate = Rate(3, "minute")
    states = [(await store.hit(["u:bob"], [rate])).states[0] for _ in range(3)]
    assert states == [(2, 20_000_000), (1, 40_000_000), (0, 60_000_000)]
    clock.advance(60)
    assert (await store.hit(["u:bob"], [rate])).states[0] == (2, 20_000_000)


async def test_a_smaller_burst_smooths_the_rate(store: LimitStore, clock: Clock) -> None:
    """10/minute with burst 2: two at once, then one every 6 s, never more."""
    rate = Rate(10, "minute", burst=2)
    assert await hits(store, rate, 3) == [True, True, False]
    admitted = 0
    for _ in range(60):
        clock.advance(1)
        admitted += sum(await hits(store, rate, 2))
    assert admitted == 10


async def test_keys_are_independent(store: LimitStore) -> None:
    """One caller using its limit leaves another's untouched."""
    rate = Rate(2, "hour")
    assert await hits(store, rate, 3, "u:alice") == [True, True, False]
    assert await hits(store, rate, 2, "u:carol") == [True, True]


async def test_several_rates_count_only_when_all_admit(store: LimitStore, clock: Clock) -> None:
    """A request refused by the per-second rate does not use the per-hour one."""
    rates = [Rate(2, "second"), Rate(5, "hour")]
    keys = ["u:dave:second", "u:dave:hour"]
    answers = [(await store.hit(keys, rates)).allowed for _ in range(4)]
    assert answers == [True, True, False, False]
    clock.advance(1)
    verdict = await store.hit(keys, rates)
    assert verdict.allowed
    assert [s[0] for s in verdict.states] == [1, 2]  # the refusals used nothing of the hour
    clock.advance(1)
    assert [(await store.hit(keys, rates)).allowed for _ in range(3)] == [True, True, False]
    refused = await store.hit(keys, rates)
    assert refused.retry_after_us == 718_000_000  # the hour's next slot, 720 s after t=0


async def test_a_quota_refuses_whole_consumptions_past_its_limit(
    store: LimitStore, clock: Clock
) -> None:
    """10/day: 4 + 4 pass, 4 more would pass the limit and are refused whole, 2 pass."""
    quota = Quota(10, "day")
    _, _, end = quota.bounds(clock())
    key = "q:agent_runs:2026-05-31:u:alice"
    assert await store.consume(key, 10, 4, end) == (True, 4)
    assert await store.consume(key, 10, 4, end) == (True, 8)
    assert await store.consume(key, 10, 4, end) == (False, 8)
    assert await store.consume(key, 10, 2, end) == (True, 10)
    assert await store.consume(key, 10, 1, end) == (False, 10)


async def test_a_quota_starts_again_when_the_month_rolls_over(
    store: LimitStore, clock: Clock
) -> None:
    """Used up on 31 May at 23:59 UTC; on 1 June at 00:00 the new period's key is empty."""
    quota = Quota(2, "month")
    period, _, end = quota.bounds(clock())
    assert period == "2026-05"
    key = f"q:runs:{period}:u:alice"
    assert [(await store.consume(key, 2, 1, end)).allowed for _ in range(3)] == [True, True, False]
    clock.advance(60)
    period, _, end = quota.bounds(clock())
    assert period == "2026-06"
    assert await store.consume(f"q:runs:{period}:u:alice", 2, 1, end) == (True, 1)


async def test_concurrent_checks_at_the_edge_admit_exactly_the_limit(store: LimitStore) -> None:
    """200 concurrent requests against 50/hour: exactly 50 pass; the same for a quota."""
    rate = Rate(50, "hour")
    verdicts = await asyncio.gather(*(store.hit(["u:edge"], [rate]) for _ in range(200)))
    assert sum(v.allowed for v in verdicts) == 50
    end = START + 86400
    used = await asyncio.gather(*(store.consume("q:edge", 30, 1, end) for _ in range(100)))
    assert sum(u.allowed for u in used) == 30
    assert max(u.used for u in used) == 30


async def test_memory_drops_keys_that_hold_nothing(clock: Clock) -> None:
    """After the window and the sweep interval, a rate's keys and ended quotas are gone."""
    store = InMemoryLimitStore(clock=clock, sweep_interval=30)
    rate = Rate(10, "minute")
    for n in range(500):
        await store.hit([f"ip:10.0.{n // 256}.{n % 256}"], [rate])
    await store.consume("q:runs:2026-05-31:u:a", 5, 1, START + 60)
    assert len(store) == 501
    clock.advance(61)
    await store.hit(["u:fresh"], [rate])  # the sweep runs on the first call past its interval
    assert len(store) == 1


async def test_memory_is_bounded_by_max_keys(clock: Clock) -> None:
    """A stream of new keys never holds more than max_keys (the oldest go first)."""
    store = InMemoryLimitStore(clock=clock, max_keys=100)
    rate = Rate(1, "day")
    for n in range(1000):
        await store.hit([f"ip:{n}"], [rate])
        assert len(store) <= 100
    assert (await store.hit(["ip:999"], [rate])).allowed is False  # the newest are kept


@pytest.mark.parametrize(
    "options",
    [{"clock": 3}, {"max_keys": 0}, {"max_keys": True}, {"sweep_interval": "10"}],
)
def test_bad_memory_store_options_raise_configuration_error(options: dict[str, Any]) -> None:
    """Each option is checked at construction."""
    with pytest.raises(ConfigurationError):
        InMemoryLimitStore(**options)


async def test_redis_reloads_its_script_after_a_script_flush(
    redis_url: str, key_prefix: str, clock: Clock
) -> None:
    """EVALSHA meets NOSCRIPT (a restarted or flushed Redis): the script is loaded again and
    the check answers, the count intact."""
    import redis.asyncio as redis

    from ctxvars_mw.ratelimit.redis_store import RedisLimitStore

    store = RedisLimitStore(redis_url, prefix=key_prefix, clock=clock)
    admin = redis.Redis.from_url(redis_url)
    try:
        rate = Rate(3, "hour")
        assert await hits(store, rate, 2) == [True, True]
        await admin.script_flush()
        assert await hits(store, rate, 2) == [True, False]
    finally:
        await store.aclose()
        keys = [key async for key in admin.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


async def test_a_redis_that_never_answers_fails_within_the_timeout() -> None:
    """A server that accepts connections and says nothing: each check gives up after
    ``timeout`` seconds with ServiceUnavailableError, never hanging the request."""
    from ctxvars_mw import ServiceUnavailableError
    from ctxvars_mw.ratelimit.redis_store import RedisLimitStore

    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisLimitStore(f"redis://127.0.0.1:{port}/0", timeout=0.2)
    try:
        for _ in range(2):
            started = asyncio.get_running_loop().time()
            with pytest.raises(ServiceUnavailableError):
                await store.hit(["u:alice"], [Rate(1, "second")])
            assert asyncio.get_running_loop().time() - started < 1.0
    finally:
        await store.aclose()
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "options",
    [{"prefix": ""}, {"timeout": 0}, {"timeout": "1"}, {"clock": None}],
)
def test_bad_redis_store_options_raise_configuration_error(
    options: dict[str, Any], redis_url: str
) -> None:
    """Prefix, timeout and clock are checked at construction; so is the URL or client."""
    from ctxvars_mw.ratelimit.redis_store import RedisLimitStore

    with pytest.raises(ConfigurationError):
        RedisLimitStore(redis_url, **options)
    with pytest.raises(ConfigurationError):
        RedisLimitStore(6379)
