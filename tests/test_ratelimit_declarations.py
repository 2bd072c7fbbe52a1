"""Limit declarations: rates, quotas, per-tier tables carried up the tiers, bad input refused."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime
from typing import Any

import pytest

from ctxvars_mw import ConfigurationError, Policy, Tier
from ctxvars_mw.ratelimit import Quota, Rate, TierLimits
from ctxvars_mw.ratelimit.declarations import compile_rate_table
from ctxvars_mw.ratelimit.limiter import plans_for

SAAS: dict[str, Any] = {
    "free": {"rate": "60/minute", "quotas": {"agent_runs": "1000/month", "exports": "10/day"}},
    "business": {"rate": "600/minute", "quotas": {"agent_runs": "50000/month"}},
    "enterprise": {"rate": ["100/second", "20000/hour"], "quotas": {"exports": "unlimited"}},
    "internal": "unlimited",
}


def saas_policy() -> Policy:
    """The default roles and features, with the SaaS limits above."""
    return Policy.from_mapping({**Policy.default().to_mapping(), "tier_limits": SAAS})


def test_rate_strings_give_the_window_interval_and_burst() -> None:
    """'60/minute' is 60 per 60 s: one every second, a burst of 60; a custom burst is kept."""
    rate = Rate.parse("60/minute")
    assert (rate.limit, rate.seconds, rate.burst, rate.interval_us) == (60, 60, 60, 1_000_000)
    assert rate.capacity_us == 60_000_000
    assert rate.name == "minute"
    smooth = Rate(10, 90, burst=2)
    assert (smooth.name, smooth.capacity_us) == ("90s", 2 * 9_000_000)
    assert Rate.parse(smooth.to_data()) == smooth
    assert Rate.parse({"limit": 5, "window": "hour"}) == Rate(5, "hour")


def test_quota_periods_are_utc_calendar_days_and_months() -> None:
    """A month runs from its first day at 00:00 UTC to the next month's; December rolls over."""
    december = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    period, start, end = Quota.parse("1000/month").bounds(december)
    assert period == "2026-12"
    assert start == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert end == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    day = Quota(5, "day").bounds(datetime(2028, 2, 29, 12, tzinfo=UTC).timestamp())
    assert day[0] == "2028-02-29"
    assert day[2] - day[1] == 86400


def test_each_tier_takes_limits_from_the_nearest_tier_at_or_below_it() -> None:
    """early carries free's limits, enterprise keeps business's quota, internal is unlimited."""
    policy = saas_policy()
    free, early = policy.limits_for_tier(Tier.FREE), policy.limits_for_tier("early")
    assert free == early
    assert free.rates == (Rate(60, "minute"),)
    enterprise = policy.limits_for_tier(Tier.ENTERPRISE)
    assert [r.to_data() for r in enterprise.rates] == ["100/second", "20000/hour"]
    assert enterprise.quotas["agent_runs"] == Quota(50000, "month")
    assert enterprise.quotas["exports"] is None  # unlimited
    assert free.quotas["exports"] == Quota(10, "day")
    assert policy.limits_for_tier(Tier.INTERNAL) == TierLimits(
        (), {"agent_runs": None, "exports": None}
    )


def test_a_quota_declared_above_free_only_is_refused() -> None:
    """A quota must be declared for the free tier, so that no tier lacks it."""
    with pytest.raises(ConfigurationError, match="free tier: exports"):
        Policy(
            tier_features={},
            role_permissions={},
            tier_limits={
                "free": {"rate": "1/second"},
                "business": {"quotas": {"exports": "9/day"}},
            },
        )


def test_the_default_policy_declares_no_limits() -> None:
    """Without tier_limits a policy limits nothing (and says so)."""
    assert not Policy.default().has_limits
    assert Policy.default().limits_for_tier(Tier.FREE) == TierLimits()
    assert saas_policy().has_limits


def test_tier_limits_round_trip_through_json_and_toml() -> None:
    """to_mapping() gives the tables back in their normal spelling; TOML loads the same."""
    policy = saas_policy()
    data = policy.to_mapping()
    again = Policy.from_mapping(json.loads(json.dumps(data)))
    assert again.to_mapping() == data
    assert data["tier_limits"]["free"]["rate"] == ["60/minute"]
    toml = tomllib.loads(
        """
        [tier_limits.free]
        rate = "60/minute"
        quotas = { agent_runs = "1000/month", exports = "10/day" }
        [tier_limits.business]
        rate = "600/minute"
        quotas = { agent_runs = "50000/month" }
        [tier_limits.enterprise]
        rate = ["100/second", "20000/hour"]
        quotas = { exports = "unlimited" }
        [tier_limits]
        internal = "unlimited"
        """
    )
    loaded = Policy.from_mapping({**Policy.default().to_mapping(), **toml})
    assert loaded.limits_for_tier("enterprise") == policy.limits_for_tier("enterprise")


def test_the_policy_header_lists_each_rate() -> None:
    """RateLimit-Policy: one quoted name per rate, with its quota and window in seconds."""
    rates = saas_policy().limits_for_tier(Tier.ENTERPRISE).rates
    plan = plans_for("", {Tier.ENTERPRISE: rates})[Tier.ENTERPRISE]
    assert plan.policy == (b"ratelimit-policy", b'"second";q=100;w=1,"hour";q=20000;w=3600')
    assert plan.formats == (b'"second";r=%d;t=%d', b'"hour";r=%d;t=%d')
    assert plans_for("", {Tier.INTERNAL: ()}) == {}  # no rates, no plan: nothing to check


def test_a_rate_table_leaves_out_the_tiers_below_its_first() -> None:
    """A route table naming business applies to business and above only."""
    table = compile_rate_table("route", {"business": "5/minute", "internal": "unlimited"})
    assert set(table) == {Tier.BUSINESS, Tier.ENTERPRISE, Tier.INTERNAL}
    assert table[Tier.ENTERPRISE] == (Rate(5, "minute"),)
    assert table[Tier.INTERNAL] == ()


@pytest.mark.parametrize(
    "tier_limits",
    [
        {"gold": {"rate": "1/second"}},
        {"free": {"rate": "60/fortnight"}},
        {"free": {"rate": "-1/minute"}},
        {"free": {"rate": "0/minute"}},
        {"free": {"rate": ["1/minute", "2/minute"]}},
        {"free": {"rate": []}},
        {"free": {"rate": {"limit": 1}}},
        {"free": {"quotas": {"runs": "10/week"}}},
        {"free": {"quotas": {"bad name": "10/day"}}},
        {"free": {"quotas": ["runs"]}},
        {"free": {"burst": 3}},
        {"free": "lots"},
        ["free"],
    ],
)
def test_bad_limit_tables_raise_configuration_error(tier_limits: Any) -> None:
    """Unknown tiers, units and keys, non-positive numbers and repeated windows are refused."""
    with pytest.raises(ConfigurationError):
        Policy(tier_features={}, role_permissions={}, tier_limits=tier_limits)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Rate(True, 60),  # type: ignore[arg-type]
        lambda: Rate(10, 0),
        lambda: Rate(10, "minute", burst=0),
        lambda: Quota(-1, "day"),
        lambda: Quota(1, "year"),
    ],
)
def test_bad_rates_and_quotas_raise_configuration_error(build: Any) -> None:
    """A Rate or Quota checks its own numbers and units."""
    with pytest.raises(ConfigurationError):
        build()
