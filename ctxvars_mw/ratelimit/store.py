"""Where rate and quota state lives: the store protocol, its verdicts, and the in-memory store.

Rates are GCRA (the generic cell rate algorithm): a key holds one number, its *theoretical
arrival time* (TAT). A request of ``cost`` at ``now`` moves it to ``max(TAT, now) + cost *
interval``; it is admitted when that is no more than ``capacity`` (``burst * interval``) ahead
of ``now``. So ``burst`` requests pass at once, then one every ``interval``, and a key whose TAT
is in the past holds nothing a fresh key would not: it can be dropped. Several rates (a
request's per-minute and per-hour limits) are checked together, and the request only counts
against them when every one admits it. Times are integer microseconds, in both stores, so the
in-memory store and the Redis script compute the same answers.

Quotas are counters per calendar period: the key names the period, so a new period starts
from zero, and a consumption that would pass the limit is refused whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from ..errors import ConfigurationError
from .declarations import Rate

__all__ = [
    "InMemoryLimitStore",
    "LimitStore",
    "QuotaVerdict",
    "RateVerdict",
    "gcra",
    "rate_state",
]


class RateVerdict(NamedTuple):
    """A rate check's answer: ``allowed``; ``retry_after_us`` (when refused: how long until
    it would be admitted); per rate, ``(remaining, reset_us)`` — requests still admitted now,
    and how long until the rate is back to its full burst."""

    allowed: bool
    retry_after_us: int
    states: tuple[tuple[int, int], ...]


_verdict = tuple.__new__  # a RateVerdict without its Python-level __new__ (the hot path)


class QuotaVerdict(NamedTuple):
    """A quota consumption's answer: ``allowed`` and the units ``used`` in the period (after
    the consumption when allowed)."""

    allowed: bool
    used: int


class LimitStore(Protocol):
    """Keeps limit state: :class:`InMemoryLimitStore` (one process) or
    :class:`~ctxvars_mw.RedisLimitStore` (many). Either raises
    :class:`~ctxvars_mw.ServiceUnavailableError` when it cannot answer."""

    clock: Callable[[], float]

    async def hit(self, keys: Sequence[str], rates: Sequence[Rate], cost: int = 1) -> RateVerdict:
        """Count a request of ``cost`` against ``rates`` (one key each), all or none."""
        ...

    async def consume(self, key: str, limit: int, amount: int, expires_at: float) -> QuotaVerdict:
        """Add ``amount`` to ``key``'s counter unless it would pass ``limit``; the counter
        is forgotten at the Unix time ``expires_at`` (its period's end)."""
        ...


def gcra(tat: int, now: int, rate: Rate, cost: int) -> tuple[int, int, int]:
    """One rate's GCRA step from the stored ``tat`` (0: none): ``(base, new, late)`` — the
    TAT before and after the request, and how late the request is (> 0: refused; the
    microseconds until it would be admitted)."""
    base = tat if tat > now else now
    new = base + cost * rate.interval_us
    return base, new, new - rate.capacity_us - now


def rate_state(after: int, now: int, rate: Rate) -> tuple[int, int]:
    """``(remaining, reset_us)`` of a rate whose TAT is ``after``."""
    return (rate.capacity_us - (after - now)) // rate.interval_us, after - now


class InMemoryLimitStore:
    """Limit state in this process's memory (one process; use Redis for many).

    Memory stays bounded: every ``sweep_interval`` seconds the keys that hold nothing (a rate
    back to its full burst, a quota whose period ended) are dropped, and past ``max_keys`` the
    oldest keys go first. ``clock`` returns the current Unix time (tests).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_keys: int = 100_000,
        sweep_interval: float = 10.0,
    ) -> None:
        if not callable(clock):
            raise ConfigurationError("clock must be a callable returning the Unix time")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigurationError("max_keys must be a positive int")
        if isinstance(sweep_interval, bool) or not isinstance(sweep_interval, (int, float)):
            raise ConfigurationError("sweep_interval must be a number of seconds")
        self.clock = clock
        self.max_keys = max_keys
        self._sweep_us = max(1, int(sweep_interval * 1_000_000))
        self._next_sweep = 0
        self._tats: dict[str, int] = {}
        self._quotas: dict[str, tuple[int, int]] = {}  # key -> (expires at µs, used)

    def __len__(self) -> int:
        """The number of keys held."""
        return len(self._tats) + len(self._quotas)

    async def hit(self, keys: Sequence[str], rates: Sequence[Rate], cost: int = 1) -> RateVerdict:
        """Count a request against ``rates`` (see :class:`LimitStore`)."""
        now = int(self.clock() * 1_000_000)
        if now >= self._next_sweep:
            self.sweep(now)
        tats = self._tats
        if len(keys) == 1:  # the common case: gcra() and rate_state() written out
            key, rate = keys[0], rates[0]
            interval = rate.interval_us
            base = tats.get(key, 0)
            if base < now:
                if not base and len(tats) >= self.max_keys:  # a new key, and no room
                    self.sweep(now)
                    tats = self._tats
                base = now
            new = base + cost * interval
            late = new - rate.capacity_us - now
            if late > 0:
                state = ((rate.capacity_us - base + now) // interval, base - now)
                return _verdict(RateVerdict, (False, late, (state,)))
            tats[key] = new
            state = ((rate.capacity_us - new + now) // interval, new - now)
            return _verdict(RateVerdict, (True, 0, (state,)))
        if len(tats) >= self.max_keys:
            self.sweep(now)
            tats = self._tats
        steps = [gcra(tats.get(k, 0), now, r, cost) for k, r in zip(keys, rates, strict=True)]
        late = max(step[2] for step in steps)
        if late > 0:
            states = tuple(rate_state(s[0], now, r) for s, r in zip(steps, rates, strict=True))
            return RateVerdict(False, late, states)
        for key, step in zip(keys, steps, strict=True):
            tats[key] = step[1]
        states = tuple(rate_state(s[1], now, r) for s, r in zip(steps, rates, strict=True))
        return RateVerdict(True, 0, states)

    async def consume(self, key: str, limit: int, amount: int, expires_at: float) -> QuotaVerdict:
        """Consume ``amount`` of a quota (see :class:`LimitStore`)."""
        now = int(self.clock() * 1_000_000)
        if now >= self._next_sweep or len(self._quotas) >= self.max_keys:
            self.sweep(now)
        held = self._quotas.get(key)
        used = 0 if held is None or held[0] <= now else held[1]
        if used + amount > limit:
            return QuotaVerdict(False, used)
        self._quotas[key] = (int(expires_at * 1_000_000), used + amount)
        return QuotaVerdict(True, used + amount)

    def sweep(self, now: int | None = None) -> None:
        """Drop the keys that hold nothing at ``now`` (µs; default the clock's now), then, past
        ``max_keys``, the oldest ones down to nine tenths of it."""
        if now is None:
            now = int(self.clock() * 1_000_000)
        self._next_sweep = now + self._sweep_us
        self._tats = {k: tat for k, tat in self._tats.items() if tat > now}
        self._quotas = {k: held for k, held in self._quotas.items() if held[0] > now}
        keep = self.max_keys * 9 // 10  # room to grow before the next eviction
        for table in (self._tats, self._quotas):
            excess = len(table) - keep
            if len(table) >= self.max_keys and excess > 0:
                for key in list(table)[:excess]:
                    del table[key]
