"""OAuth2IntrospectionAuthenticator against a real RFC 7662 endpoint (uvicorn, 127.0.0.1)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from ctxvars_mw import (
    ConfigurationError,
    ExpiredTokenError,
    InvalidTokenError,
    OAuth2IntrospectionAuthenticator,
    ServiceUnavailableError,
    Tier,
)
from tests.apps.auth_server import CLIENT_ID, CLIENT_SECRET
from tests.auth_helpers import USER, auth_server, bearer, client_for, control, make_app

__all__ = ["auth_server", "control"]  # fixtures used here

Factory = Callable[..., OAuth2IntrospectionAuthenticator]


class Clock:
    """A settable Unix clock."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make(auth_server: str) -> AsyncIterator[Factory]:
    """Build authenticators for the local endpoint; each is closed after the test."""
    made: list[OAuth2IntrospectionAuthenticator] = []

    def factory(**options: Any) -> OAuth2IntrospectionAuthenticator:
        settings: dict[str, Any] = {
            "introspection_url": f"{auth_server}/introspect",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
        settings.update(options)
        auth = OAuth2IntrospectionAuthenticator(**settings)
        made.append(auth)
        return auth

    yield factory
    for auth in made:
        await auth.aclose()


async def _register(control: httpx.AsyncClient, **tokens: Any) -> None:
    await control.post("/control/tokens", json=tokens)


async def _hits(control: httpx.AsyncClient) -> int:
    return int((await control.get("/control/hits")).json()["introspect"])


def _active(**extra: Any) -> dict[str, Any]:
    return {"active": True, "sub": USER, "exp": int(time.time()) + 600, **extra}


async def test_active_token_maps_to_an_identity(make: Factory, control: httpx.AsyncClient) -> None:
    """An active answer becomes an oauth2 identity with scopes, tier and roles."""
    await _register(
        control, opaque1=_active(scope="invoices:read invoices:write", tier="early", roles=["user"])
    )
    identity = await make().verify("opaque1")
    assert identity.user_id == USER
    assert identity.auth_method == "oauth2"
    assert identity.scopes == {"invoices:read", "invoices:write"}
    assert identity.tier is Tier.EARLY
    assert identity.roles == {"user"}


async def test_inactive_and_unknown_tokens_are_401_and_negatively_cached(
    make: Factory, control: httpx.AsyncClient
) -> None:
    """active:false is a 401; repeating the token is answered from the negative cache."""
    await _register(control, revoked={"active": False, "sub": USER})
    auth = make()
    for token in ("revoked", "never-issued"):
        for _ in range(3):
            with pytest.raises(InvalidTokenError, match="not active"):
                await auth.verify(token)
    assert await _hits(control) == 2


async def test_positive_cache_never_outlives_exp(make: Factory, control: httpx.AsyncClient) -> None:
    """An active token is cached for cache_ttl but never past its exp."""
    clock = Clock()
    await _register(control, short=_active(exp=int(clock.now) + 5))
    auth = make(cache_ttl=60, clock=clock)
    first = await auth.verify("short")
    assert await auth.verify("short") is first
    assert await _hits(control) == 1
    clock.now += 6
    with pytest.raises(ExpiredTokenError):
        await auth.verify("short")
    assert await _hits(control) == 2


async def test_negative_cache_is_bounded(make: Factory, control: httpx.AsyncClient) -> None:
    """With negative_cache_size=2, the oldest refusal is forgotten and asked again."""
    auth = make(negative_cache_size=2)
    for token in ("bad-a", "bad-b", "bad-c", "bad-a"):
        with pytest.raises(InvalidTokenError):
            await auth.verify(token)
    assert await _hits(control) == 4


@pytest.mark.parametrize("failure", ["error", "slow", "not-json"])
async def test_endpoint_failures_are_503_and_not_cached(
    make: Factory, control: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """A 5xx, a timeout or a non-JSON answer fail closed with 503, and are retried next time."""
    await _register(control, flaky=failure)
    auth = make(timeout=0.5)
    with caplog.at_level(logging.ERROR, logger="ctxvars_mw.auth"):
        for _ in range(2):
            with pytest.raises(ServiceUnavailableError):
                await auth.verify("flaky")
    assert await _hits(control) == 2
    assert "flaky" not in caplog.text
    assert len([r for r in caplog.records if "introspection" in r.getMessage()]) == 2


async def test_wrong_client_credentials_are_a_503(
    make: Factory, control: httpx.AsyncClient
) -> None:
    """If the server refuses our client credentials, requests fail closed (503), not 401."""
    await _register(control, opaque1=_active())
    assert await make().verify("opaque1")
    with pytest.raises(ServiceUnavailableError):
        await make(client_secret="wrong").verify("opaque1")


async def test_audience_and_issuer_are_checked_when_configured(
    make: Factory, control: httpx.AsyncClient
) -> None:
    """issuer/audience options must match the introspection answer."""
    await _register(control, t1=_active(aud=["api-a"], iss="https://as.test"))
    assert await make(audience="api-a", issuer="https://as.test").verify("t1")
    with pytest.raises(InvalidTokenError, match="audience"):
        await make(audience="api-b").verify("t1")
    assert await make().verify("t1")  # no audience configured: aud is not held against it


async def test_through_the_middleware(make: Factory, control: httpx.AsyncClient) -> None:
    """200 with the identity, 401 with WWW-Authenticate when inactive, 503 when down."""
    await _register(control, good=_active(roles=["readonly"]), down="error")
    app = make_app(authenticator=make(), require_authentication=True)
    async with client_for(app) as client:
        ok = await client.get("/whoami", headers=bearer("good"))
        inactive = await client.get("/whoami", headers=bearer("nope"))
        down = await client.get("/whoami", headers=bearer("down"))
    assert ok.status_code == 200
    assert ok.json()["auth_method"] == "oauth2"
    assert "threads:read" in ok.json()["permissions"]
    assert inactive.status_code == 401
    assert inactive.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert down.status_code == 503
    assert down.headers["retry-after"] == "5"


@pytest.mark.parametrize(
    "options",
    [
        {"introspection_url": "http://as.example.com/introspect"},
        {"introspection_url": "not a url"},
        {"client_id": ""},
        {"client_secret": None},
        {"cache_ttl": -1},
        {"negative_cache_size": -1},
        {"timeout": 0},
    ],
)
def test_bad_options_raise_configuration_error(options: dict[str, Any]) -> None:
    """Misconfiguration fails at construction."""
    settings: dict[str, Any] = {
        "introspection_url": "https://as.example.com/introspect",
        "client_id": "rs",
        "client_secret": "secret",
    }
    settings.update(options)
    with pytest.raises(ConfigurationError):
        OAuth2IntrospectionAuthenticator(**settings)
