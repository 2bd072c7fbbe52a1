"""Claims shaped as identity providers shape them: claim paths, tier names, the hook."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytest

from ctxvars_mw import ConfigurationError, InvalidTokenError, JWTAuthenticator, Tier
from ctxvars_mw.auth.mapping import lookup, parse_path
from tests.auth_helpers import AUDIENCE, SECRET, USER, bearer, claims, client_for, make_app, sign


def _auth(**options: Any) -> JWTAuthenticator:
    return JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE, **options)


KEYCLOAK = {
    "realm_access": {"roles": ["user", "offline_access"]},
    "resource_access": {"my-api": {"roles": ["reader"]}, "account": {"roles": ["manage"]}},
    "azp": "my-frontend",
}


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("sub", ("sub",)),
        ("realm_access.roles", ("realm_access", "roles")),
        ("resource_access.my-api.roles", ("resource_access", "my-api", "roles")),
        ("[https://example.com/roles]", ("https://example.com/roles",)),
        ("[https://example.com/app].plan", ("https://example.com/app", "plan")),
        ("cognito:groups", ("cognito:groups",)),
    ],
)
def test_claim_paths_parse_into_segments(path: str, segments: tuple[str, ...]) -> None:
    """Dots separate segments; a bracketed segment may hold dots."""
    assert parse_path("roles_claim", path) == segments


@pytest.mark.parametrize(
    "path", ["", "a..b", "a.", ".a", "[a", "a]", "[]", "a[b]", "https://example.com/roles"]
)
def test_malformed_claim_paths_are_refused(path: str) -> None:
    """A path that cannot mean one claim (or a URL outside brackets) is a ConfigurationError."""
    with pytest.raises(ConfigurationError):
        parse_path("roles_claim", path)


def test_lookup_treats_a_missing_object_on_the_way_as_absent() -> None:
    """A path through a missing or non-object member finds nothing, rather than failing."""
    payload = {"a": {"b": 1}, "s": "text"}
    assert lookup(payload, ("a", "b")) == 1
    assert lookup(payload, ("a", "x")) is None
    assert lookup(payload, ("s", "x")) is None
    assert lookup(payload, ("missing", "x")) is None


async def test_keycloak_realm_and_client_roles_are_read_and_joined() -> None:
    """roles_claim may name several paths: realm roles and one client's roles together;
    azp becomes Identity.client_id; scopes stay apart."""
    auth = _auth(roles_claim=["realm_access.roles", "resource_access.my-api.roles"])
    identity = await auth.verify(sign(claims(scope="profile email", **KEYCLOAK)))
    assert identity.roles == {"user", "offline_access", "reader"}
    assert identity.client_id == "my-frontend"
    assert identity.scopes == {"profile", "email"}
    assert identity.permissions == frozenset()


async def test_auth0_url_named_claims_are_read_in_brackets() -> None:
    """Auth0 namespaces custom claims as URLs: brackets name them, even nested ones."""
    token = sign(
        claims(
            **{
                "https://example.com/roles": ["admin"],
                "https://example.com/app": {"plan": "gold"},
                "permissions": ["invoices:read"],
            }
        )
    )
    auth = _auth(
        roles_claim="[https://example.com/roles]",
        tier_claim="[https://example.com/app].plan",
        tier_map={"gold": Tier.ENTERPRISE},
    )
    identity = await auth.verify(token)
    assert identity.roles == {"admin"}
    assert identity.tier is Tier.ENTERPRISE
    assert identity.permissions == {"invoices:read"}


async def test_a_nested_claim_of_the_wrong_type_refuses_the_token() -> None:
    """realm_access.roles that is not a list of strings is a 401 naming the path."""
    auth = _auth(roles_claim="realm_access.roles")
    with pytest.raises(InvalidTokenError, match=r"realm_access\.roles"):
        await auth.verify(sign(claims(realm_access={"roles": "admin"})))
    assert (await auth.verify(sign(claims(realm_access="odd")))).roles == frozenset()


async def test_tier_map_turns_plan_names_into_tiers() -> None:
    """Mapped names give their tier; a tier's own value still works; an unmapped name gives
    no tier instead of refusing the token; a list of names gives the highest."""
    auth = _auth(tier_claim="plan", tier_map={"gold": Tier.ENTERPRISE, "silver": "business"})
    assert (await auth.verify(sign(claims(plan="gold")))).tier is Tier.ENTERPRISE
    assert (await auth.verify(sign(claims(plan="silver")))).tier is Tier.BUSINESS
    assert (await auth.verify(sign(claims(plan="early")))).tier is Tier.EARLY
    assert (await auth.verify(sign(claims(plan="bronze")))).tier is None
    groups = sign(claims(plan=["staff", "silver", "gold"]))
    assert (await auth.verify(groups)).tier is Tier.ENTERPRISE
    with pytest.raises(InvalidTokenError, match="tier"):
        await auth.verify(sign(claims(plan=7)))


async def test_without_tier_map_an_unknown_tier_is_still_refused() -> None:
    """With no map configured, a tier value that is no tier is a 401, as before."""
    with pytest.raises(InvalidTokenError, match="tier is unknown"):
        await _auth().verify(sign(claims(tier="gold")))


async def test_claims_mapper_sets_tier_roles_and_permissions() -> None:
    """The hook gets the verified, frozen claims and its answer replaces what the claim
    options found; None keeps them."""
    seen: list[Mapping[str, Any]] = []

    def mapper(verified: Mapping[str, Any]) -> Mapping[str, Any] | None:
        seen.append(verified)
        groups = verified.get("groups", ())
        if "skip" in groups:
            return None
        return {
            "tier": "gold" if "paying" in groups else Tier.FREE,
            "roles": ["admin"] if "ops" in groups else [],
            "permissions": {f"group:{g}" for g in groups},
        }

    auth = _auth(claims_mapper=mapper, tier_map={"gold": Tier.ENTERPRISE})
    identity = await auth.verify(sign(claims(groups=["paying", "ops"], roles=["user"])))
    assert identity.tier is Tier.ENTERPRISE
    assert identity.roles == {"admin"}
    assert identity.permissions == {"group:paying", "group:ops"}
    kept = await auth.verify(sign(claims(groups=["skip"], roles=["user"])))
    assert kept.roles == {"user"}
    with pytest.raises(TypeError):
        seen[0]["groups"] = ()  # type: ignore[index]


async def test_a_failing_or_wrong_hook_refuses_the_token_with_a_logged_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hook that raises or answers nonsense fails closed (401) and is logged by type, not
    by its message; a hook raising InvalidTokenError refuses the token with its reason."""

    def broken(verified: Mapping[str, Any]) -> Mapping[str, Any]:
        raise KeyError(verified["sub"])

    def refusing(verified: Mapping[str, Any]) -> Mapping[str, Any]:
        raise InvalidTokenError("This caller is suspended.")

    with caplog.at_level(logging.ERROR, logger="ctxvars_mw.auth"):
        for mapper in (broken, lambda c: {"tierr": "gold"}, lambda c: {"roles": "admin"}):
            with pytest.raises(InvalidTokenError, match="could not be mapped"):
                await _auth(claims_mapper=mapper).verify(sign(claims()))
    assert len(caplog.records) == 3
    assert USER not in caplog.text
    with pytest.raises(InvalidTokenError, match="suspended"):
        await _auth(claims_mapper=refusing).verify(sign(claims()))


async def test_mapped_identity_reaches_the_context() -> None:
    """Through the middleware: nested roles grant the policy's permissions, the mapped tier
    its features."""
    auth = _auth(roles_claim="realm_access.roles", tier_claim="plan", tier_map={"gold": "business"})
    app = make_app(authenticator=auth)
    token = sign(claims(realm_access={"roles": ["user"]}, plan="gold"))
    async with client_for(app) as client:
        body = (await client.get("/whoami", headers=bearer(token))).json()
    assert body["tier"] == "business"
    assert body["roles"] == ["user"]
    assert "agents:execute" in body["permissions"]
    assert "api_access" in body["features"]
