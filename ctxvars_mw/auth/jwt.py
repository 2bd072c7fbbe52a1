"""JWTAuthenticator: bearer JWTs verified with PyJWT's algorithms and keys loaded once.

Verification order: size limit → verified-token cache (a hit counts while the key that
verified it is still published) → strict parsing (:mod:`.jose`: three canonical segments,
no repeated JSON members, refused header parameters, the allow-list) → an ES* signature's
canonical (low-S) spelling → the key (configured, or from the JWKS by ``kid``) → the
signature (PyJWT's algorithm implementation with the key object prepared at construction) →
the claims (:mod:`.claims`). Every failure is an :class:`InvalidTokenError` (or
:class:`ExpiredTokenError`) — a 401, never a 500; an unreachable JWKS (or provider metadata)
with no key set yet is a :class:`ServiceUnavailableError` (503).

ECDSA signatures have two valid spellings, ``s`` and ``n - s``, and signers use both about
equally often. A token with a high ``s`` is therefore accepted, but known by its low-S
spelling: both spellings are one entry of the verified-token cache, and
:meth:`JWTAuthenticator.canonical_token` gives the spelling to key anything else on (a deny
list). ``require_low_s=True`` refuses high-S signatures instead, for issuers known to emit
only low-S ones.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

import httpx
import jwt.exceptions as jwt_errors

from ..errors import (
    ConfigurationError,
    ExpiredTokenError,
    HTTPError,
    InvalidTokenError,
    ServiceUnavailableError,
)
from ..tier import Tier
from .base import Connection, Identity
from .cache import TTLCache, token_digest
from .claims import ClaimRules
from .discovery import ProviderMetadata
from .jose import Compact, HeaderRules, parse_compact
from .jwks import JWKSClient
from .keys import HMAC_ALGORITHMS, Verifier, check_algorithms, ecdsa_low_s, load_static_key
from .mapping import ClaimMapper, ClaimMapping
from .options import int_option

__all__ = ["JWTAuthenticator", "from_pyjwt_error"]

_PYJWT_DESCRIPTIONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt_errors.ImmatureSignatureError, "The access token is not valid yet."),
    (jwt_errors.InvalidSignatureError, "The token's signature is invalid."),
    (jwt_errors.InvalidAlgorithmError, "The token's signing algorithm is not allowed."),
    (jwt_errors.InvalidAudienceError, "The token is not meant for this audience."),
    (jwt_errors.InvalidIssuerError, "The token's issuer is not accepted."),
    (jwt_errors.MissingRequiredClaimError, "The token lacks a required claim."),
    (jwt_errors.DecodeError, "The access token is malformed."),
)


def from_pyjwt_error(exc: BaseException) -> InvalidTokenError:
    """Our error for any PyJWT exception (or anything else raised while verifying)."""
    if isinstance(exc, jwt_errors.ExpiredSignatureError):
        return ExpiredTokenError()
    for cls, description in _PYJWT_DESCRIPTIONS:
        if isinstance(exc, cls):
            return InvalidTokenError(description)
    return InvalidTokenError("The access token could not be verified.")


class JWTAuthenticator:
    """Authenticates ``Authorization: Bearer <JWT>`` (and the websocket token sources).

    Give exactly one of ``key`` (a PEM string/bytes, a ``cryptography`` public key object, a
    JWK dict, or for ``HS*`` a secret of at least the hash size), ``jwks_url`` (https, or
    http on a loopback host) and ``provider_metadata`` (the JWKS URL read from the provider's
    metadata; :meth:`from_issuer` builds it). ``algorithms`` is the mandatory allow-list.
    Claims are mapped to the :class:`Identity` (claim paths such as ``"realm_access.roles"``,
    ``tier_map`` and the ``claims_mapper`` hook: see :mod:`.mapping`): ``user_id_claim`` →
    user id, ``tier_claim`` → tier, ``roles_claim``/``permissions_claim`` → lists of strings,
    ``scope_claim`` → scopes (a space-separated string or a list), ``session_claim`` →
    session id; ``client_id`` (or ``azp``) → ``Identity.client_id``. ``required_typ="at+jwt"``
    (which ``typ: application/at+jwt`` also satisfies) is the setting for RFC 9068 access
    tokens. Verified tokens are cached (an LRU of ``cache_size`` entries keyed by a BLAKE2b-256
    digest of the token, each until the token's ``exp`` and while its key is published;
    ``cache_size=0`` disables it). ``http_client`` (optional) is used for JWKS fetches
    instead of a short-lived client per fetch; ``clock`` is for tests.
    """

    def __init__(
        self,
        *,
        key: Any = None,
        jwks_url: str | None = None,
        algorithms: Iterable[str],
        issuer: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        leeway: float = 30,
        required_claims: Iterable[str] = ("exp", "sub"),
        user_id_claim: str = "sub",
        tier_claim: str = "tier",
        roles_claim: str | Iterable[str] = "roles",
        permissions_claim: str | Iterable[str] = "permissions",
        scope_claim: str = "scope",
        session_claim: str = "sid",
        tier_map: Mapping[str, Tier | str] | None = None,
        claims_mapper: ClaimMapper | None = None,
        required_typ: str | None = None,
        require_low_s: bool = False,
        max_token_bytes: int = 8192,
        jwks_cache_ttl: float = 300,
        jwks_min_refresh_interval: float = 5,
        cache_size: int = 10_000,
        jwks_timeout: float = 5.0,
        http_client: httpx.AsyncClient | None = None,
        provider_metadata: ProviderMetadata | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        names = check_algorithms(algorithms)
        if [key, jwks_url, provider_metadata].count(None) != 2:
            raise ConfigurationError("give exactly one of key=, jwks_url= and provider_metadata=")
        if not isinstance(require_low_s, bool):
            raise ConfigurationError("require_low_s must be a bool")
        self.require_low_s = require_low_s
        if required_typ is not None and (not isinstance(required_typ, str) or not required_typ):
            raise ConfigurationError("required_typ must be a non-empty string or None")
        self.algorithms = names
        self.max_token_bytes = int_option("max_token_bytes", max_token_bytes, 64)
        self._header_rules = HeaderRules(names, required_typ)
        self._claim_rules = ClaimRules(
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            required=required_claims,
            mapping=ClaimMapping(
                user_id_claim=user_id_claim,
                tier_claim=tier_claim,
                roles_claim=roles_claim,
                permissions_claim=permissions_claim,
                scope_claim=scope_claim,
                session_claim=session_claim,
                tier_map=tier_map,
                claims_mapper=claims_mapper,
            ),
        )
        self._static: dict[str, Verifier] | None = None
        self._jwks: JWKSClient | None = None
        if key is not None:
            self._static = load_static_key(key, names)
        else:
            if HMAC_ALGORITHMS.intersection(names):
                raise ConfigurationError("a JWKS provides public keys: HS* cannot use jwks_url")
            self._jwks = JWKSClient(
                jwks_url,
                names,
                metadata=provider_metadata,
                cache_ttl=jwks_cache_ttl,
                min_refresh_interval=jwks_min_refresh_interval,
                timeout=jwks_timeout,
                http_client=http_client,
            )
        self._clock = clock
        self._cache: TTLCache[Identity] = TTLCache(
            int_option("cache_size", cache_size, 0), clock, self._jwks
        )

    @classmethod
    def from_issuer(
        cls,
        issuer: str,
        *,
        algorithms: Iterable[str],
        audience: str | Iterable[str] | None = None,
        discovery_timeout: float = 5.0,
        http_client: httpx.AsyncClient | None = None,
        **options: Any,
    ) -> Self:
        """An authenticator for the tokens of the provider at ``issuer``.

        The provider's metadata (OpenID Connect Discovery, else RFC 8414) is read on first
        use, not here: its ``issuer`` must equal ``issuer`` exactly, and its ``jwks_uri``
        gives the keys; the document is refetched with the key set. Tokens must carry
        ``iss == issuer``. ``options`` are the constructor's (not ``key``/``jwks_url``).
        """
        for name in ("key", "jwks_url", "issuer", "provider_metadata"):
            if name in options:
                raise ConfigurationError(f"from_issuer() takes no {name}=")
        metadata = ProviderMetadata(
            issuer,
            timeout=discovery_timeout,
            cache_ttl=options.get("jwks_cache_ttl", 300),
            http_client=http_client,
        )
        return cls(
            algorithms=algorithms,
            issuer=issuer,
            audience=audience,
            provider_metadata=metadata,
            http_client=http_client,
            **options,
        )

    @property
    def jwks(self) -> JWKSClient | None:
        """The JWKS client when keys come from ``jwks_url`` or the provider metadata."""
        return self._jwks

    async def discover(self) -> None:
        """Fetch the provider metadata and key set now (e.g. at startup), raising what is
        wrong: DiscoveryError for an unusable document, ServiceUnavailableError when the
        provider or its key set cannot be reached. Requests never need this."""
        jwks = self._jwks
        if jwks is None:
            return
        if jwks.metadata is not None:
            await jwks.metadata.get(refresh=True)
            jwks.metadata.endpoint("jwks_uri")
        await jwks.refresh()
        if jwks.fetch_count == 0:
            raise ServiceUnavailableError("The signing keys could not be fetched.")

    @staticmethod
    def canonical_token(token: str) -> str:
        """``token`` spelled as this authenticator knows it: an ES* token with a high-S
        signature as its low-S twin, anything else unchanged. Key deny lists on this."""
        try:
            compact = parse_compact(token)
        except InvalidTokenError:
            return token
        alg = compact.header.get("alg")
        twin = ecdsa_low_s(alg, compact.signature) if isinstance(alg, str) else None
        return token if twin is None else _respelled(compact, twin)

    async def authenticate(self, conn: Connection) -> Identity | None:
        """The identity for ``conn.token``; None when the connection carries no token."""
        token = conn.token
        if token is None:
            return None
        # A cache hit (the common case) is answered here, without a second coroutine.
        digest, cached = self._lookup(token)
        return cached if cached is not None else await self._verify_uncached(token, digest)

    #: :meth:`cached` takes a token as text or as its ASCII bytes (as a header carries it).
    cached_takes_bytes = True

    def cached(self, token: str | bytes) -> Identity | None:
        """The identity of ``token`` when it was verified before and its entry is still live
        (its ``exp`` not reached, its key still published); else None. No I/O, no signature
        check: the middleware asks this first, and awaits :meth:`authenticate` only on a miss."""
        return self._cache.get(token_digest(token, self.max_token_bytes))

    async def verify(self, token: str) -> Identity:
        """Verify ``token`` and return its identity (InvalidTokenError when it is refused)."""
        digest, cached = self._lookup(token)
        return cached if cached is not None else await self._verify_uncached(token, digest)

    def _lookup(self, token: str) -> tuple[bytes, Identity | None]:
        """The token's cache key (its digest, computed once) and its cached identity, if any."""
        digest = token_digest(token, self.max_token_bytes)
        return digest, self._cache.get(digest)

    async def _verify_uncached(self, token: str, digest: bytes) -> Identity:
        """Parse and verify a token the cache does not hold; cache it when it has an ``exp``."""
        try:
            compact = parse_compact(token)
            alg, kid = self._header_rules.check(compact.header)
        except HTTPError:
            raise
        except Exception as exc:
            raise from_pyjwt_error(exc) from exc
        twin = ecdsa_low_s(alg, compact.signature)
        canonical: bytes | None = None
        if twin is not None:
            if self.require_low_s:
                raise InvalidTokenError("The token's signature is not in low-S form.")
            # Known by its low-S spelling: the twin's cache entry answers for this one.
            canonical = token_digest(_respelled(compact, twin), self.max_token_bytes)
            cached = self._cache.get(canonical)
            if cached is not None:
                return cached
        if self._static is not None:
            verifier = self._static[alg]
        else:
            assert self._jwks is not None
            verifier = await self._jwks.verifier(kid, alg)
        try:
            if not verifier[0].verify(compact.signing_input, verifier[1], compact.signature):
                raise InvalidTokenError("The token's signature is invalid.")
            identity = self._claim_rules.identity(compact.payload, self._clock(), "jwt")
        except HTTPError:
            raise
        except Exception as exc:
            raise from_pyjwt_error(exc) from exc
        if identity.expires_at is not None:
            used = (kid, alg, verifier)
            self._cache.put(canonical or digest, identity, identity.expires_at, used)
            if canonical is not None:  # this spelling too, for the cache's fast path
                self._cache.put(digest, identity, identity.expires_at, used)
        return identity

    def clear_cache(self) -> None:
        """Forget every verified token (e.g. after rotating a compromised key)."""
        self._cache.clear()


def _respelled(compact: Compact, signature: bytes) -> str:
    """The compact token of ``compact``'s header and payload with ``signature``."""
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=")
    return (compact.signing_input + b"." + encoded).decode("ascii")
