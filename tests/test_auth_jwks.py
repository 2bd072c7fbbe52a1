"""JWKS fetching and caching against a real local server (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ctxvars_mw import InvalidTokenError, JWTAuthenticator, ServiceUnavailableError
from ctxvars_mw.auth.keys import load_jwks
from tests.auth_helpers import (
    AUDIENCE,
    auth_server,
    bearer,
    claims,
    client_for,
    control,
    ec_key,
    ed_key,
    make_app,
    public_jwk,
    rsa_key,
    sign,
)
from tests.servers import uvicorn_server
from tests.tls import TLSFiles, make_tls_files

__all__ = ["auth_server", "control"]  # fixtures used here


def _auth(url: str, **options: Any) -> JWTAuthenticator:
    settings: dict[str, Any] = {"algorithms": ["RS256"], "audience": AUDIENCE}
    settings.update(options)
    return JWTAuthenticator(jwks_url=f"{url}/jwks", **settings)


async def _serve(control: httpx.AsyncClient, *jwks: dict[str, Any]) -> None:
    await control.post("/control/jwks", json={"keys": list(jwks)})


async def _hits(control: httpx.AsyncClient) -> int:
    return int((await control.get("/control/hits")).json()["jwks"])


def _token(kid: str, n: int = 0, alg: str = "RS256", **extra: Any) -> str:
    return sign(claims(**extra), rsa_key(n), alg, kid=kid)


async def test_keys_are_fetched_once_and_cached(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """The first token fetches the set; later tokens with known kids do not refetch."""
    await _serve(control, public_jwk(rsa_key(), "k1", "RS256"))
    auth = _auth(auth_server)
    for i in range(5):
        assert (await auth.verify(_token("k1", jti=f"j{i}"))).user_id
    assert await _hits(control) == 1
    assert auth.jwks is not None
    assert auth.jwks.fetch_count == 1


async def test_rotation_is_picked_up_on_an_unknown_kid(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """After the issuer rotates to a new key, a token with the new kid triggers a refetch."""
    await _serve(control, public_jwk(rsa_key(), "k1", "RS256"))
    auth = _auth(auth_server, jwks_min_refresh_interval=0.05)
    await auth.verify(_token("k1"))
    await _serve(control, public_jwk(rsa_key(1), "k2", "RS256"))
    await asyncio.sleep(0.06)
    assert (await auth.verify(_token("k2", 1))).user_id
    assert await _hits(control) == 2
    with pytest.raises(InvalidTokenError, match="unknown"):  # k1 is gone after rotation
        await auth.verify(_token("k1", jti="new"))


async def test_unknown_kids_refetch_at_most_once_per_interval(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """A flood of made-up kids causes one refetch per min_refresh_interval, not one each."""
    await _serve(control, public_jwk(rsa_key(), "k1", "RS256"))
    auth = _auth(auth_server, jwks_min_refresh_interval=60)
    await auth.verify(_token("k1"))
    for i in range(20):
        with pytest.raises(InvalidTokenError, match="unknown"):
            await auth.verify(_token(f"made-up-{i}"))
    assert await _hits(control) == 1  # the first fetch was < 60 s ago: no refetch at all


async def test_concurrent_misses_share_one_fetch(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """Twenty requests arriving before the keys are known wait on a single fetch."""
    await _serve(control, public_jwk(rsa_key(), "k1", "RS256"))
    await control.post("/control/delay", json={"seconds": 0.2})
    auth = _auth(auth_server)
    tokens = [_token("k1", jti=f"c{i}") for i in range(20)]
    identities = await asyncio.gather(*(auth.verify(t) for t in tokens))
    assert len(identities) == 20
    assert await _hits(control) == 1


@pytest.mark.parametrize("mode", ["error", "garbage"])
async def test_failed_fetch_keeps_the_last_good_set(
    auth_server: str, control: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """When the set is stale and the refetch fails, the last good keys still verify."""
    await _serve(control, public_jwk(rsa_key(), "k1", "RS256"))
    auth = _auth(auth_server, jwks_cache_ttl=0.05, jwks_min_refresh_interval=0.05)
    await auth.verify(_token("k1"))
    await control.post("/control/jwks_mode", json={"mode": mode})
    await asyncio.sleep(0.06)
    with caplog.at_level(logging.WARNING, logger="ctxvars_mw.auth"):
        assert (await auth.verify(_token("k1", jti="after-failure"))).user_id
    assert await _hits(control) == 2
    lines = [r for r in caplog.records if "keeping the last good key set" in r.getMessage()]
    assert len(lines) == 1


async def test_no_key_set_at_all_is_a_503(auth_server: str, control: httpx.AsyncClient) -> None:
    """If the JWKS has never been fetched, the middleware answers 503 with Retry-After."""
    await control.post("/control/jwks_mode", json={"mode": "error"})
    auth = _auth(auth_server)
    with pytest.raises(ServiceUnavailableError):
        await auth.verify(_token("k1"))
    app = make_app(authenticator=_auth(auth_server))
    async with client_for(app) as client:
        response = await client.get("/whoami", headers=bearer(_token("k1")))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"


async def test_unreachable_jwks_is_a_503() -> None:
    """A JWKS URL nobody listens on is a 503, not a 401 or a 500."""
    from tests.servers import free_port

    auth = JWTAuthenticator(
        jwks_url=f"http://127.0.0.1:{free_port()}/jwks", algorithms=["RS256"], audience=AUDIENCE
    )
    with pytest.raises(ServiceUnavailableError):
        await auth.verify(_token("k1"))


async def test_a_provided_http_client_is_used(auth_server: str, control: httpx.AsyncClient) -> None:
    """http_client= is used for fetches (e.g. to share a pool or set proxies)."""
    await _serve(control, public_jwk(rsa_key(), "k1", "RS256"))
    seen: list[str] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request.url.path)

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as client:
        auth = _auth(auth_server, http_client=client)
        await auth.verify(_token("k1"))
    assert seen == ["/jwks"]


async def test_ec_and_okp_keys_are_used_by_their_family(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """EC and Ed25519 JWKs without an 'alg' are matched by key type and curve."""
    ec_jwk = public_jwk(ec_key("P-256"), "e1", "ES256")
    ed_jwk = public_jwk(ed_key(), "d1", "EdDSA")
    del ec_jwk["alg"], ed_jwk["alg"]
    await _serve(control, ec_jwk, ed_jwk)
    auth = _auth(auth_server, algorithms=["ES256", "ES384", "EdDSA"])
    assert await auth.verify(sign(claims(), ec_key("P-256"), "ES256", kid="e1"))
    assert await auth.verify(sign(claims(), ed_key(), "EdDSA", kid="d1"))
    with pytest.raises(InvalidTokenError, match="unknown"):  # P-256 key cannot be ES384
        await auth.verify(sign(claims(), ec_key("P-384"), "ES384", kid="e1"))


def test_unusable_jwks_entries_are_skipped() -> None:
    """Private, encryption, symmetric, weak, kid-less and alg-mismatched keys are ignored."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    private = {**RSAAlgorithm.to_jwk(rsa_key(), as_dict=True), "kid": "priv"}
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    document = {
        "keys": [
            public_jwk(rsa_key(), "good", "RS256"),
            private,
            {**public_jwk(rsa_key(), "enc", "RS256"), "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "oct"},
            public_jwk(weak_key, "weak", "RS256"),
            {k: v for k, v in public_jwk(rsa_key(), "x", "RS256").items() if k != "kid"},
            public_jwk(rsa_key(), "ps-only", "PS256"),
            "not-a-jwk",
            {"kty": "RSA", "kid": "broken", "n": "AA", "e": "AQAB"},
        ]
    }
    assert set(load_jwks(document, ("RS256",))) == {("good", "RS256")}
    with pytest.raises(ValueError, match="keys"):
        load_jwks({"keys": "nope"}, ("RS256",))


@pytest.fixture(scope="module")
def tls_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TLSFiles]]:
    """The stand-in authorization server over TLS, with a certificate for ``localhost`` only
    from a CA made for this module; yields its ``https://localhost:<port>`` URL and files."""
    files = make_tls_files(tmp_path_factory.mktemp("tls"))
    tls = ("--ssl-keyfile", str(files.key), "--ssl-certfile", str(files.cert))
    with uvicorn_server("tests.apps.auth_server:app", extra_args=tls) as url:
        yield url.replace("http://127.0.0.1:", "https://localhost:"), files


@pytest.fixture
async def tls_control(
    tls_auth_server: tuple[str, TLSFiles],
) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the TLS server's /control endpoints (trusting the test CA); the server is
    reset and serves one RSA key, ``k1``."""
    url, files = tls_auth_server
    trust = ssl.create_default_context(cafile=str(files.ca))
    async with httpx.AsyncClient(base_url=url, verify=trust) as client:
        await client.post("/control/reset", json={})
        await _serve(client, public_jwk(rsa_key(), "k1", "RS256"))
        yield client


def _trusting(ca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the test CA the trust store of SSL contexts created from now on (as a deployment
    with a private CA would set ``SSL_CERT_FILE``)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


async def test_https_jwks_is_fetched_over_verified_tls(
    tls_auth_server: tuple[str, TLSFiles],
    tls_control: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The built-in https fetch (no http_client=) verifies the chain and gets the keys."""
    url, files = tls_auth_server
    _trusting(files.ca, monkeypatch)
    auth = _auth(url)
    assert (await auth.verify(_token("k1"))).user_id
    async with client_for(make_app(authenticator=auth)) as client:
        response = await client.get("/whoami", headers=bearer(_token("k1", jti="second")))
    assert response.status_code == 200
    assert await _hits(tls_control) == 1


async def test_https_jwks_with_an_untrusted_certificate_is_a_503(
    tls_auth_server: tuple[str, TLSFiles],
    tls_control: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Certificates are verified: a server the trust store does not know gets no request."""
    url, _ = tls_auth_server
    auth = _auth(url)  # the machine's default trust store, which lacks the test CA
    with (
        caplog.at_level(logging.WARNING, logger="ctxvars_mw"),
        pytest.raises(ServiceUnavailableError),
    ):
        await auth.verify(_token("k1"))
    assert "ConnectError: TLS: unable to get local issuer certificate" in caplog.text
    async with client_for(make_app(authenticator=auth)) as client:
        response = await client.get("/whoami", headers=bearer(_token("k1")))
    assert response.status_code == 503
    assert await _hits(tls_control) == 0


async def test_https_jwks_for_another_host_name_is_a_503(
    tls_auth_server: tuple[str, TLSFiles],
    tls_control: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Names are checked: the certificate names localhost, the URL says 127.0.0.1."""
    url, files = tls_auth_server
    _trusting(files.ca, monkeypatch)
    auth = _auth(url.replace("https://localhost:", "https://127.0.0.1:"))
    with (
        caplog.at_level(logging.WARNING, logger="ctxvars_mw"),
        pytest.raises(ServiceUnavailableError),
    ):
        await auth.verify(_token("k1"))
    assert "TLS: IP address mismatch" in caplog.text
    assert await _hits(tls_control) == 0


async def test_a_withdrawn_key_stops_authenticating_its_cached_tokens(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """A token cached while its key was published is refused once the set, refetched in
    the background after jwks_cache_ttl (cache hits trigger it), no longer holds the key;
    a token of a key still published keeps being answered from the cache."""
    await _serve(
        control, public_jwk(rsa_key(), "k1", "RS256"), public_jwk(rsa_key(1), "k2", "RS256")
    )
    auth = _auth(auth_server, jwks_cache_ttl=0.2, jwks_min_refresh_interval=0.05)
    withdrawn, kept = _token("k1"), _token("k2", 1)
    await auth.verify(withdrawn)
    await auth.verify(kept)
    await _serve(control, public_jwk(rsa_key(1), "k2", "RS256"))  # k1 leaves the set
    assert await auth.verify(withdrawn)  # within the TTL: the cache still answers
    await asyncio.sleep(0.25)
    assert await auth.verify(withdrawn)  # past it: answered, and a refetch starts
    assert auth.jwks is not None
    for _ in range(100):
        if auth.jwks.fetch_count == 2:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(InvalidTokenError, match="unknown"):
        await auth.verify(withdrawn)
    assert await _hits(control) == 2
    assert (await auth.verify(kept)).user_id  # k2 is the same key: its entry stays
    assert await _hits(control) == 2


async def test_a_kid_republished_with_another_key_invalidates_its_cached_tokens(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """The cache entry remembers the key by thumbprint: the same kid with new material is
    another key, and a token verified by the old one is verified again (and refused)."""
    await _serve(control, public_jwk(rsa_key(), "k1", "RS256"))
    auth = _auth(auth_server, jwks_min_refresh_interval=0.05)
    token = _token("k1")
    await auth.verify(token)
    await _serve(control, public_jwk(rsa_key(1), "k1", "RS256"))
    assert auth.jwks is not None
    await auth.jwks.refresh()
    with pytest.raises(InvalidTokenError, match="signature"):
        await auth.verify(token)
    assert (await auth.verify(_token("k1", 1, jti="new"))).user_id


async def test_withdrawal_is_seen_through_the_middleware_cache_path(
    auth_server: str, control: httpx.AsyncClient
) -> None:
    """The middleware's own cache lookup honours the withdrawal too: 200, then 401."""
    await _serve(control, public_jwk(rsa_key(), "k1", "RS256"))
    auth = _auth(auth_server, jwks_cache_ttl=0.2, jwks_min_refresh_interval=0.05)
    app = make_app(authenticator=auth, require_authentication=True)
    token = _token("k1")
    async with client_for(app) as client:
        assert (await client.get("/whoami", headers=bearer(token))).status_code == 200
        await _serve(control, public_jwk(rsa_key(1), "k2", "RS256"))
        await asyncio.sleep(0.25)
        statuses = []
        for _ in range(10):
            statuses.append((await client.get("/whoami", headers=bearer(token))).status_code)
            await asyncio.sleep(0.05)
    assert statuses[0] == 200
    assert statuses[-1] == 401


def test_a_fetched_set_keeps_the_verifiers_of_unchanged_keys() -> None:
    """Thumbprints follow RFC 7638 (its §3.1 example) and tell keys apart by material."""
    from ctxvars_mw.auth.keys import jwk_thumbprint

    rfc_example = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6"
        "tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-"
        "65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNL"
        "yrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJ"
        "zKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(rfc_example) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    assert jwk_thumbprint(public_jwk(rsa_key(), "a", "RS256")) == jwk_thumbprint(
        public_jwk(rsa_key(), "b", "RS256")
    )
    assert jwk_thumbprint(public_jwk(rsa_key(), "a", "RS256")) != jwk_thumbprint(
        public_jwk(rsa_key(1), "a", "RS256")
    )
