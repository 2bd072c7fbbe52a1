"""Against a certified OpenID provider (node-oidc-provider on 127.0.0.1): discovery, RFC 9068
JWT access tokens of every algorithm, opaque tokens, introspection, revocation, rotation."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from ctxvars_mw import (
    InvalidTokenError,
    JWTAuthenticator,
    OAuth2IntrospectionAuthenticator,
    ServiceUnavailableError,
    Tier,
)
from ctxvars_mw.auth.keys import ecdsa_low_s
from tests.apps.oidc_provider import API, RESOURCE_SERVER, Provider, run_provider
from tests.auth_helpers import bearer, client_for, make_app

INTROSPECTION = "/token/introspection"


@pytest.fixture(scope="module")
def idp() -> Iterator[Provider]:
    """The provider, once for the module."""
    with run_provider() as provider:
        yield provider


def _jwt_auth(idp: Provider, alg: str, **options: Any) -> JWTAuthenticator:
    settings: dict[str, Any] = {
        "audience": f"{API}/{alg.lower()}",
        "required_typ": "at+jwt",
        "roles_claim": "realm_access.roles",
        "tier_claim": "plan",
        "tier_map": {"gold": Tier.ENTERPRISE},
    }
    settings.update(options)
    return JWTAuthenticator.from_issuer(idp.issuer, algorithms=[alg], **settings)


@pytest.fixture
async def introspection(idp: Provider) -> AsyncIterator[OAuth2IntrospectionAuthenticator]:
    """An introspection authenticator for the provider, found by discovery."""
    auth = OAuth2IntrospectionAuthenticator.from_issuer(
        idp.issuer,
        client_id=RESOURCE_SERVER[0],
        client_secret=RESOURCE_SERVER[1],
        cache_ttl=0,
        roles_claim="realm_access.roles",
    )
    yield auth
    await auth.aclose()


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
async def test_client_credentials_jwts_of_every_algorithm_verify(idp: Provider, alg: str) -> None:
    """A typ at+jwt token from the client credentials grant verifies through discovery, with
    the client as caller, scopes, Keycloak-style roles and the plan mapped to a tier."""
    auth = _jwt_auth(idp, alg)
    identity = await auth.verify(await idp.token(f"{API}/{alg.lower()}", "api:read api:write"))
    assert identity.user_id == "service-a"
    assert identity.client_id == "service-a"
    assert identity.scopes == {"api:read", "api:write"}
    assert identity.roles == {"user"}
    assert identity.tier is Tier.ENTERPRISE
    assert identity.claims["realm_access"] == {"roles": ("user",)}
    assert auth.jwks is not None
    assert auth.jwks.url == f"{idp.issuer}/jwks"


async def test_discovery_reads_the_document_with_the_key_set_once(idp: Provider) -> None:
    """Many tokens: one metadata fetch and one JWKS fetch; the issuer is enforced exactly."""
    auth = _jwt_auth(idp, "ES256")
    before = await idp.hits("/.well-known/openid-configuration"), await idp.hits("/jwks")
    for _ in range(5):
        await auth.verify(await idp.token(f"{API}/es256"))
    after = await idp.hits("/.well-known/openid-configuration"), await idp.hits("/jwks")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    wrong = JWTAuthenticator.from_issuer(f"{idp.issuer}/", algorithms=["ES256"])
    with pytest.raises(ServiceUnavailableError):  # the document names the issuer without "/"
        await wrong.verify(await idp.token(f"{API}/es256"))


async def test_es256_tokens_verify_whatever_s_the_provider_chose(idp: Provider) -> None:
    """The provider signs with high and low s alike (OpenSSL); every token verifies."""
    auth = _jwt_auth(idp, "ES256")
    tokens = [await idp.token(f"{API}/es256") for _ in range(24)]
    high = 0
    for token in tokens:
        signature = base64.urlsafe_b64decode(token.rsplit(".", 1)[1] + "==")
        high += ecdsa_low_s("ES256", signature) is not None
        assert (await auth.verify(token)).user_id == "service-a"
    assert 0 < high < len(tokens)  # both spellings occur (all on one side: 1 run in 8 million)


async def test_jwt_with_the_wrong_audience_is_refused(idp: Provider) -> None:
    """A token for another resource server is a 401."""
    auth = _jwt_auth(idp, "RS256", audience=f"{API}/es256")
    with pytest.raises(InvalidTokenError, match="audience"):
        await auth.verify(await idp.token(f"{API}/rs256"))


async def test_opaque_token_is_introspected_with_client_id_as_the_caller(
    idp: Provider, introspection: OAuth2IntrospectionAuthenticator
) -> None:
    """An opaque client credentials token (no sub) maps to the client as the user."""
    identity = await introspection.verify(await idp.token(f"{API}/opaque", "api:write"))
    assert identity.user_id == "service-a"
    assert identity.client_id == "service-a"
    assert identity.scopes == {"api:write"}
    assert identity.roles == {"user"}
    assert identity.auth_method == "oauth2"
    assert introspection.introspection_url == f"{idp.issuer}{INTROSPECTION}"


async def test_revoked_token_is_401(
    idp: Provider, introspection: OAuth2IntrospectionAuthenticator
) -> None:
    """Once revoked at the provider, the token introspects inactive: 401."""
    token = await idp.token(f"{API}/opaque")
    assert await introspection.verify(token)
    await idp.revoke(token)
    with pytest.raises(InvalidTokenError, match="not active"):
        await introspection.verify(token)


async def test_jwt_sent_to_introspection_is_401_cached_after_one_call(
    idp: Provider, introspection: OAuth2IntrospectionAuthenticator, caplog: pytest.LogCaptureFixture
) -> None:
    """The provider's 400 unsupported_token_type refuses the token: 401, asked once, no
    ERROR line."""
    token = await idp.token(f"{API}/rs256")
    before = await idp.hits(INTROSPECTION)
    with caplog.at_level(logging.DEBUG, logger="ctxvars_mw.auth"):
        for _ in range(5):
            with pytest.raises(InvalidTokenError, match="refused"):
                await introspection.verify(token)
    assert await idp.hits(INTROSPECTION) - before == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert token not in caplog.text


async def test_wrong_client_secret_is_a_503_with_a_clear_log_line(
    idp: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    """The provider refusing our credentials is our configuration: 503, logged as such."""
    auth = OAuth2IntrospectionAuthenticator.from_issuer(
        idp.issuer, client_id=RESOURCE_SERVER[0], client_secret="wrong"
    )
    token = await idp.token(f"{API}/opaque")
    with (
        caplog.at_level(logging.ERROR, logger="ctxvars_mw.auth"),
        pytest.raises(ServiceUnavailableError),
    ):
        await auth.verify(token)
    await auth.aclose()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1
    assert "client credentials" in lines[0]
    assert "invalid_client" in lines[0]


async def test_through_the_middleware(
    idp: Provider, introspection: OAuth2IntrospectionAuthenticator
) -> None:
    """A provider's JWT is a 200 with the caller's context; revoked opaque token a 401."""
    jwt_app = make_app(authenticator=_jwt_auth(idp, "ES256"), require_authentication=True)
    opaque_app = make_app(authenticator=introspection, require_authentication=True)
    revoked = await idp.token(f"{API}/opaque")
    await idp.revoke(revoked)
    async with client_for(jwt_app) as client:
        ok = await client.get("/whoami", headers=bearer(await idp.token(f"{API}/es256")))
    async with client_for(opaque_app) as client:
        refused = await client.get("/whoami", headers=bearer(revoked))
    assert ok.status_code == 200
    assert ok.json()["user_id"] == "service-a"
    assert ok.json()["tier"] == "enterprise"
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_token"


async def test_rotated_out_key_stops_authenticating_its_cached_tokens(idp: Provider) -> None:
    """After the provider rotates its keys, a token cached under the old key is refused
    once the key set's TTL has passed (refreshed in the background by the hits), and tokens
    of the new key verify."""
    auth = _jwt_auth(idp, "RS256", jwks_cache_ttl=0.3, jwks_min_refresh_interval=0.05)
    old = await idp.token(f"{API}/rs256")
    assert await auth.verify(old)
    assert await auth.verify(old)  # a cache hit
    await idp.rotate()
    await asyncio.sleep(0.35)
    refused = False
    for _ in range(50):  # the first hit past the TTL starts the refetch
        try:
            await auth.verify(old)
        except InvalidTokenError:
            refused = True
            break
        await asyncio.sleep(0.02)
    assert refused
    new = await idp.token(f"{API}/rs256")
    assert (await auth.verify(new)).user_id == "service-a"
    with pytest.raises(InvalidTokenError, match="unknown"):
        await auth.verify(old)


async def test_a_client_credentials_caller_is_a_service_caller_in_its_context(
    idp: Provider, introspection: OAuth2IntrospectionAuthenticator
) -> None:
    """Through the middleware, an opaque client-credentials token gives a context whose user
    is the client (``client_id == user_id``), with its scopes visible on their own."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ctxvars_mw import ContextMiddleware, get_context

    async def caller(request: Request) -> JSONResponse:
        ctx = get_context()
        return JSONResponse(
            {
                "user_id": ctx.user_id,
                "client_id": ctx.client_id,
                "scopes": sorted(ctx.scopes),
                "can_write": ctx.has_permission("api:write"),
            }
        )

    app = ContextMiddleware(Starlette(routes=[Route("/", caller)]), authenticator=introspection)
    token = await idp.token(f"{API}/opaque", "api:write")
    async with client_for(app) as client:
        seen = (await client.get("/", headers=bearer(token))).json()
    assert seen == {
        "user_id": "service-a",
        "client_id": "service-a",
        "scopes": ["api:write"],
        "can_write": True,
    }
