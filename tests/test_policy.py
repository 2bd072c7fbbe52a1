"""Policy: roles → permissions with inheritance, tiers → cumulative features, validation."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ctxvars_mw import ConfigurationError, Policy, Tier

from .authz_tables import FEATURE_TIER, ROLE_HOLDS

AUTHORIZATION_DOCS = Path(__file__).resolve().parent.parent / "docs" / "authorization.md"

# The tables of API.md §5, written out independently of ctxvars_mw/policy.py (shared with
# the other authorization tests in tests/authz_tables.py).
ROLE_PERMISSIONS = {role: set(held) for role, held in ROLE_HOLDS.items() if role != "none"}
TIER_FEATURES = {
    tier: {feature for feature, lowest in FEATURE_TIER.items() if lowest <= tier} for tier in Tier
}


def small(**overrides: Any) -> dict[str, Any]:
    """A small valid policy mapping, with ``overrides`` applied."""
    data: dict[str, Any] = {
        "tier_features": {"free": ["chat"], "business": ["api_access"]},
        "role_permissions": {"viewer": ["docs:read"], "editor": ["docs:write"]},
        "role_inherits": {"editor": ["viewer"]},
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize("role", sorted(ROLE_PERMISSIONS))
def test_default_role_permissions_match_the_contract(role: str) -> None:
    """Each default role grants exactly the contract's permissions, inherited ones included."""
    assert Policy.default().permissions_for_role(role) == ROLE_PERMISSIONS[role]


@pytest.mark.parametrize("tier", list(Tier))
def test_default_tier_features_are_cumulative(tier: Tier) -> None:
    """Each tier unlocks exactly the contract's features, those of lower tiers included."""
    assert Policy.default().features_for_tier(tier) == TIER_FEATURES[tier]


def test_default_counts_match_the_contract() -> None:
    """readonly/user/admin hold 2/5/13 permissions; the tiers 3/5/7/16/18 features."""
    policy = Policy.default()
    assert [len(policy.permissions_for_role(r)) for r in ("readonly", "user", "admin")] == [
        2,
        5,
        13,
    ]
    assert [len(policy.features_for_tier(t)) for t in Tier] == [3, 5, 7, 16, 18]


def test_resolve_unions_the_roles_and_gives_the_tier_features() -> None:
    """resolve(roles, tier) returns (union of the roles' permissions, the tier's features)."""
    perms, features = Policy.default().resolve(["readonly", "user"], "enterprise")
    assert perms == ROLE_PERMISSIONS["user"]
    assert features == TIER_FEATURES[Tier.ENTERPRISE]


def test_unknown_role_grants_nothing() -> None:
    """Deny by default: a role the policy does not know adds no permission."""
    perms, _ = Policy.default().resolve({"superuser", "root"}, Tier.FREE)
    assert perms == frozenset()
    assert Policy.default().permissions_for_role("superuser") == frozenset()


def test_resolve_is_stable_across_calls_and_input_types() -> None:
    """A list, a set and a frozenset of the same roles resolve to equal results."""
    policy = Policy.default()
    first = policy.resolve(["user"], Tier.EARLY)
    assert policy.resolve({"user"}, "early") == first
    assert policy.resolve(frozenset({"user"}), Tier.EARLY) == first


def test_from_mapping_builds_inheritance_and_cumulative_features() -> None:
    """A plain mapping gives inherited permissions and features that accumulate up the tiers."""
    policy = Policy.from_mapping(small())
    assert policy.permissions_for_role("editor") == {"docs:read", "docs:write"}
    assert policy.features_for_tier("early") == {"chat"}
    assert policy.features_for_tier(Tier.INTERNAL) == {"chat", "api_access"}


def test_policy_loads_from_json_and_toml() -> None:
    """The same policy written as JSON and as TOML loads into equal policies."""
    from_json = Policy.from_mapping(json.loads(json.dumps(small())))
    toml_text = """
[tier_features]
free = ["chat"]
business = ["api_access"]
[role_permissions]
viewer = ["docs:read"]
editor = ["docs:write"]
[role_inherits]
editor = ["viewer"]
"""
    from_toml = Policy.from_mapping(tomllib.loads(toml_text))
    assert from_json.to_mapping() == from_toml.to_mapping()
    assert from_toml.resolve({"editor"}, "free") == from_json.resolve({"editor"}, "free")


def test_to_mapping_round_trips_and_is_a_copy() -> None:
    """to_mapping() loads back into an equivalent policy; mutating it leaves the policy alone."""
    policy = Policy.default()
    data = policy.to_mapping()
    again = Policy.from_mapping(json.loads(json.dumps(data)))
    assert again.to_mapping() == data
    data["role_permissions"]["readonly"].append("billing:manage")
    assert "billing:manage" not in policy.to_mapping()["role_permissions"]["readonly"]
    assert policy.permissions_for_role("readonly") == ROLE_PERMISSIONS["readonly"]


def test_wildcard_permissions_are_accepted_in_roles() -> None:
    """Roles may grant ``resource:*`` and ``*``; the context's has_permission expands them."""
    policy = Policy(
        tier_features={},
        role_permissions={"operator": ["agents:*"], "root": ["*"]},
    )
    assert policy.permissions_for_role("operator") == {"agents:*"}
    assert policy.permissions_for_role("root") == {"*"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tier_features": {"platinum": ["x"]}}, "unknown tier"),
        ({"role_inherits": {"editor": ["ghost"]}}, "unknown role"),
        ({"role_inherits": {"editor": ["viewer"], "viewer": ["editor"]}}, "cycle"),
        ({"role_inherits": {"viewer": ["viewer"]}}, "cycle"),
        ({"role_permissions": {"viewer": "docs:read"}}, "list of strings"),
        ({"role_permissions": {"viewer": ["docs read"]}}, "without whitespace"),
        ({"role_permissions": {"viewer": [""]}}, "non-empty"),
        ({"role_permissions": {"viewer": [3]}}, "non-empty"),
        ({"role_permissions": {"viewer": ["docs::read"]}}, "resource:action"),
        ({"role_permissions": {"viewer": ["*:read"]}}, "resource:action"),
        ({"role_permissions": {"viewer": ["docs:re*d"]}}, "resource:action"),
        ({"role_permissions": {"": ["docs:read"]}}, "role names"),
        ({"tier_features": {"free": ["a b"]}}, "without whitespace"),
        ({"tier_features": ["free"]}, "mappings"),
        ({"role_inherits": ["editor"]}, "role_inherits must be a mapping"),
        ({"roles": {}}, "unknown policy key"),
    ],
)
def test_invalid_policies_are_refused_at_construction(change: dict[str, Any], message: str) -> None:
    """Unknown tiers/roles, cycles and malformed names raise ConfigurationError when built."""
    with pytest.raises(ConfigurationError, match=message):
        Policy.from_mapping(small(**change))


def test_from_mapping_refuses_a_non_mapping() -> None:
    """Policy.from_mapping() of a list is a ConfigurationError, not a crash later."""
    with pytest.raises(ConfigurationError):
        Policy.from_mapping([("tier_features", {})])  # type: ignore[arg-type]


def test_diamond_inheritance_unions_each_parent_once() -> None:
    """A role inheriting two roles that share a parent gets the union of all of them."""
    policy = Policy(
        tier_features={},
        role_permissions={"base": ["a:read"], "left": ["b:read"], "right": ["c:read"], "top": []},
        role_inherits={"left": ["base"], "right": ["base"], "top": ["left", "right"]},
    )
    assert policy.permissions_for_role("top") == {"a:read", "b:read", "c:read"}


def _docs_table(heading: str) -> dict[str, int]:
    section = AUTHORIZATION_DOCS.read_text().split("## The default policy", 1)[1]
    table = section.split(heading, 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `?(\w+)`? \|.*\| (\d+) \|$", table, re.M)
    return {name: int(count) for name, count in rows}


def test_documented_tables_match_the_default_policy() -> None:
    """docs/authorization.md's tables list the default policy's counts per role and tier."""
    policy = Policy.default()
    roles = _docs_table("| role |")
    assert roles == {r: len(policy.permissions_for_role(r)) for r in ("readonly", "user", "admin")}
    tiers = _docs_table("| tier |")
    assert tiers == {t.value: len(policy.features_for_tier(t)) for t in Tier}


def _docs_adds(heading: str) -> dict[str, set[str]]:
    section = AUTHORIZATION_DOCS.read_text().split("## The default policy", 1)[1]
    table = section.split(heading, 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    return {row[0].strip(" `"): set(re.findall(r"`([^`]+)`", row[-2])) for row in rows}


def test_documented_tables_name_what_each_role_and_tier_adds() -> None:
    """Each documented row names exactly the permissions or features it adds to the one below."""
    policy = Policy.default()
    below: dict[str, str | None] = {"readonly": None, "user": "readonly", "admin": "user"}
    for role, added in _docs_adds("| role |").items():
        inherited = policy.permissions_for_role(below[role]) if below[role] else frozenset()
        assert added == policy.permissions_for_role(role) - inherited
    tiers = list(Tier)
    for tier, added in _docs_adds("| tier |").items():
        rank = tiers.index(Tier(tier))
        lower = policy.features_for_tier(tiers[rank - 1]) if rank else frozenset()
        assert added == policy.features_for_tier(tier) - lower
