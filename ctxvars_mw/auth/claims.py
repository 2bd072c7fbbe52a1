"""Claim validation, and the verified claims turned into an :class:`Identity`.

Shared by the JWT and introspection authenticators. Types are strict: time claims are JSON
numbers (not strings, not booleans, finite, before year 10000), ``iss`` is a string, ``aud``
a string or a list of strings, ``roles``/``permissions`` lists of non-empty strings,
``scope`` a space-separated string or a list of strings, ``client_id``/``azp`` strings, the
user id a non-empty, non-placeholder string under the current id rules. Where each value is
found (claim paths, tier names, the ``claims_mapper`` hook) is :mod:`.mapping`'s part.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigurationError, ExpiredTokenError, InvalidTokenError
from ..frozen import freeze_mapping
from .base import Identity
from .mapping import ClaimMapping, lookup, parse_path

__all__ = ["ClaimRules", "string_set"]

_MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z


def string_set(name: str, value: Iterable[str] | str | None) -> frozenset[str] | None:
    """An option given as one string or a collection of strings, as a frozenset."""
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigurationError(f"{name} must be a non-empty string or list of strings")
    return frozenset(items)


def _time(payload: dict[str, Any], name: str) -> float | None:
    if name not in payload:
        return None
    value: Any = payload[name]
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= _MAX_TIME:
        raise InvalidTokenError(f"The token's '{name}' claim is not a valid time.")
    return float(value)


class ClaimRules:
    """Issuer, audience, leeway and required claims, checked against a payload."""

    __slots__ = ("audience", "issuer", "leeway", "mapping", "required", "strict_audience")

    def __init__(
        self,
        *,
        issuer: Iterable[str] | str | None,
        audience: Iterable[str] | str | None,
        leeway: float,
        required: Iterable[str],
        mapping: ClaimMapping,
        strict_audience: bool = True,
    ) -> None:
        if isinstance(leeway, bool) or not isinstance(leeway, (int, float)):
            raise ConfigurationError("leeway must be a number of seconds")
        if not 0 <= leeway <= 600:
            raise ConfigurationError("leeway must be between 0 and 600 seconds")
        if isinstance(required, str):
            raise ConfigurationError("required_claims must be a collection of claim names")
        self.issuer = string_set("issuer", issuer)
        self.audience = string_set("audience", audience)
        self.leeway = float(leeway)
        self.required = tuple(parse_path("required_claims", c) for c in required)
        self.mapping = mapping
        #: Refuse a token that names an audience when none is configured (as PyJWT does).
        self.strict_audience = strict_audience

    def _check_times(self, payload: dict[str, Any], now: float) -> float | None:
        exp = _time(payload, "exp")
        if exp is not None and exp <= now - self.leeway:
            raise ExpiredTokenError()
        nbf = _time(payload, "nbf")
        if nbf is not None and nbf > now + self.leeway:
            raise InvalidTokenError("The access token is not valid yet.")
        iat = _time(payload, "iat")
        if iat is not None and iat > now + self.leeway:
            raise InvalidTokenError("The access token was issued in the future.")
        return exp

    def _check_parties(self, payload: dict[str, Any]) -> None:
        if self.issuer is not None:
            iss = payload.get("iss")
            if type(iss) is not str or iss not in self.issuer:
                raise InvalidTokenError("The token's issuer is not accepted.")
        aud = payload.get("aud")
        if self.audience is None:
            if aud is not None and self.strict_audience:
                raise InvalidTokenError("The token names an audience this service does not.")
            return
        audiences = [aud] if type(aud) is str else aud
        if (
            type(audiences) is not list
            or not all(type(a) is str for a in audiences)
            or self.audience.isdisjoint(audiences)
        ):
            raise InvalidTokenError("The token is not meant for this audience.")

    def identity(self, payload: dict[str, Any], now: float, auth_method: str) -> Identity:
        """Validate ``payload`` at time ``now`` and map it to an Identity."""
        for path in self.required:
            if lookup(payload, path) is None:
                raise InvalidTokenError(f"The token lacks the required '{path[-1]}' claim.")
        exp = self._check_times(payload, now)
        self._check_parties(payload)
        mapping = self.mapping
        user_id = mapping.user_id_of(payload)
        jti = payload.get("jti")
        if jti is not None and type(jti) is not str:
            raise InvalidTokenError("The token's 'jti' claim must be a string.")
        claims = freeze_mapping(payload)
        tier, roles, permissions = mapping.hooked(
            claims,
            mapping.tier_of(lookup(payload, mapping.tier)),
            mapping.roles_of(payload),
            mapping.permissions_of(payload),
        )
        return Identity(
            user_id=user_id,
            tier=tier,
            roles=roles,
            permissions=permissions,
            scopes=mapping.scopes_of(payload),
            session_id=mapping.session_of(payload),
            claims=claims,
            auth_method=auth_method,
            expires_at=exp,
            client_id=mapping.client_id_of(payload),
        )
