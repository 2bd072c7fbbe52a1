"""JWTAuthenticator: bearer JWTs verified with PyJWT's algorithms and keys loaded once.

Verification order: size limit → verified-token cache → strict parsing (:mod:`.jose`:
three canonical segments, no repeated JSON members, refused header parameters, the
allow-list) → the key (configured, or from the JWKS by ``kid``) → the signature (PyJWT's
algorithm implementation with the key object prepared at construction) → the claims
(:mod:`.claims`). Every failure is an :class:`InvalidTokenError` (or
:class:`ExpiredTokenError`) — a 401, never a 500; an unreachable JWKS with no key set yet is
a :class:`ServiceUnavailableError` (503).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import jwt.exceptions as jwt_errors

from ..errors import (
    ConfigurationError,
    ExpiredTokenError,
    HTTPError,
    InvalidTokenError,
)
from .base import Connection, Identity
from .cache import TTLCache, token_digest
from .claims import ClaimNames, ClaimRules
from .jose import HeaderRules, parse_compact
from .jwks import JWKSClient
from .keys import HMAC_ALGORITHMS, Verifier, check_algorithms, load_static_key
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
    JWK dict, or for ``HS*`` a secret of at least the hash size) and ``jwks_url`` (https, or
    http on a loopback host). ``algorithms`` is the mandatory allow-list. Claims are mapped to
    the :class:`Identity`: ``user_id_claim`` → user id, ``tier_claim`` → tier,
    ``roles_claim``/``permissions_claim`` → lists of strings, ``scope_claim`` → scopes (a
    space-separated string or a list), ``session_claim`` → session id. Verified tokens are
    cached (an LRU of ``cache_size`` entries keyed by a SHA-256 of the token, each until the
    token's ``exp``; ``cache_size=0`` disables it). ``http_client`` (optional) is used for
    JWKS fetches instead of a short-lived client per fetch; ``clock`` is for tests.
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
        roles_claim: str = "roles",
        permissions_claim: str = "permissions",
        scope_claim: str = "scope",
        session_claim: str = "sid",
        required_typ: str | None = None,
        max_token_bytes: int = 8192,
        jwks_cache_ttl: float = 300,
        jwks_min_refresh_interval: float = 5,
        cache_size: int = 10_000,
        jwks_timeout: float = 5.0,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        names = check_algorithms(algorithms)
        if (key is None) == (jwks_url is None):
            raise ConfigurationError("give exactly one of key= and jwks_url=")
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
            names=ClaimNames(
                user_id_claim,
                tier_claim,
                roles_claim,
                permissions_claim,
                scope_claim,
                session_claim,
            ),
        )
        self._static: dict[str, Verifier] | None = None
        self._jwks: JWKSClient | None = None
        if key is not None:
            self._static = load_static_key(key, names)
        else:
            if HMAC_ALGORITHMS.intersection(names):
                raise ConfigurationError("a JWKS provides public keys: HS* cannot use jwks_url")
            assert jwks_url is not None
            self._jwks = JWKSClient(
                jwks_url,
                names,
                cache_ttl=jwks_cache_ttl,
                min_refresh_interval=jwks_min_refresh_interval,
                timeout=jwks_timeout,
                http_client=http_client,
            )
        self._clock = clock
        self._cache: TTLCache[Identity] = TTLCache(int_option("cache_size", cache_size, 0), clock)

    @property
    def jwks(self) -> JWKSClient | None:
        """The JWKS client when keys come from ``jwks_url``."""
        return self._jwks

    async def authenticate(self, conn: Connection) -> Identity | None:
        """The identity for ``conn.token``; None when the connection carries no token."""
        token = conn.token
        if token is None:
            return None
        # A cache hit (the common case) is answered here, without a second coroutine.
        digest, cached = self._lookup(token)
        return cached if cached is not None else await self._verify_uncached(token, digest)

    async def verify(self, token: str) -> Identity:
        """Verify ``token`` and return its identity (InvalidTokenError when it is refused)."""
        digest, cached = self._lookup(token)
        return cached if cached is not None else await self._verify_uncached(token, digest)

    def _lookup(self, token: str, digest: bytes | None = None) -> tuple[bytes, Identity | None]:
        """The token's cache key (its digest, computed once: ``digest`` when the caller has
        it already) and its cached identity, if any."""
        if len(token) > self.max_token_bytes:
            raise InvalidTokenError("The access token is too large.")
        if digest is None:
            digest = token_digest(token)
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
            self._cache.put(digest, identity, identity.expires_at)
        return identity

    def clear_cache(self) -> None:
        """Forget every verified token (e.g. after rotating a compromised key)."""
        self._cache.clear()
