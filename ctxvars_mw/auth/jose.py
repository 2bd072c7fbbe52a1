"""Strict parsing of compact JWS tokens (RFC 7515), before any signature is checked.

PyJWT's own parser keeps the last of two repeated JSON members silently and accepts a few
header parameters we refuse, so tokens are split and decoded here, once: exactly three
non-empty base64url segments in canonical form, UTF-8 JSON objects with no repeated member
names and no ``NaN``/``Infinity``, and a header whose ``alg`` is on the allow-list and that
carries none of ``jku``, ``x5u``, ``jwk``, ``x5c`` (keys must come from configuration, not
from the token), ``crit`` (we implement no extension) or ``b64``.
"""

from __future__ import annotations

import binascii
import json
import re
import string
from typing import Any, NamedTuple, NoReturn

from .._memo import remember
from ..errors import InvalidTokenError

__all__ = ["Compact", "HeaderRules", "parse_compact"]

_COMPACT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_REFUSED_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "b64"})
_MAX_KID_LENGTH = 256
_MALFORMED = "The access token is malformed."
_SEXTET = {
    c: i for i, c in enumerate(string.ascii_uppercase + string.ascii_lowercase + "0123456789-_")
}
_UNUSED_BITS = (0, 0, 0b1111, 0b11)  # by length mod 4
_PADDING = ("", "", "==", "=")
_STANDARD = bytes.maketrans(b"-_", b"+/")


class Compact(NamedTuple):
    """A split, decoded, not yet verified token."""

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


class _DuplicateMemberError(ValueError):
    """A JSON object repeats a member name."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateMemberError
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


# Built once: json.loads() with hooks would build a new decoder for every call.
_decode_json = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_no_constant).decode


def _b64(segment: str) -> bytes:
    """Decode one canonical, unpadded, non-empty base64url segment (alphabet pre-checked)."""
    rem = len(segment) % 4
    # Canonical form: the unused low bits of the last character are zero (one token, one
    # spelling); a length of 1 mod 4 is never valid base64.
    if rem == 1 or _SEXTET[segment[-1]] & _UNUSED_BITS[rem]:
        raise InvalidTokenError(_MALFORMED)
    return binascii.a2b_base64((segment + _PADDING[rem]).encode("ascii").translate(_STANDARD))


def _object(raw: bytes) -> dict[str, Any]:
    try:
        value = _decode_json(raw.decode("utf-8"))
    except _DuplicateMemberError:
        raise InvalidTokenError("The access token repeats a member name.") from None
    except (ValueError, RecursionError):
        raise InvalidTokenError(_MALFORMED) from None
    if not isinstance(value, dict):
        raise InvalidTokenError(_MALFORMED)
    return value


# An issuer's tokens share one header segment (alg, kid, typ): its decoded form, a pure
# function of the segment, is remembered. Read-only for every caller; bounded, so a stream of
# made-up headers only churns it.
_headers: dict[str, dict[str, Any]] = {}
_HEADERS_MAX = 256


def parse_compact(token: str) -> Compact:
    """Split and decode ``token``; InvalidTokenError when it is not a well-formed JWS."""
    if _COMPACT_RE.fullmatch(token) is None:
        raise InvalidTokenError(_MALFORMED)
    header_b64, payload_b64, signature_b64 = token.split(".")
    try:
        header = _headers.get(header_b64)
        if header is None:
            header = remember(_headers, header_b64, _object(_b64(header_b64)), _HEADERS_MAX)
        payload = _object(_b64(payload_b64))
        signature = _b64(signature_b64)
    except binascii.Error:
        raise InvalidTokenError(_MALFORMED) from None
    signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
    return Compact(header, payload, signing_input, signature)


def _media_type(value: str) -> str:
    """A ``typ`` value normalized per RFC 7515 §4.1.9 (case-insensitive, optional prefix)."""
    value = value.lower()
    return value[12:] if value.startswith("application/") else value


class HeaderRules:
    """What a token's JOSE header must satisfy: the allow-list and an optional ``typ``."""

    __slots__ = ("algorithms", "typ")

    def __init__(self, algorithms: tuple[str, ...], required_typ: str | None) -> None:
        self.algorithms = frozenset(algorithms)
        self.typ = None if required_typ is None else _media_type(required_typ)

    def check(self, header: dict[str, Any]) -> tuple[str, str | None]:
        """The token's ``(alg, kid)``; InvalidTokenError when the header is refused."""
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidTokenError("The token's signing algorithm is not allowed.")
        if not _REFUSED_HEADERS.isdisjoint(header):
            raise InvalidTokenError("The token's header carries a parameter that is refused.")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_LENGTH):
            raise InvalidTokenError("The token's key id is malformed.")
        if self.typ is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or _media_type(typ) != self.typ:
                raise InvalidTokenError("The token's type is not the one required.")
        return alg, kid
