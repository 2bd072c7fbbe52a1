"""An asynchronously fetched, cached JSON Web Key Set (RFC 7517).

The set is fetched with ``httpx.AsyncClient`` (the event loop is never blocked), kept for
``cache_ttl`` seconds, and refetched early when a token names an unknown ``kid`` — at most
once per ``min_refresh_interval``, so a flood of made-up key ids cannot become a flood of
fetches. Concurrent misses share one fetch. A failed fetch keeps the last good set.

Each key is known by ``(kid, alg)`` and its RFC 7638 thumbprint: a refetched set keeps the
verifier object of every key it still holds, so :meth:`JWKSClient.is_current` tells whether
the key that verified a cached token is still published (a key withdrawn, or a ``kid``
republished with other material, is not). Once the set is older than ``cache_ttl``,
:meth:`JWKSClient.refresh_if_stale` refetches it in the background, so that tokens answered
from the cache also see a withdrawal. With a :class:`~.discovery.ProviderMetadata`, the
JWKS URL is the document's ``jwks_uri``, and the document is refetched with every set.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from ..errors import ConfigurationError, InvalidTokenError, ServiceUnavailableError
from .keys import Verifier, load_jwks_entries
from .options import seconds_option

if TYPE_CHECKING:
    from .discovery import ProviderMetadata

__all__ = ["JWKSClient", "check_url", "tls_reason"]

logger = logging.getLogger("ctxvars_mw.auth")

#: The largest JWKS document accepted, in bytes.
MAX_JWKS_BYTES = 1 << 20
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(option: str, url: object) -> str:
    """``url`` if it is https (or http on a loopback host); ConfigurationError otherwise."""
    if not isinstance(url, str):
        raise ConfigurationError(f"{option} must be a URL string")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or parts.scheme not in ("https", "http"):
        raise ConfigurationError(f"{option} must be an absolute https URL")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigurationError(f"{option} must use https (plain http only on loopback hosts)")
    return url


def tls_reason(exc: BaseException) -> str:
    """``": TLS: <OpenSSL's reason>"`` when a certificate check caused ``exc``, else "".

    The reason is one of OpenSSL's fixed messages (an unknown issuer, an expired
    certificate, a host name mismatch for the configured URL), never text the server sent.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f": TLS: {cause.verify_message}"
        cause = cause.__cause__ or cause.__context__
    return ""


class JWKSClient:
    """Signing keys from a JWKS URL, looked up by ``(kid, alg)``."""

    def __init__(
        self,
        url: str | None,
        algorithms: tuple[str, ...],
        *,
        metadata: ProviderMetadata | None = None,
        cache_ttl: float,
        min_refresh_interval: float,
        timeout: float = 5.0,
        http_client: httpx.AsyncClient | None = None,
        retry_after: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (url is None) == (metadata is None):
            raise ConfigurationError("give exactly one of a JWKS URL and provider metadata")
        #: The JWKS URL (with provider metadata: None until the document has been read).
        self.url = None if url is None else check_url("jwks_url", url)
        self.metadata = metadata
        self.algorithms = algorithms
        self.cache_ttl = seconds_option("jwks_cache_ttl", cache_ttl, above=True)
        self.min_refresh_interval = seconds_option(
            "jwks_min_refresh_interval", min_refresh_interval, above=True
        )
        self.timeout = seconds_option("jwks_timeout", timeout, above=True)
        self.retry_after = retry_after
        self._client = http_client
        # Built once: an SSL context is expensive, and fetches use a short-lived client.
        self._ssl: ssl.SSLContext | None = None
        source = metadata.issuer if metadata is not None else url
        if http_client is None and source is not None and source.startswith("https:"):
            self._ssl = ssl.create_default_context()
        self._clock = clock
        self._keys: dict[tuple[str, str], Verifier] = {}
        #: The published keys by ``(kid, alg)`` (a new mapping after each refetch).
        self.current: Mapping[tuple[str, str], Verifier] = self._keys
        self._thumbprints: dict[tuple[str, str], str] = {}
        self._fetched_at: float | None = None
        #: When the set goes stale (``clock()`` time; -inf before the first fetch).
        self.stale_at = float("-inf")
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        #: Successful fetches so far (for monitoring and tests).
        self.fetch_count = 0

    async def verifier(self, kid: str | None, alg: str) -> Verifier:
        """The key for ``(kid, alg)``, refreshing the set when it is stale or lacks ``kid``."""
        if kid is None:
            raise InvalidTokenError("The token does not name its signing key (kid).")
        now = self._clock()
        found = self._keys.get((kid, alg))
        fresh = self._fetched_at is not None and now - self._fetched_at < self.cache_ttl
        if found is not None and fresh:
            return found
        inflight = self._inflight is not None and not self._inflight.done()
        if (
            inflight  # join the fetch under way (concurrent misses share it)
            or self._attempted_at is None
            or now - self._attempted_at >= self.min_refresh_interval
        ):
            await self.refresh()
            found = self._keys.get((kid, alg))
        if found is not None:
            return found
        if self._fetched_at is None:
            raise ServiceUnavailableError(
                "The signing keys could not be fetched.", retry_after=self.retry_after
            )
        raise InvalidTokenError("The token's signing key is unknown.")

    def is_current(self, kid: str | None, alg: str, verifier: Verifier) -> bool:
        """Whether ``verifier`` is still the published key for ``(kid, alg)``."""
        return kid is not None and self._keys.get((kid, alg)) is verifier

    def refresh_if_stale(self) -> None:
        """Start a background refetch when the set is older than ``cache_ttl`` (at most one
        per ``min_refresh_interval``); returns at once. Outside an event loop, does nothing."""
        fetched, attempted, now = self._fetched_at, self._attempted_at, self._clock()
        if fetched is not None and now - fetched < self.cache_ttl:
            return
        if attempted is not None and now - attempted < self.min_refresh_interval:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            self._attempted_at = now
            self._inflight = loop.create_task(self._fetch())

    async def refresh(self) -> None:
        """Fetch the set now (joining a fetch already under way); never raises."""
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            self._attempted_at = self._clock()
            task = loop.create_task(self._fetch())
            self._inflight = task
        await asyncio.shield(task)

    async def _locate(self) -> str:
        """The JWKS URL: configured, or the provider metadata's ``jwks_uri`` (refetched)."""
        if self.metadata is None:
            assert self.url is not None
            return self.url
        await self.metadata.get(refresh=True)
        self.url = self.metadata.endpoint("jwks_uri")
        return self.url

    async def _fetch(self) -> None:
        try:
            url = await self._locate()
        except ConfigurationError as exc:  # an unusable document: our own words say why
            logger.error("no JWKS URL: %s; keeping the last good key set", exc)
            return
        except Exception as exc:  # unreachable: logged by the metadata
            logger.warning(
                "no JWKS URL from the metadata (%s); keeping the last good key set",
                type(exc).__name__,
            )
            return
        try:
            entries = load_jwks_entries(json.loads(await self._download(url)), self.algorithms)
        except Exception as exc:  # any failure keeps the last good set
            logger.warning(
                "JWKS fetch from %s failed (%s%s); keeping the last good key set",
                url,
                type(exc).__name__,
                tls_reason(exc),
            )
            return
        if not entries:
            logger.warning("JWKS at %s has no usable keys; keeping the last good set", url)
            return
        old_keys, old_thumbprints = self._keys, self._thumbprints
        keys: dict[tuple[str, str], Verifier] = {}
        for name, (thumbprint, verifier) in entries.items():
            # The same key as before keeps its verifier: cached tokens it verified stay good.
            same = old_thumbprints.get(name) == thumbprint
            keys[name] = old_keys[name] if same else verifier
        self._keys = self.current = keys
        self._thumbprints = {name: entry[0] for name, entry in entries.items()}
        self._fetched_at = self._clock()
        self.stale_at = self._fetched_at + self.cache_ttl
        self.fetch_count += 1

    async def _download(self, url: str) -> bytes:
        if self._client is not None:
            return await self._read(self._client, url)
        if self._ssl is None:  # built once: each one costs tens of milliseconds
            self._ssl = ssl.create_default_context()
        verify = self._ssl
        async with httpx.AsyncClient(verify=verify, timeout=self.timeout) as client:
            return await self._read(client, url)

    async def _read(self, client: httpx.AsyncClient, url: str) -> bytes:
        headers = {"Accept": "application/json"}
        async with client.stream("GET", url, headers=headers, timeout=self.timeout) as resp:
            resp.raise_for_status()
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("the JWKS document is too large")
            return bytes(body)
