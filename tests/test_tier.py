"""Tier: the order, and tier names taken exactly (claims, policy files, decorators)."""

from __future__ import annotations

import itertools

import pytest

from ctxvars_mw import (
    ConfigurationError,
    PermissionDeniedError,
    Policy,
    Tier,
    UserExecutionContext,
    requires_tier,
    use_context,
)
from ctxvars_mw.auth import JWTAuthenticator
from tests.auth_helpers import AUDIENCE, SECRET, bearer, claims, client_for, make_app, sign

MISSPELT = ["INTERNAL", "Internal", "Business", "ENTERPRISE", " free", "free ", "ｆｒｅｅ"]


def test_tier_order() -> None:
    """FREE < EARLY < BUSINESS < ENTERPRISE < INTERNAL."""
    order = [Tier.FREE, Tier.EARLY, Tier.BUSINESS, Tier.ENTERPRISE, Tier.INTERNAL]
    assert sorted(reversed(order)) == order
    for low, high in itertools.pairwise(order):
        assert low < high
        assert high > low
        assert low <= high
        assert high >= low
        assert not high < low
    assert max(order) is Tier.INTERNAL
    assert [t.rank for t in order] == [0, 1, 2, 3, 4]


def test_tier_parses_only_its_exact_value() -> None:
    """Tier("business") and Tier.parse("business") give the member; other spellings do not."""
    assert Tier("business") is Tier.BUSINESS
    assert Tier.parse("enterprise") is Tier.ENTERPRISE
    assert Tier.parse(Tier.EARLY) is Tier.EARLY
    for bad in ["gold", *MISSPELT]:
        with pytest.raises(ValueError, match="valid Tier"):
            Tier(bad)
        with pytest.raises(ValueError, match="unknown tier"):
            Tier.parse(bad)
    with pytest.raises(ValueError, match="unknown tier"):
        Tier.parse(3)  # type: ignore[arg-type]


def test_tier_compares_with_exact_names_by_rank_not_alphabetically() -> None:
    """Comparing with a tier name uses the tier order both ways; a misspelt name is a TypeError."""
    assert not Tier.BUSINESS < "early"
    assert Tier.BUSINESS > "early"
    assert "early" < Tier.BUSINESS  # noqa: SIM300 - the reflected direction
    assert Tier.ENTERPRISE >= "enterprise"
    for bad in ("gold", "ENTERPRISE"):
        with pytest.raises(TypeError):
            Tier.FREE < bad  # noqa: B015, SIM300
    with pytest.raises(TypeError):
        Tier.FREE < 3  # type: ignore[operator]  # noqa: B015


@pytest.mark.parametrize("value", ["INTERNAL", "Enterprise", "Business"])
async def test_token_with_a_misspelt_tier_claim_is_a_401(value: str) -> None:
    """A signed token whose tier claim is not an exact tier value is refused: 401, tier unknown."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    async with client_for(make_app(authenticator=auth)) as client:
        refused = await client.get("/whoami", headers=bearer(sign(claims(tier=value))))
        exact = await client.get("/whoami", headers=bearer(sign(claims(tier=value.lower()))))
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_token"
    assert "tier is unknown" in refused.json()["error_description"]
    assert value not in refused.text
    assert exact.status_code == 200


def test_policy_files_and_decorators_take_exact_tier_names() -> None:
    """Policy.from_mapping and requires_tier take "business"; "Business" is a ConfigurationError."""
    policy = Policy.from_mapping(
        {"tier_features": {"free": ["chat"], "business": ["api_access"]}, "role_permissions": {}}
    )
    assert policy.features_for_tier(Tier.BUSINESS) == {"chat", "api_access"}
    with pytest.raises(ConfigurationError, match="unknown tier"):
        Policy.from_mapping({"tier_features": {"Business": ["api_access"]}, "role_permissions": {}})
    with pytest.raises(ConfigurationError, match="requires_tier"):
        requires_tier("Business")

    @requires_tier("business")
    def reports() -> str:
        return "reports"

    with use_context(UserExecutionContext(user_id="user_2hNqYf3kT9xWzL", tier=Tier.ENTERPRISE)):
        assert reports() == "reports"
    with (
        use_context(UserExecutionContext(user_id="user_2hNqYf3kT9xWzL", tier=Tier.EARLY)),
        pytest.raises(PermissionDeniedError),
    ):
        reports()


def test_context_refuses_a_misspelt_tier() -> None:
    """UserExecutionContext(tier="INTERNAL") and from_dict with it are refused, not promoted."""
    from ctxvars_mw import InvalidContextError

    with pytest.raises(InvalidContextError):
        UserExecutionContext(user_id="user_2hNqYf3kT9xWzL", tier="INTERNAL")  # type: ignore[arg-type]
    good = UserExecutionContext(user_id="user_2hNqYf3kT9xWzL", tier="internal")  # type: ignore[arg-type]
    assert good.tier is Tier.INTERNAL
    data = good.to_dict() | {"tier": "INTERNAL"}
    with pytest.raises(InvalidContextError):
        UserExecutionContext.from_dict(data)
