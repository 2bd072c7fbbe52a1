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


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, "unsupported_token_type"), (400, "invalid_request"), (404, "invalid_token")],
)
async def test_a_4xx_with_an_oauth_error_refuses_the_token_and_is_cached(
    make: Factory,
    control: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    status: int,
    error: str,
) -> None:
    """The server refusing the token (a 4xx with an OAuth error body) is a 401, remembered
    as a negative answer: one call, no ERROR line."""
    await _register(control, jwtlike=[status, {"error": error, "error_description": "no"}])
    auth = make()
    with caplog.at_level(logging.DEBUG, logger="ctxvars_mw.auth"):
        for _ in range(3):
            with pytest.raises(InvalidTokenError, match="refused"):
                await auth.verify("jwtlike")
    assert await _hits(control) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "jwtlike" not in caplog.text


@pytest.mark.parametrize(
    "answer",
    [
        [401, {"error": "invalid_client"}],
        [403, {"error": "access_denied"}],
        [400, {"error": "invalid_client"}],
        [400, {"error": "unauthorized_client"}],
    ],
)
async def test_a_refusal_of_our_client_credentials_is_a_503_and_one_clear_line(
    make: Factory, control: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, answer: Any
) -> None:
    """401/403 or invalid_client is about this service's credentials: 503 (not a 401 blamed
    on the caller), one ERROR line naming the cause, not cached."""
    await _register(control, t=answer)
    auth = make()
    with caplog.at_level(logging.ERROR, logger="ctxvars_mw.auth"):
        for _ in range(2):
            with pytest.raises(ServiceUnavailableError):
                await auth.verify("t")
    assert await _hits(control) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all("client credentials" in line for line in lines)


@pytest.mark.parametrize(
    "answer",
    [
        [404, "<html>Not Found</html>"],
        [400, {"message": "no oauth error member"}],
        [400, {"error": "Not An OAuth Code!"}],
        [429, {"error": "slow_down"}],
        [502, {"error": "server_error"}],
    ],
)
async def test_answers_that_are_no_refusal_of_the_token_are_503(
    make: Factory, control: httpx.AsyncClient, answer: Any
) -> None:
    """A 4xx without an OAuth error body, a 429 or a 5xx is no answer about the token: 503,
    asked again next time."""
    await _register(control, t=answer)
    auth = make()
    for _ in range(2):
        with pytest.raises(ServiceUnavailableError):
            await auth.verify("t")
    assert await _hits(control) == 2


async def test_a_token_without_sub_falls_back_to_its_client_id(
    make: Factory, control: httpx.AsyncClient
) -> None:
    """RFC 7662 makes sub optional: a client credentials answer with only client_id maps to
    that client as the user and as Identity.client_id; with sub, client_id is kept apart."""
    await _register(
        control,
        cc=_active(sub=None, client_id="billing-service", scope="invoices:read"),
        user=_active(client_id="web-app"),
        nobody=_active(sub=None),
    )
    auth = make()
    service = await auth.verify("cc")
    assert service.user_id == "billing-service"
    assert service.client_id == "billing-service"
    assert service.scopes == {"invoices:read"}
    user = await auth.verify("user")
    assert (user.user_id, user.client_id) == (USER, "web-app")
    with pytest.raises(InvalidTokenError, match="subject"):
        await auth.verify("nobody")
    strict = make(fallback_user_id_claim=None)
    with pytest.raises(InvalidTokenError, match="subject"):
        await strict.verify("cc")


async def test_from_issuer_finds_the_introspection_endpoint(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """from_issuer reads introspection_endpoint from the metadata on first use, once."""
    await control.post(
        "/control/metadata",
        json={
            "oidc": {"issuer": auth_server, "introspection_endpoint": f"{auth_server}/introspect"}
        },
    )
    await _register(control, opaque1=_active())
    auth = OAuth2IntrospectionAuthenticator.from_issuer(
        auth_server, client_id=CLIENT_ID, client_secret=CLIENT_SECRET
    )
    assert auth.introspection_url is None
    for _ in range(3):
        auth.clear_cache()
        assert (await auth.verify("opaque1")).user_id == USER
    assert auth.introspection_url == f"{auth_server}/introspect"
    hits = (await control.get("/control/hits")).json()
    assert (hits["oidc"], hits["introspect"]) == (1, 3)
    await auth.aclose()


async def test_from_issuer_with_a_bad_document_is_a_503_and_discover_says_why(
    auth_server: str, control: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A document without an introspection endpoint: requests get 503 and an ERROR line;
    discover() raises DiscoveryError naming what is missing."""
    from ctxvars_mw.auth.discovery import DiscoveryError

    await control.post("/control/metadata", json={"oidc": {"issuer": auth_server}})
    auth = OAuth2IntrospectionAuthenticator.from_issuer(
        auth_server, client_id=CLIENT_ID, client_secret=CLIENT_SECRET
    )
    with (
        caplog.at_level(logging.ERROR, logger="ctxvars_mw.auth"),
        pytest.raises(ServiceUnavailableError),
    ):
        await auth.verify("opaque1")
    assert "introspection_endpoint" in caplog.text
    with pytest.raises(DiscoveryError, match="introspection_endpoint"):
        await auth.discover()
    await auth.aclose()
