"""OAuth2IntrospectionAuthenticator: opaque bearer tokens checked with RFC 7662.

The token is POSTed to the authorization server's introspection endpoint with the client's
credentials in HTTP Basic (RFC 6749 §2.3.1: each part form-urlencoded first). ``active:
true`` with a valid subject → an :class:`Identity` (``auth_method="oauth2"``), cached for
at most ``cache_ttl`` seconds and never past the token's ``exp``; anything else → 401, with
the refusal remembered for ``negative_cache_ttl`` seconds in a bounded cache (so a replayed
bad token does not hammer the endpoint). The endpoint failing, timing out or answering
nonsense → :class:`ServiceUnavailableError` (503, fail closed), never cached.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import httpx

from ..errors import ConfigurationError, HTTPError, InvalidTokenError, ServiceUnavailableError
from .base import Connection, Identity
from .cache import TTLCache, token_digest
from .claims import ClaimNames, ClaimRules
from .jwks import check_url
from .options import int_option, seconds_option

__all__ = ["OAuth2IntrospectionAuthenticator"]

logger = logging.getLogger("ctxvars_mw.auth")

_MAX_RESPONSE_BYTES = 1 << 16
_INACTIVE = "The access token is not active."


class OAuth2IntrospectionAuthenticator:
    """Authenticates opaque bearer tokens against an RFC 7662 introspection endpoint.

    Claim mapping is as for :class:`~ctxvars_mw.JWTAuthenticator` (``sub`` → user id,
    ``scope`` → scopes, …); ``issuer``/``audience``, when given, must match the response.
    The HTTP client is created on first use in the running event loop (or pass
    ``http_client``); call :meth:`aclose` at shutdown.
    """

    def __init__(
        self,
        *,
        introspection_url: str,
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
        required_claims: Iterable[str] = ("sub",),
        user_id_claim: str = "sub",
        tier_claim: str = "tier",
        roles_claim: str = "roles",
        permissions_claim: str = "permissions",
        scope_claim: str = "scope",
        session_claim: str = "sid",
        max_token_bytes: int = 8192,
        retry_after: int = 5,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.introspection_url = check_url("introspection_url", introspection_url)
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
            names=ClaimNames(
                user_id_claim,
                tier_claim,
                roles_claim,
                permissions_claim,
                scope_claim,
                session_claim,
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

    async def authenticate(self, conn: Connection) -> Identity | None:
        """The identity for ``conn.token``; None when the connection carries no token."""
        token = conn.token
        if token is None:
            return None
        return await self.verify(token)

    async def verify(self, token: str) -> Identity:
        """Introspect ``token`` (or answer from the caches)."""
        if len(token) > self.max_token_bytes:
            raise InvalidTokenError("The access token is too large.")
        digest = token_digest(token)
        cached = self._positive.get(digest)
        if cached is not None:
            return cached
        refused = self._negative.get(digest)
        if refused is not None:
            raise InvalidTokenError(refused)
        response = await self._introspect(token)
        now = self._clock()
        try:
            if response.get("active") is not True:
                raise InvalidTokenError(_INACTIVE)
            identity = self._rules.identity(response, now, "oauth2")
        except InvalidTokenError as exc:
            self._negative.put(digest, exc.description, now + self.negative_cache_ttl)
            raise
        until = now + self.cache_ttl
        if identity.expires_at is not None:
            until = min(until, identity.expires_at)
        self._positive.put(digest, identity, until)
        return identity

    async def _introspect(self, token: str) -> dict[str, Any]:
        """The endpoint's JSON answer; ServiceUnavailableError when there is none."""
        try:
            client = self._http()
            async with client.stream(
                "POST",
                self.introspection_url,
                data={"token": token, "token_type_hint": "access_token"},
                auth=self._auth,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            ) as resp:
                if resp.status_code != 200:
                    raise ValueError(f"HTTP {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_RESPONSE_BYTES:
                        raise ValueError("the response is too large")
            answer = json.loads(bytes(body))
            if not isinstance(answer, dict):
                raise ValueError("the response is not a JSON object")
            return answer
        except HTTPError:
            raise
        except Exception as exc:
            logger.error(
                "token introspection at %s failed (%s: %s); refusing the request",
                self.introspection_url,
                type(exc).__name__,
                exc if isinstance(exc, ValueError) else "-",
            )
            raise ServiceUnavailableError(
                "The token could not be checked right now.", retry_after=self.retry_after
            ) from exc

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
