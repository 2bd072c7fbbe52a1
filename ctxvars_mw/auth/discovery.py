"""An identity provider's metadata, discovered from its issuer URL.

``ProviderMetadata`` reads OpenID Connect Discovery's ``{issuer}/.well-known/openid-
configuration`` and, when the provider has none (404), RFC 8414's ``/.well-known/oauth-
authorization-server`` (inserted before the issuer's path). The document's ``issuer`` must
equal the configured issuer exactly (OpenID Connect Discovery §4.3), and every endpoint it
names obeys the rule of the URL options: https, or http on a loopback host. Fetches are
asynchronous (``httpx.AsyncClient``), bounded in size and time, shared by concurrent
callers; a failed fetch keeps the last good document. Nothing is fetched at construction:
the first request does it (or ``await authenticator.discover()`` at startup).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..errors import ConfigurationError, ServiceUnavailableError
from .jwks import check_url, tls_reason
from .options import seconds_option

__all__ = ["DiscoveryError", "ProviderMetadata", "well_known_urls"]

logger = logging.getLogger("ctxvars_mw.auth")

#: The largest metadata document accepted, in bytes.
MAX_METADATA_BYTES = 1 << 18


class DiscoveryError(ConfigurationError):
    """The provider's metadata document is unusable (wrong issuer, a missing or unsafe
    endpoint, not a JSON object)."""


def well_known_urls(issuer: str) -> tuple[str, str]:
    """The OpenID Connect and the RFC 8414 metadata URLs of ``issuer``."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    oidc = urlunsplit(
        (parts.scheme, parts.netloc, f"{path}/.well-known/openid-configuration", "", "")
    )
    rfc8414 = urlunsplit(
        (parts.scheme, parts.netloc, f"/.well-known/oauth-authorization-server{path}", "", "")
    )
    return oidc, rfc8414


class _NotFoundError(Exception):
    """The metadata URL answered 404."""


class ProviderMetadata:
    """The metadata of the provider at ``issuer``, cached for ``cache_ttl`` seconds."""

    def __init__(
        self,
        issuer: str,
        *,
        timeout: float = 5.0,
        cache_ttl: float = 300,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = check_url("issuer", issuer)
        if urlsplit(issuer).query or urlsplit(issuer).fragment:
            raise ConfigurationError("issuer must have no query or fragment")
        self.urls = well_known_urls(issuer)
        self.timeout = seconds_option("discovery_timeout", timeout, above=True)
        self.cache_ttl = seconds_option("discovery_cache_ttl", cache_ttl, above=True)
        self._client = http_client
        self._ssl: ssl.SSLContext | None = None
        if http_client is None and issuer.startswith("https:"):
            self._ssl = ssl.create_default_context()
        self._clock = clock
        self._document: dict[str, Any] | None = None
        self._fetched_at: float | None = None
        self._inflight: asyncio.Task[dict[str, Any]] | None = None
        #: Successful fetches so far (for monitoring and tests).
        self.fetch_count = 0

    @property
    def document(self) -> dict[str, Any] | None:
        """The last good document, or None before the first successful fetch."""
        return self._document

    def endpoint(self, name: str) -> str:
        """The URL the document gives for ``name`` (``jwks_uri``, ``introspection_endpoint``…);
        DiscoveryError when it has none or an unsafe one."""
        document = self._document
        value = None if document is None else document.get(name)
        if not isinstance(value, str) or not value:
            raise DiscoveryError(f"the metadata of {self.issuer} names no {name}")
        try:
            return check_url(name, value)
        except ConfigurationError:
            raise DiscoveryError(
                f"the metadata of {self.issuer} gives a {name} that is not https "
                "(plain http only on loopback hosts)"
            ) from None

    async def get(self, *, refresh: bool = False) -> dict[str, Any]:
        """The document: the cached one while fresh (unless ``refresh``), else fetched now.

        A failed fetch falls back to the last good document (logged); with none, an
        unreachable provider is a ServiceUnavailableError and a bad document a
        DiscoveryError.
        """
        document, fetched_at = self._document, self._fetched_at
        if (
            not refresh
            and document is not None
            and fetched_at is not None
            and self._clock() - fetched_at < self.cache_ttl
        ):
            return document
        try:
            return await self._shared_fetch()
        except (DiscoveryError, ServiceUnavailableError) as exc:
            if self._document is None:
                raise
            logger.warning(
                "provider metadata refetch from %s failed (%s); keeping the last good document",
                self.issuer,
                type(exc).__name__,
            )
            return self._document

    async def _shared_fetch(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._fetch())
            self._inflight = task
        return await asyncio.shield(task)

    async def _fetch(self) -> dict[str, Any]:
        try:
            if self._client is not None:
                document = await self._read_any(self._client)
            else:
                if self._ssl is None:  # built once: each one costs tens of milliseconds
                    self._ssl = ssl.create_default_context()
                verify = self._ssl
                async with httpx.AsyncClient(verify=verify, timeout=self.timeout) as client:
                    document = await self._read_any(client)
        except DiscoveryError as exc:
            logger.error("provider metadata of %s is unusable: %s", self.issuer, exc)
            raise
        except Exception as exc:
            logger.warning(
                "provider metadata fetch from %s failed (%s%s)",
                self.issuer,
                type(exc).__name__,
                tls_reason(exc),
            )
            raise ServiceUnavailableError(
                "The identity provider could not be reached.", retry_after=5
            ) from exc
        self._document = document
        self._fetched_at = self._clock()
        self.fetch_count += 1
        return document

    async def _read_any(self, client: httpx.AsyncClient) -> dict[str, Any]:
        try:
            return await self._read(client, self.urls[0])
        except _NotFoundError:
            pass
        try:
            return await self._read(client, self.urls[1])
        except _NotFoundError:
            raise DiscoveryError(
                f"{self.issuer} publishes no OpenID Connect or RFC 8414 metadata (HTTP 404)"
            ) from None

    async def _read(self, client: httpx.AsyncClient, url: str) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        async with client.stream("GET", url, headers=headers, timeout=self.timeout) as resp:
            if resp.status_code == 404:
                raise _NotFoundError
            resp.raise_for_status()
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_METADATA_BYTES:
                    raise DiscoveryError(f"the metadata at {url} is too large")
        try:
            document = json.loads(bytes(body))
        except ValueError:
            raise DiscoveryError(f"the metadata at {url} is not JSON") from None
        if not isinstance(document, dict):
            raise DiscoveryError(f"the metadata at {url} is not a JSON object")
        if document.get("issuer") != self.issuer:
            raise DiscoveryError(
                f"the metadata at {url} is for another issuer than the configured "
                f"{self.issuer!r} (the two must be equal, character for character)"
            )
        return document
