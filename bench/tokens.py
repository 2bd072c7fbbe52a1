"""Real keys and real tokens (PyJWT) for the authenticated benchmark rows."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://auth.bench.example.org/"
AUDIENCE = "ctxvars-bench"
HS_SECRET = b"bench-secret-" + bytes(range(48))  # 61 bytes, above RFC 7518's 256-bit minimum
SUBJECT = "auth0|5f7c8ec7c33c6c004bbafe82"
_serial = itertools.count()


@functools.cache
def rsa_private_key() -> rsa.RSAPrivateKey:
    """A 2048-bit RSA key, generated once per process."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def verification_key(alg: str) -> Any:
    """The key a verifier holds: the HS256 secret, or the RSA public key object."""
    return HS_SECRET if alg == "HS256" else rsa_private_key().public_key()


def mint(alg: str, *, unique: bool = True) -> str:
    """A realistic access token (roles, tier, scope); ``unique`` gives it its own ``jti``."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": SUBJECT,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 3600,
        "tier": "business",
        "roles": ["user"],
        "scope": "reports:read",
    }
    if unique:
        claims["jti"] = f"bench-{next(_serial):08d}"
    signing_key: Any = HS_SECRET if alg == "HS256" else rsa_private_key()
    return jwt.encode(claims, signing_key, algorithm=alg)


def mint_many(alg: str, count: int) -> list[str]:
    """``count`` distinct tokens (each defeats any verified-token cache)."""
    return [mint(alg) for _ in range(count)]


def pyjwt_decoder(alg: str) -> Callable[[str], dict[str, Any]]:
    """PyJWT's own ``jwt.decode`` with the checks a real verifier makes (the raw baseline)."""
    key = verification_key(alg)
    algorithms = [alg]
    options = {"require": ["exp", "sub"]}

    def decode(token: str) -> dict[str, Any]:
        return jwt.decode(
            token,
            key,
            algorithms=algorithms,
            issuer=ISSUER,
            audience=AUDIENCE,
            leeway=30,
            options=options,  # type: ignore[arg-type]
        )

    return decode


def jwt_authenticator(alg: str, *, cache_size: int | None = None) -> Any | None:
    """A ``JWTAuthenticator`` for ``alg``, or None while ``ctxvars_mw.auth.jwt`` is not there."""
    try:
        from ctxvars_mw.auth.jwt import JWTAuthenticator
    except ImportError:
        return None
    options: dict[str, Any] = {
        "key": verification_key(alg),
        "algorithms": [alg],
        "issuer": ISSUER,
        "audience": AUDIENCE,
    }
    if cache_size is not None:
        options["cache_size"] = cache_size
    return JWTAuthenticator(**options)
