"""Verification keys for JWTs, loaded once into key objects for each allowed algorithm.

Decisions (documented in the README):

- The algorithm allow-list is mandatory and explicit; ``none`` is never accepted, and HMAC
  (``HS*``) may not be mixed with public-key algorithms in one authenticator (that mix is
  what algorithm-confusion attacks exploit).
- An HMAC secret must be at least as long as the hash output (32 bytes for HS256, 48 for
  HS384, 64 for HS512, RFC 7518 §3.2); a PEM/SSH/DER key is refused as a secret.
- RS/PS/ES/EdDSA keys must be *public* keys: a verifier has no business holding the signing
  key, so a private key is refused (pass ``private_key.public_key()``). RSA keys must have
  at least 2048 bits; an EC key's curve must match the algorithm.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt import PyJWK
from jwt.algorithms import Algorithm, HMACAlgorithm, get_default_algorithms

from ..errors import ConfigurationError

__all__ = [
    "HMAC_ALGORITHMS",
    "SUPPORTED_ALGORITHMS",
    "Verifier",
    "check_algorithms",
    "ecdsa_low_s",
    "jwk_thumbprint",
    "load_jwks",
    "load_jwks_entries",
    "load_static_key",
]

logger = logging.getLogger("ctxvars_mw.auth")

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_FAMILIES: dict[str, frozenset[str]] = {
    "oct": HMAC_ALGORITHMS,
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES256K", "ES384", "ES512"}),
    "OKP": frozenset({"EdDSA"}),
}
SUPPORTED_ALGORITHMS = frozenset().union(*_FAMILIES.values())
_PUBLIC_TYPES = (RSAPublicKey, EllipticCurvePublicKey, Ed25519PublicKey, Ed448PublicKey)
_ALGORITHMS: dict[str, Algorithm] = {
    name: alg for name, alg in get_default_algorithms().items() if name in SUPPORTED_ALGORITHMS
}
#: At most this many keys of a JWKS are considered.
MAX_JWKS_KEYS = 64

#: An algorithm's implementation and the key object it verifies with.
Verifier = tuple[Algorithm, Any]


class _KeyedHMAC(HMACAlgorithm):
    """PyJWT's HMAC algorithm, verifying with an HMAC whose key was absorbed once.

    The "key object" of an HS* verifier is ``hmac.new(secret, digestmod=...)``: each token
    copies that keyed state instead of hashing the padded secret again (RFC 2104's
    precomputation, done by the standard library's own ``copy()``; about 1.3 µs less per
    token). The comparison is constant-time, as in PyJWT.
    """

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:
        mac = key.copy()
        mac.update(msg)
        return hmac.compare_digest(sig, mac.digest())


_KEYED_HMAC = {
    "HS256": _KeyedHMAC(HMACAlgorithm.SHA256),
    "HS384": _KeyedHMAC(HMACAlgorithm.SHA384),
    "HS512": _KeyedHMAC(HMACAlgorithm.SHA512),
}


def check_algorithms(algorithms: Iterable[str]) -> tuple[str, ...]:
    """The allow-list, validated: non-empty, supported names, no HS/public-key mix."""
    if isinstance(algorithms, (str, bytes)) or not isinstance(algorithms, Iterable):
        raise ConfigurationError('algorithms must be a list of names, e.g. ["RS256"]')
    names = tuple(dict.fromkeys(algorithms))
    if not names:
        raise ConfigurationError("algorithms must name at least one algorithm")
    for name in names:
        if not isinstance(name, str) or name not in SUPPORTED_ALGORITHMS:
            shown = name if isinstance(name, str) and len(name) <= 16 else "?"
            raise ConfigurationError(
                f"unsupported algorithm {shown!r} (never 'none'); "
                f"choose from {sorted(SUPPORTED_ALGORITHMS)}"
            )
    hmac = [n for n in names if n in HMAC_ALGORITHMS]
    if hmac and len(hmac) != len(names):
        raise ConfigurationError("HS* algorithms cannot be mixed with public-key algorithms")
    return names


def _material(key: Any, alg: Algorithm) -> Any:
    """``key`` in a form ``alg.prepare_key`` accepts (JWKs are converted first)."""
    if isinstance(key, PyJWK):
        return key.key
    if isinstance(key, Mapping):
        return alg.from_jwk(json.dumps(dict(key)))
    return key


def _prepare(name: str, material: Any) -> Verifier:
    """Load ``material`` for algorithm ``name``; ConfigurationError when it does not fit."""
    alg = _ALGORITHMS[name]
    try:
        prepared = alg.prepare_key(_material(material, alg))
    except Exception as exc:  # PyJWT/cryptography raise many types for unusable keys
        raise ConfigurationError(
            f"the key cannot verify {name} tokens ({type(exc).__name__})"
        ) from exc
    hmac_key = name in HMAC_ALGORITHMS
    if hmac_key:
        if not isinstance(prepared, bytes):
            raise ConfigurationError(f"the key for {name} must be a secret (str or bytes)")
    elif not isinstance(prepared, _PUBLIC_TYPES):
        raise ConfigurationError(
            f"the key for {name} must be a public key (pass private_key.public_key())"
        )
    problem = alg.check_key_length(prepared)
    if problem:
        raise ConfigurationError(f"the key is too weak for {name}: {problem}")
    if hmac_key:
        keyed = _KEYED_HMAC[name]
        return keyed, hmac.new(prepared, digestmod=keyed.hash_alg)
    return alg, prepared


def load_static_key(key: Any, algorithms: tuple[str, ...]) -> dict[str, Verifier]:
    """One verifier per allowed algorithm for a configured key (PEM, key object or JWK)."""
    if isinstance(key, Mapping):
        declared = key.get("alg")
        if declared is not None and any(name != declared for name in algorithms):
            raise ConfigurationError("the JWK's 'alg' does not match every allowed algorithm")
    return {name: _prepare(name, key) for name in algorithms}


#: The members of each key type that RFC 7638 thumbprints cover.
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK (base64url), naming the key itself:
    the same ``kid`` republished with other key material has another thumbprint."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty"), ())  # type: ignore[arg-type]
    canonical = {name: jwk.get(name) for name in members}
    text = json.dumps(canonical, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def load_jwks(document: Any, algorithms: tuple[str, ...]) -> dict[tuple[str, str], Verifier]:
    """The usable signing keys of a JWKS document, keyed by ``(kid, alg)``.

    Keys without a ``kid``, not for signing, of an unknown type, private, weak or not
    matching an allowed algorithm are skipped. Raises ValueError for a malformed document.
    """
    return {key: entry[1] for key, entry in load_jwks_entries(document, algorithms).items()}


def load_jwks_entries(
    document: Any, algorithms: tuple[str, ...]
) -> dict[tuple[str, str], tuple[str, Verifier]]:
    """As :func:`load_jwks`, each verifier with its key's RFC 7638 thumbprint."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS must be a JSON object with a 'keys' list")
    allowed = frozenset(algorithms)
    keys: dict[tuple[str, str], tuple[str, Verifier]] = {}
    for jwk in document["keys"][:MAX_JWKS_KEYS]:
        if not isinstance(jwk, dict):
            continue
        kid, kty = jwk.get("kid"), jwk.get("kty")
        if not isinstance(kid, str) or not kid or jwk.get("use", "sig") != "sig" or kty == "oct":
            continue
        candidates = _FAMILIES.get(kty, frozenset()) if isinstance(kty, str) else frozenset()
        declared = jwk.get("alg")
        if declared is not None:
            candidates = candidates & {declared}
        for name in sorted(candidates & allowed):
            try:
                keys[kid, name] = (jwk_thumbprint(jwk), _prepare(name, jwk))
            except ConfigurationError:
                logger.debug("skipped a JWKS key unusable for %s", name)
    return keys


#: The group order n of each ES* algorithm's curve (SEC 2; RFC 7518 §3.4 and RFC 8812).
_CURVE_ORDERS = {
    "ES256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "ES256K": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "ES384": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
        "C7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "ES512": int(
        "01" + "F" * 64 + "FA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16
    ),
}


def ecdsa_low_s(alg: str, signature: bytes) -> bytes | None:
    """For an ES* signature (raw ``r || s``, RFC 7518 §3.4) whose ``s`` is above n/2, its
    low-S twin ``r || n - s``; None when ``alg`` is not ES*, the signature is low-S already
    or not of the curve's length.

    ECDSA accepts both (r, s) and (r, n - s): without this a token has two valid spellings,
    and whatever is keyed on the token's bytes sees two tokens. Signers need not pick the
    low one (OpenSSL, hence most providers, picks either about equally often).
    """
    order = _CURVE_ORDERS.get(alg)
    if order is None:
        return None
    size = (order.bit_length() + 7) // 8
    if len(signature) != 2 * size:
        return None
    s = int.from_bytes(signature[size:], "big")
    if s <= order >> 1 or s >= order:
        return None
    return signature[:size] + (order - s).to_bytes(size, "big")
