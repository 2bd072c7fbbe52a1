"""ctxvars_mw.testing: realistic context factories and really signed test tokens."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ctxvars_mw import Policy, Tier, UserExecutionContext, get_context, get_context_or_none
from ctxvars_mw.testing import (
    concurrent_contexts,
    context_chain,
    context_scope,
    make_context,
    mint_token,
    realistic_user_id,
    tier_contexts,
)

SECRET = "a-test-secret-of-at-least-thirty-two-bytes-long"


def test_make_context_resolves_the_policy_for_the_tier_and_roles() -> None:
    """Permissions and features are exactly what the policy grants the roles at the tier."""
    ctx = make_context(Tier.EARLY, roles=["readonly"])
    assert ctx.permissions == {"threads:read", "agents:read"}
    assert ctx.features == Policy.default().features_for_tier(Tier.EARLY)
    assert ctx.is_authenticated
    assert ctx.auth_method == "jwt"
    assert ctx.session_id


def test_make_context_accepts_a_custom_policy_and_fields() -> None:
    """A custom policy decides the grants; extra fields pass through to the context."""
    policy = Policy(tier_features={"free": ["chat"]}, role_permissions={"bot": ["x:run"]})
    ctx = make_context("free", roles=["bot"], policy=policy, trace_id="a" * 32)
    assert ctx.permissions == {"x:run"}
    assert ctx.features == {"chat"}
    assert ctx.trace_id == "a" * 32


@pytest.mark.parametrize("provider", ["auth0", "google-oauth2", "uuid"])
def test_realistic_user_ids_are_accepted_by_the_context(provider: str) -> None:
    """Every realistic id shape passes the placeholder rules and is fresh each call."""
    first, second = realistic_user_id(provider), realistic_user_id(provider)
    assert first != second
    assert UserExecutionContext(user_id=first).user_id == first


def test_tier_contexts_cover_the_five_tiers_in_order() -> None:
    """One context per tier, keyed by value, in tier order."""
    contexts = tier_contexts()
    assert [Tier(k) for k in contexts] == list(Tier)
    assert all(ctx.tier.value == key for key, ctx in contexts.items())


def test_concurrent_contexts_refuses_a_negative_count() -> None:
    """A negative count is a ValueError, zero is an empty list."""
    assert concurrent_contexts(0) == []
    with pytest.raises(ValueError, match="count"):
        concurrent_contexts(-1)


def test_context_chain_links_each_child_to_its_parent() -> None:
    """Each child's parent_request_id is its parent's request id; depth counts up."""
    chain = context_chain(make_context(), 3)
    assert [c.operation for c in chain] == [None, "step.1", "step.2", "step.3"]
    assert chain[3].parent_request_id == chain[2].request_id


async def test_context_scope_restores_the_previous_context() -> None:
    """Nested scopes restore the outer context, also across an await."""
    outer, inner = make_context(), make_context()
    async with context_scope(outer):
        with context_scope(inner):
            await asyncio.sleep(0)
            assert get_context() is inner
        assert get_context() is outer
    assert get_context_or_none() is None


def test_mint_token_hs256_round_trips_through_pyjwt() -> None:
    """A minted HS256 token verifies with the same secret and carries the context's claims."""
    ctx = make_context(Tier.BUSINESS)
    token = mint_token(SECRET, ctx=ctx, issuer="https://issuer.example", audience="api")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="api")
    assert claims["sub"] == ctx.user_id
    assert claims["tier"] == "business"
    assert claims["roles"] == ["user"]
    assert claims["sid"] == ctx.session_id
    assert claims["iss"] == "https://issuer.example"
    assert claims["exp"] - claims["iat"] == 300


def test_mint_token_signs_with_a_private_key() -> None:
    """An ES256 token minted with a private key verifies with its public key only."""
    key = ec.generate_private_key(ec.SECP256R1())
    token = mint_token(key, user_id=realistic_user_id(), algorithm="ES256", headers={"kid": "k1"})
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    assert jwt.decode(token, key.public_key(), algorithms=["ES256"])["sub"].startswith("auth0|")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            token, ec.generate_private_key(ec.SECP256R1()).public_key(), algorithms=["ES256"]
        )


def test_mint_token_can_mint_an_expired_token() -> None:
    """A negative ``expires_in`` gives a token PyJWT refuses as expired."""
    token = mint_token(SECRET, user_id=realistic_user_id(), expires_in=-60)
    assert jwt.decode(token, options={"verify_signature": False})["exp"] < time.time()
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(token, SECRET, algorithms=["HS256"])


def test_mint_token_needs_a_key_and_a_subject() -> None:
    """No key, or neither user_id nor ctx, is a ValueError (never an unsigned token)."""
    with pytest.raises(ValueError, match="key"):
        mint_token("", user_id=realistic_user_id())
    with pytest.raises(ValueError, match="user_id"):
        mint_token(SECRET)
