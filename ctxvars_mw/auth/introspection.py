"""OAuth2IntrospectionAuthenticator: opaque bearer tokens checked with RFC 7662.

The token is POSTed to the authorization server's introspection endpoint with the client's
credentials in HTTP Basic (RFC 6749 §2.3.1: each part form-urlencoded first). ``active:
true`` with a valid subject → an :class:`Identity` (``auth_method="oauth2"``), cached for
at most ``cache_ttl`` seconds and never past the token's ``exp``. RFC 7662 makes ``sub``
optional, and providers leave it out of client credentials tokens: the user id is then the
``client_id`` (``fallback_user_id_claim``), which ``Identity.client_id`` carries as well.

Anything else is a 401, remembered for ``negative_cache_ttl`` seconds in a bounded cache
(so a replayed bad token does not hammer the endpoint): ``active: false``, and a 4xx with an
OAuth error body (RFC 6749 §5.2) — the server refusing the *token*, e.g. oidc-provider's
400 ``unsupported_token_type`` for a JWT. The server refusing *our* client credentials
(401/403, or ``invalid_client``) is a configuration problem: 503 and one ERROR line saying
so, never a 401 blamed on the caller. A timeout, a connection error, a 5xx, a 429 or an
answer that is not an OAuth one → :class:`ServiceUnavailableError` (503, fail closed), never
cached.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self
from urllib.parse import quote

import httpx

from ..errors import ConfigurationError, InvalidTokenError, ServiceUnavailableError
from ..tier import Tier
from .base import Connection, Identity
from .cache import TTLCache, token_digest
from .claims import ClaimRules
from .discovery import ProviderMetadata
from .jwks import check_url
from .mapping import ClaimMapper, ClaimMapping
from .options import int_option, seconds_option

__all__ = ["OAuth2IntrospectionAuthenticator"]

logger = logging.getLogger("ctxvars_mw.auth")

_MAX_RESPONSE_BYTES = 1 << 16
_INACTIVE = "The access token is not active."
_REFUSED = "The authorization server refused the access token."
#: Error codes that mean the server refused our client credentials, not the token.
_CLIENT_ERRORS = frozenset({"invalid_client", "unauthorized_client"})
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")


class _Answer:
    """The introspection endpoint's HTTP answer: status and the JSON body (None if not)."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, raw: bytes) -> None:
        self.status = status
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.body: dict[str, Any] | None = body if isinstance(body, dict) else None

    @property
    def oauth_error(self) -> str | None:
        """The body's OAuth ``error`` code when it is one (RFC 6749 §5.2 syntax)."""
        error = None if self.body is None else self.body.get("error")
        return error if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else None


class OAuth2IntrospectionAuthenticator:
    """Authenticates opaque bearer tokens against an RFC 7662 introspection endpoint.

    Give ``introspection_url``, or use :meth:`from_issuer` to read it from the provider's
    metadata. Claim mapping is as for :class:`~ctxvars_mw.JWTAuthenticator` (``sub`` → user
    id, else ``fallback_user_id_claim``; ``scope`` → scopes; claim paths, ``tier_map``,
    ``claims_mapper``); ``issuer``/``audience``, when given, must match the response. The
    HTTP client is created on first use in the running event loop (or pass
    ``http_client``); call :meth:`aclose` at shutdown.
    """

    def __init__(
        self,
        *,
        introspection_url: str | None = None,
        client_id: str,
        client_secret: str,
        cache_ttl: float = 60,
        negative_cache_ttl: float = 10,
        cache_size: int = 10_000,
        negative_cache_size: int = 10_000,
        timeout: float = 5.0,
        issuer: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        leeway: float = 0,
        required_claims: Iterable[str] = (),
        user_id_claim: str = "sub",
        fallback_user_id_claim: str | None = "client_id",
        tier_claim: str = "tier",
        roles_claim: str | Iterable[str] = "roles",
        permissions_claim: str | Iterable[str] = "permissions",
        scope_claim: str = "scope",
        session_claim: str = "sid",
        tier_map: Mapping[str, Tier | str] | None = None,
        claims_mapper: ClaimMapper | None = None,
        max_token_bytes: int = 8192,
        retry_after: int = 5,
        http_client: httpx.AsyncClient | None = None,
        provider_metadata: ProviderMetadata | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (introspection_url is None) == (provider_metadata is None):
            raise ConfigurationError(
                "give exactly one of introspection_url= and provider_metadata="
            )
        #: The endpoint (with provider metadata: None until the document has been read).
        self.introspection_url = (
            None if introspection_url is None else check_url("introspection_url", introspection_url)
        )
        self.metadata = provider_metadata
        for name, value in (("client_id", client_id), ("client_secret", client_secret)):
            if not isinstance(value, str) or not value:
                raise ConfigurationError(f"{name} must be a non-empty string")
        self._auth = (quote(client_id, safe=""), quote(client_secret, safe=""))
        self.cache_ttl = seconds_option("cache_ttl", cache_ttl)
        self.negative_cache_ttl = seconds_option("negative_cache_ttl", negative_cache_ttl)
        self.timeout = seconds_option("timeout", timeout, 0.001)
        self.max_token_bytes = int_option("max_token_bytes", max_token_bytes, 0)
        self.retry_after = int_option("retry_after", retry_after, 0)
        self._rules = ClaimRules(
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            required=required_claims,
            mapping=ClaimMapping(
                user_id_claim=user_id_claim,
                fallback_user_id_claim=fallback_user_id_claim,
                tier_claim=tier_claim,
                roles_claim=roles_claim,
                permissions_claim=permissions_claim,
                scope_claim=scope_claim,
                session_claim=session_claim,
                tier_map=tier_map,
                claims_mapper=claims_mapper,
            ),
            strict_audience=False,
        )
        self._clock = clock
        self._positive: TTLCache[Identity] = TTLCache(
            int_option("cache_size", cache_size, 0), clock
        )
        self._negative: TTLCache[str] = TTLCache(
            int_option("negative_cache_size", negative_cache_size, 0), clock
        )
        self._client = http_client
        self._owns_client = http_client is None

    @classmethod
    def from_issuer(
        cls,
        issuer: str,
        *,
        client_id: str,
        client_secret: str,
        discovery_timeout: float = 5.0,
        discovery_cache_ttl: float = 300,
        http_client: httpx.AsyncClient | None = None,
        **options: Any,
    ) -> Self:
        """An authenticator using the ``introspection_endpoint`` of the provider at
        ``issuer``, read on first use from its metadata (OpenID Connect Discovery, else RFC
        8414; its ``issuer`` must equal ``issuer`` exactly) and refetched every
        ``discovery_cache_ttl`` seconds. ``options`` are the constructor's."""
        for name in ("introspection_url", "provider_metadata"):
            if name in options:
                raise ConfigurationError(f"from_issuer() takes no {name}=")
        metadata = ProviderMetadata(
            issuer,
            timeout=discovery_timeout,
            cache_ttl=discovery_cache_ttl,
            http_client=http_client,
        )
        return cls(
            client_id=client_id,
            client_secret=client_secret,
            provider_metadata=metadata,
            http_client=http_client,
            **options,
        )

    async def discover(self) -> str:
        """Read the provider metadata now (e.g. at startup) and return the introspection
        endpoint; DiscoveryError for an unusable document, ServiceUnavailableError when the
        provider cannot be reached. Requests never need this."""
        if self.metadata is None:
            assert self.introspection_url is not None
            return self.introspection_url
        await self.metadata.get(refresh=True)
        self.introspection_url = self.metadata.endpoint("introspection_endpoint")
        return self.introspection_url

    async def authenticate(self, conn: Connection) -> Identity | None:
        """The identity for ``conn.token``; None when the connection carries no token."""
        token = conn.token
        if token is None:
            return None
        return await self.verify(token)

    #: :meth:`cached` takes a token as text or as its ASCII bytes (as a header carries it).
    cached_takes_bytes = True

    def cached(self, token: str | bytes) -> Identity | None:
        """The identity of ``token`` when an introspection answered it active and the answer
        is still cached; else None (no request is made)."""
        return self._positive.get(token_digest(token, self.max_token_bytes))

    async def verify(self, token: str) -> Identity:
        """Introspect ``token`` (or answer from the caches)."""
        digest = token_digest(token, self.max_token_bytes)
        cached = self._positive.get(digest)
        if cached is not None:
            return cached
        refused = self._negative.get(digest)
        if refused is not None:
            raise InvalidTokenError(refused)
        try:
            response = await self._introspect(token)
            now = self._clock()
            if response.get("active") is not True:
                raise InvalidTokenError(_INACTIVE)
            identity = self._rules.identity(response, now, "oauth2")
        except InvalidTokenError as exc:
            self._negative.put(digest, exc.description, self._clock() + self.negative_cache_ttl)
            raise
        until = now + self.cache_ttl
        if identity.expires_at is not None:
            until = min(until, identity.expires_at)
        self._positive.put(digest, identity, until)
        return identity

    async def _endpoint(self) -> str:
        """The introspection URL: configured, or from the (cached) provider metadata."""
        if self.metadata is None:
            assert self.introspection_url is not None
            return self.introspection_url
        try:
            await self.metadata.get()
            self.introspection_url = self.metadata.endpoint("introspection_endpoint")
        except ConfigurationError as exc:  # an unusable document: logged where it is found
            logger.error("token introspection is not possible: %s", exc)
            raise self._unavailable() from exc
        return self.introspection_url

    async def _introspect(self, token: str) -> dict[str, Any]:
        """The endpoint's JSON answer (InvalidTokenError when it refuses the token;
        ServiceUnavailableError when there is no answer to go by)."""
        url = await self._endpoint()
        try:
            answer = await self._post(url, token)
        except Exception as exc:
            logger.error(
                "token introspection at %s failed (%s); refusing the request",
                url,
                type(exc).__name__,
            )
            raise self._unavailable() from exc
        if answer.status == 200 and answer.body is not None:
            return answer.body
        error = answer.oauth_error
        if answer.status in (401, 403) or error in _CLIENT_ERRORS:
            logger.error(
                "the introspection endpoint %s refused this service's client credentials "
                "(HTTP %d%s): check client_id and client_secret",
                url,
                answer.status,
                f", {error}" if error else "",
            )
            raise self._unavailable()
        if 400 <= answer.status < 500 and answer.status != 429 and error is not None:
            logger.debug("introspection refused a token (HTTP %d, %s)", answer.status, error)
            raise InvalidTokenError(_REFUSED)
        logger.error(
            "token introspection at %s failed (HTTP %d%s); refusing the request",
            url,
            answer.status,
            "" if answer.body is not None else ", not a JSON object",
        )
        raise self._unavailable()

    async def _post(self, url: str, token: str) -> _Answer:
        async with self._http().stream(
            "POST",
            url,
            data={"token": token, "token_type_hint": "access_token"},
            auth=self._auth,
            headers={"Accept": "application/json"},
            timeout=self.timeout,
        ) as resp:
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > _MAX_RESPONSE_BYTES:
                    raise ValueError("the response is too large")
            return _Answer(resp.status_code, bytes(body))

    def _unavailable(self) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            "The token could not be checked right now.", retry_after=self.retry_after
        )

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        return self._client

    def clear_cache(self) -> None:
        """Forget every cached answer (e.g. after revoking tokens at the server)."""
        self._positive.clear()
        self._negative.clear()

    async def aclose(self) -> None:
        """Close the HTTP client this authenticator created (not one passed in)."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
