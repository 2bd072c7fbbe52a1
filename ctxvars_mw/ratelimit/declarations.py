"""What a tier may use: request rates and quotas, declared once and checked at construction.

A **rate** (:class:`Rate`) is a number of requests per window of seconds, enforced smoothly
(GCRA: a burst of up to ``burst`` requests, then one every ``window / limit`` seconds). A
**quota** (:class:`Quota`) is a number of units per UTC calendar day or month, consumed
explicitly by the code that spends them.

Per-tier tables read the same way everywhere (the policy's ``tier_limits``, a route's
``route_limits`` entry, a :func:`~ctxvars_mw.rate_limit` decorator): a tier takes each limit
from the nearest tier *at or below it* that declares it, so a forgotten tier is as limited
as the one below, never unlimited by accident; ``"unlimited"`` ends that for a tier. Every
quota must be declared for the ``free`` tier, so no tier lacks it.

Plain-data spellings (JSON, TOML): a rate is ``"60/minute"`` (units ``second``, ``minute``,
``hour``, ``day``) or ``{"limit": 60, "window": 60, "burst": 10}``; a quota is
``"1000/month"`` (``day`` or ``month``); either may be ``"unlimited"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import ConfigurationError
from ..tier import Tier

__all__ = [
    "UNLIMITED",
    "Quota",
    "Rate",
    "TierLimits",
    "compile_rate_table",
    "compile_tier_limits",
    "limits_to_data",
]

UNLIMITED = "unlimited"
_WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_WINDOW_NAMES = {seconds: name for name, seconds in _WINDOWS.items()}
_PERIODS = ("day", "month")
_SPEC = re.compile(r"([0-9]{1,12})/([a-z]+)")
_QUOTA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")


def _count(where: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{where} must be an int >= {minimum}")
    return value


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` requests per ``window`` seconds (an int, or ``"second"``, ``"minute"``,
    ``"hour"``, ``"day"``), at most ``burst`` (default ``limit``) at once."""

    limit: int
    window: int | str
    burst: int | None = None
    #: The window in seconds, the GCRA emission interval and burst capacity (microseconds).
    seconds: int = field(init=False, repr=False, compare=False)
    interval_us: int = field(init=False, repr=False, compare=False)
    capacity_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _count("Rate limit", self.limit, minimum=1)
        window = _WINDOWS.get(self.window) if isinstance(self.window, str) else self.window
        if window is None:
            raise ConfigurationError(f"Rate window must be seconds or one of {sorted(_WINDOWS)}")
        seconds = _count("Rate window", window, minimum=1)
        burst = _count("Rate burst", self.limit if self.burst is None else self.burst, minimum=1)
        interval = max(1, round(seconds * 1_000_000 / self.limit))
        object.__setattr__(self, "burst", burst)
        object.__setattr__(self, "seconds", seconds)
        object.__setattr__(self, "interval_us", interval)
        object.__setattr__(self, "capacity_us", interval * burst)

    @property
    def name(self) -> str:
        """The policy name in the RateLimit headers: the window (``"minute"``, or ``"90s"``)."""
        return _WINDOW_NAMES.get(self.seconds) or f"{self.seconds}s"

    @classmethod
    def parse(cls, spec: object) -> Rate:
        """A rate from ``"60/minute"``, ``{"limit": 60, "window": 60, "burst": 10}`` or a Rate."""
        if isinstance(spec, Rate):
            return spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"limit", "window", "burst"}
            if unknown or "limit" not in spec or "window" not in spec:
                raise ConfigurationError("a rate mapping has 'limit', 'window' and 'burst' only")
            return cls(spec["limit"], spec["window"], spec.get("burst"))
        limit, unit = _split(spec, "rate", _WINDOWS)
        return cls(limit, unit)

    def to_data(self) -> str | dict[str, int]:
        """The plain-data spelling, accepted back by :meth:`parse`."""
        if self.burst == self.limit and self.seconds in _WINDOW_NAMES:
            return f"{self.limit}/{_WINDOW_NAMES[self.seconds]}"
        return {"limit": self.limit, "window": self.seconds, "burst": self.burst or self.limit}


@dataclass(frozen=True, slots=True)
class Quota:
    """``limit`` units per UTC calendar ``period`` (``"day"`` or ``"month"``)."""

    limit: int
    period: str

    def __post_init__(self) -> None:
        _count("Quota limit", self.limit, minimum=0)
        if self.period not in _PERIODS:
            raise ConfigurationError("Quota period must be 'day' or 'month'")

    @classmethod
    def parse(cls, spec: object) -> Quota:
        """A quota from ``"1000/month"`` or a Quota."""
        if isinstance(spec, Quota):
            return spec
        limit, period = _split(spec, "quota", _PERIODS)
        return cls(limit, period)

    def bounds(self, now: float) -> tuple[str, float, float]:
        """The period holding the Unix time ``now``: its id (``"2026-05"``, ``"2026-05-23"``),
        start and end (Unix times; the end is the next period's start)."""
        day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "day":
            start = day
            end = datetime.fromtimestamp(day.timestamp() + 86400, UTC)
            return start.strftime("%Y-%m-%d"), start.timestamp(), end.timestamp()
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else (start.replace(month=start.month + 1))
        )
        return start.strftime("%Y-%m"), start.timestamp(), end.timestamp()

    def to_data(self) -> str:
        """The plain-data spelling, accepted back by :meth:`parse`."""
        return f"{self.limit}/{self.period}"


def _split(spec: object, kind: str, units: Iterable[str]) -> tuple[int, str]:
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None or match.group(2) not in units:
        raise ConfigurationError(f"a {kind} is written 'N/unit' with unit one of {sorted(units)}")
    return int(match.group(1)), match.group(2)


@dataclass(frozen=True, slots=True)
class TierLimits:
    """The limits one tier meets: its request ``rates`` (empty: none) and its ``quotas`` by
    name (None: unlimited)."""

    rates: tuple[Rate, ...] = ()
    quotas: Mapping[str, Quota | None] = field(default_factory=dict)


def _rates(where: str, value: object) -> tuple[Rate, ...]:
    if value == UNLIMITED:
        return ()
    items = [value] if isinstance(value, (str, Mapping, Rate)) else value
    if not isinstance(items, Iterable):
        raise ConfigurationError(f"{where} must be a rate, a list of rates or 'unlimited'")
    rates = tuple(Rate.parse(item) for item in items)
    if not rates or len({r.seconds for r in rates}) != len(rates):
        raise ConfigurationError(f"{where}: give at least one rate, one per window")
    return rates


def _quota(where: str, value: object) -> Quota | None:
    return None if value == UNLIMITED else Quota.parse(value)


def _tier(where: str, key: object) -> Tier:
    try:
        return Tier.parse(key)  # type: ignore[arg-type]
    except ValueError:
        raise ConfigurationError(f"{where} names an unknown tier: {key!r}") from None


def _entries(where: str, table: object) -> dict[Tier, Any]:
    if not isinstance(table, Mapping):
        raise ConfigurationError(f"{where} must be a mapping of tier to limits")
    return {_tier(where, key): value for key, value in table.items()}


def compile_rate_table(where: str, table: object) -> dict[Tier, tuple[Rate, ...]]:
    """Every tier's rates from a table of tier → rate(s) (carried up the tiers); tiers below
    the first one named are left out (the table does not apply to them)."""
    own = {tier: _rates(f"{where}[{tier.value}]", v) for tier, v in _entries(where, table).items()}
    if not own:
        raise ConfigurationError(f"{where} names no tier")
    result: dict[Tier, tuple[Rate, ...]] = {}
    current: tuple[Rate, ...] | None = None
    for tier in Tier:
        current = own.get(tier, current)
        if current is not None:
            result[tier] = current
    return result


def compile_tier_limits(table: object) -> dict[Tier, TierLimits]:
    """Every tier's :class:`TierLimits` from a policy's ``tier_limits`` (see the module
    docstring for the rules); a bad table raises :class:`ConfigurationError`."""
    rates: dict[Tier, tuple[Rate, ...]] = {}
    quotas: dict[Tier, dict[str, Quota | None]] = {}
    unlimited: set[Tier] = set()
    for tier, entry in _entries("tier_limits", table).items():
        where = f"tier_limits[{tier.value}]"
        if entry == UNLIMITED:
            rates[tier] = ()
            unlimited.add(tier)
            continue
        if not isinstance(entry, Mapping) or set(entry) - {"rate", "quotas"}:
            raise ConfigurationError(f"{where} must be 'unlimited' or have 'rate' and 'quotas'")
        if "rate" in entry:
            rates[tier] = _rates(f"{where}.rate", entry["rate"])
        own = entry.get("quotas", {})
        if not isinstance(own, Mapping):
            raise ConfigurationError(f"{where}.quotas must be a mapping of name to quota")
        quotas[tier] = {_quota_name(where, n): _quota(f"{where}.quotas", v) for n, v in own.items()}
    names = {name for q in quotas.values() for name in q}
    missing = names - quotas.get(Tier.FREE, {}).keys()
    if missing and Tier.FREE not in unlimited:
        raise ConfigurationError(
            "every quota must be declared for the free tier: " + ", ".join(sorted(missing))
        )
    result: dict[Tier, TierLimits] = {}
    carried_rates: tuple[Rate, ...] = ()
    carried_quotas: dict[str, Quota | None] = {}
    for tier in Tier:
        carried_rates = rates.get(tier, carried_rates)
        if tier in unlimited:
            carried_quotas = dict.fromkeys(names)
        else:
            carried_quotas = {**carried_quotas, **quotas.get(tier, {})}
        result[tier] = TierLimits(carried_rates, carried_quotas)
    return result


def _quota_name(where: str, name: object) -> str:
    if not isinstance(name, str) or not _QUOTA_NAME.fullmatch(name):
        raise ConfigurationError(f"{where}: quota names are identifiers like 'agent_runs'")
    return name


def limits_to_data(table: object) -> dict[str, Any]:
    """A ``tier_limits`` table as plain data in its normal spelling (for ``to_mapping``)."""
    out: dict[str, Any] = {}
    for tier, entry in _entries("tier_limits", table).items():
        if entry == UNLIMITED:
            out[tier.value] = UNLIMITED
            continue
        data: dict[str, Any] = {}
        if "rate" in entry:
            rates = _rates("rate", entry["rate"])
            data["rate"] = [r.to_data() for r in rates] if rates else UNLIMITED
        if "quotas" in entry:
            data["quotas"] = {
                name: UNLIMITED if q is None else q.to_data()
                for name, q in ((n, _quota("quotas", v)) for n, v in entry["quotas"].items())
            }
        out[tier.value] = data
    return out
