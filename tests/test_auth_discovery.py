"""Provider metadata discovery (OpenID Connect Discovery, RFC 8414) against a local server."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from ctxvars_mw import (
    ConfigurationError,
    JWTAuthenticator,
    ServiceUnavailableError,
)
from ctxvars_mw.auth.discovery import DiscoveryError, well_known_urls
from tests.auth_helpers import (
    AUDIENCE,
    auth_server,
    bearer,
    claims,
    client_for,
    control,
    make_app,
    public_jwk,
    rsa_key,
    sign,
)
from tests.servers import free_port

__all__ = ["auth_server", "control"]  # fixtures used here


async def _publish(control: httpx.AsyncClient, **documents: Any) -> None:
    await control.post("/control/metadata", json=documents)
    await control.post("/control/jwks", json={"keys": [public_jwk(rsa_key(), "k1", "RS256")]})


async def _hits(control: httpx.AsyncClient) -> dict[str, int]:
    return dict((await control.get("/control/hits")).json())


def _token(issuer: str, kid: str = "k1", n: int = 0, **extra: Any) -> str:
    return sign(claims(iss=issuer, **extra), rsa_key(n), "RS256", kid=kid)


def _from(issuer: str, **options: Any) -> JWTAuthenticator:
    return JWTAuthenticator.from_issuer(issuer, algorithms=["RS256"], audience=AUDIENCE, **options)


def test_well_known_urls_follow_both_specifications() -> None:
    """OpenID Connect appends to the issuer; RFC 8414 inserts before the issuer's path."""
    assert well_known_urls("https://kc.example.com/realms/acme/") == (
        "https://kc.example.com/realms/acme/.well-known/openid-configuration",
        "https://kc.example.com/.well-known/oauth-authorization-server/realms/acme",
    )
    assert well_known_urls("https://tenant.auth0.com/") == (
        "https://tenant.auth0.com/.well-known/openid-configuration",
        "https://tenant.auth0.com/.well-known/oauth-authorization-server",
    )


async def test_jwks_uri_comes_from_the_document_on_first_use(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """Nothing is fetched at construction; the first token reads the document and the key
    set once, even when many arrive together; the token's iss must be the issuer."""
    await _publish(control, oidc={"issuer": auth_server, "jwks_uri": f"{auth_server}/jwks"})
    auth = _from(auth_server)
    assert (await _hits(control))["oidc"] == 0
    results = await asyncio.gather(
        *(auth.verify(_token(auth_server, jti=f"j{i}")) for i in range(10))
    )
    assert {identity.user_id for identity in results} == {results[0].user_id}
    hits = await _hits(control)
    assert (hits["oidc"], hits["jwks"]) == (1, 1)
    assert auth.jwks is not None
    assert auth.jwks.url == f"{auth_server}/jwks"
    with pytest.raises(Exception, match="issuer"):
        await auth.verify(_token("https://other.example.com"))


async def test_rfc8414_metadata_is_the_fallback(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """A provider without an OpenID configuration (404) is read from its RFC 8414 document."""
    await _publish(control, rfc8414={"issuer": auth_server, "jwks_uri": f"{auth_server}/jwks"})
    assert await _from(auth_server).verify(_token(auth_server))
    hits = await _hits(control)
    assert (hits["oidc"], hits["rfc8414"], hits["jwks"]) == (1, 1, 1)


async def test_the_document_is_refetched_with_the_key_set(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """An unknown kid refetches the document and then the key set it names."""
    await _publish(control, oidc={"issuer": auth_server, "jwks_uri": f"{auth_server}/jwks"})
    auth = _from(auth_server, jwks_min_refresh_interval=0.05)
    await auth.verify(_token(auth_server))
    await control.post("/control/jwks", json={"keys": [public_jwk(rsa_key(1), "k2", "RS256")]})
    await asyncio.sleep(0.06)
    assert await auth.verify(_token(auth_server, "k2", 1))
    hits = await _hits(control)
    assert (hits["oidc"], hits["jwks"]) == (2, 2)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"issuer": "{base}/", "jwks_uri": "{base}/jwks"}, "another issuer"),
        ({"issuer": "https://evil.example.com", "jwks_uri": "{base}/jwks"}, "another issuer"),
        ({"jwks_uri": "{base}/jwks"}, "another issuer"),
        ({"issuer": "{base}"}, "no jwks_uri"),
        ({"issuer": "{base}", "jwks_uri": "http://keys.example.com/jwks"}, "not https"),
    ],
)
async def test_a_bad_document_is_a_503_and_discover_says_why(
    auth_server: str,
    control: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    document: dict[str, str],
    reason: str,
) -> None:
    """Requests get a 503 (never a 500) and the log says what is wrong with the document;
    discover() raises DiscoveryError (a ConfigurationError) with the same reason."""
    await _publish(control, oidc={k: v.format(base=auth_server) for k, v in document.items()})
    auth = _from(auth_server)
    app = make_app(authenticator=auth, require_authentication=True)
    with caplog.at_level(logging.WARNING, logger="ctxvars_mw.auth"):
        async with client_for(app) as client:
            response = await client.get("/whoami", headers=bearer(_token(auth_server)))
    assert response.status_code == 503
    assert reason in caplog.text
    with pytest.raises(DiscoveryError, match=reason):
        await auth.discover()
    assert issubclass(DiscoveryError, ConfigurationError)


async def test_an_unreachable_provider_is_a_503() -> None:
    """Nothing listening at the issuer: 503 for requests, ServiceUnavailableError from
    discover()."""
    issuer = f"http://127.0.0.1:{free_port()}"
    auth = _from(issuer, discovery_timeout=1)
    with pytest.raises(ServiceUnavailableError):
        await auth.verify(_token(issuer))
    with pytest.raises(ServiceUnavailableError):
        await auth.discover()


async def test_discover_checks_a_good_provider_at_startup(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """discover() reads document and keys, so that the first request needs neither."""
    await _publish(control, oidc={"issuer": auth_server, "jwks_uri": f"{auth_server}/jwks"})
    auth = _from(auth_server)
    await auth.discover()
    before = await _hits(control)
    assert await auth.verify(_token(auth_server))
    assert await _hits(control) == before


@pytest.mark.parametrize(
    ("issuer", "options"),
    [
        ("http://idp.example.com", {}),
        ("not a url", {}),
        ("https://idp.example.com?x=1", {}),
        ("https://idp.example.com", {"jwks_url": "https://idp.example.com/jwks"}),
        ("https://idp.example.com", {"key": "a-secret"}),
        ("https://idp.example.com", {"discovery_timeout": 0}),
    ],
)
def test_bad_issuer_options_raise_configuration_error(issuer: str, options: dict[str, Any]) -> None:
    """The issuer obeys the URL rules (https, or http on loopback) and excludes key sources."""
    with pytest.raises(ConfigurationError):
        _from(issuer, **options)
