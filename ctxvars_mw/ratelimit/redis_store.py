"""RedisLimitStore: limit state shared by every process that uses the same Redis.

Each check is one Lua script (EVALSHA, loaded again by redis-py when Redis answers
NOSCRIPT, e.g. after a restart), so it is atomic and costs one round trip: the GCRA of
:mod:`~ctxvars_mw.ratelimit.store` for every rate of the request, written only when all admit
it, or a quota counter raised only when the amount fits. Keys under ``prefix``: ``r:<rate
key>`` holds a TAT in microseconds (expiring when the rate is back to its full burst),
``q:<quota key>`` a counter (expiring at its period's end). Times come from the store's
clock (the processes' clocks should agree, as NTP keeps them), and durations, not instants,
are sent to Redis for expiry.

Every failure — Redis down, a timeout past ``timeout`` seconds, an error reply — surfaces
as :class:`~ctxvars_mw.ServiceUnavailableError`; the limiter then fails closed or open as
configured. redis-py is imported when a store is constructed, never with ``ctxvars_mw``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._redis import redis_client, redis_errors
from ..errors import ConfigurationError, ServiceUnavailableError
from .declarations import Rate
from .store import QuotaVerdict, RateVerdict

__all__ = ["RedisLimitStore"]

# KEYS: one per rate. ARGV[1] now (µs), ARGV[2] cost, then per rate its interval and
# capacity (µs). Returns {allowed, retry after (µs), remaining_1, reset_1 (µs), ...}.
_HIT = """
local now, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, bases, news = {1, 0}, {}, {}
for i = 1, #KEYS do
  local interval, capacity = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local base = tonumber(redis.call('GET', KEYS[i]) or '0')
  if base < now then base = now end
  bases[i], news[i] = base, base + cost * interval
  local late = news[i] - capacity - now
  if late > 0 then
    out[1] = 0
    if late > out[2] then out[2] = late end
  end
end
for i = 1, #KEYS do
  local interval, capacity = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local after = bases[i]
  if out[1] == 1 then
    after = news[i]
    redis.call('SET', KEYS[i], string.format('%.0f', after), 'PX', math.ceil((after - now) / 1000))
  end
  out[1 + 2 * i] = math.floor((capacity - (after - now)) / interval)
  out[2 + 2 * i] = after - now
end
return out
"""

# KEYS[1] the counter. ARGV: limit, amount, time to live (ms). Returns {allowed, used}.
_CONSUME = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[2])
if used + amount > tonumber(ARGV[1]) then return {0, used} end
used = redis.call('INCRBY', KEYS[1], amount)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, used}
"""


class RedisLimitStore:
    """A :class:`~ctxvars_mw.ratelimit.LimitStore` in Redis (redis-py asyncio), for many
    processes.

    ``url_or_client`` is a ``redis://`` URL (a client is made with a pool of at most
    ``max_connections`` that a burst of checks waits on, ``timeout`` for connecting and for
    each command, and one immediate retry on a connection error, so a pooled connection that
    died with a Redis restart is reconnected) or a ``redis.asyncio.Redis`` client (used as
    is, not closed by :meth:`aclose`). Each check is also bounded by
    ``timeout`` seconds as a whole. ``clock`` returns the current Unix time (tests).
    """

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = "ctxvars:limits:",
        timeout: float = 0.25,
        max_connections: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError("prefix must be a non-empty string")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigurationError("timeout must be a positive number of seconds")
        if not callable(clock):
            raise ConfigurationError("clock must be a callable returning the Unix time")
        self._redis, self._owns_client = redis_client(
            url_or_client, timeout=timeout, max_connections=max_connections
        )
        self.prefix = prefix
        self.timeout = float(timeout)
        self.clock = clock
        self._errors = redis_errors()
        self._hit = self._redis.register_script(_HIT)
        self._consume = self._redis.register_script(_CONSUME)

    async def hit(self, keys: Sequence[str], rates: Sequence[Rate], cost: int = 1) -> RateVerdict:
        """Count a request against ``rates``, one key each, all or none (one round trip)."""
        args: list[int] = [int(self.clock() * 1_000_000), cost]
        for rate in rates:
            args += (rate.interval_us, rate.capacity_us)
        prefix = self.prefix
        raw = await self._run(self._hit, [f"{prefix}r:{key}" for key in keys], args)
        states = tuple((int(raw[i]), int(raw[i + 1])) for i in range(2, len(raw), 2))
        return RateVerdict(raw[0] == 1, int(raw[1]), states)

    async def consume(self, key: str, limit: int, amount: int, expires_at: float) -> QuotaVerdict:
        """Consume ``amount`` of a quota unless it would pass ``limit`` (one round trip)."""
        ttl_ms = max(1, math.ceil((expires_at - self.clock()) * 1000))
        raw = await self._run(self._consume, [f"{self.prefix}q:{key}"], [limit, amount, ttl_ms])
        return QuotaVerdict(raw[0] == 1, int(raw[1]))

    async def _run(self, script: Any, keys: list[str], args: list[int]) -> list[Any]:
        try:
            async with asyncio.timeout(self.timeout):
                result: list[Any] = await script(keys=keys, args=args)
        except self._errors as exc:
            raise ServiceUnavailableError("The rate limit store is unavailable.") from exc
        return result

    async def aclose(self) -> None:
        """Close the Redis client this store created (not one passed in)."""
        if self._owns_client:
            await self._redis.aclose(close_connection_pool=True)
