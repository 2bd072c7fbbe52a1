"""Claim validation and the mapping of verified claims to an :class:`Identity`.

Shared by the JWT and introspection authenticators. Types are strict: time claims are JSON
numbers (not strings, not booleans, finite, before year 10000), ``iss`` is a string, ``aud``
a string or a list of strings, ``roles``/``permissions`` lists of non-empty strings,
``scope`` a space-separated string or a list of strings, ``tier`` a :class:`Tier` value, the
user id a non-empty, non-placeholder string under the current id rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, ExpiredTokenError, InvalidTokenError
from ..frozen import freeze_mapping
from ..ids import get_id_rules, is_valid_id
from ..tier import Tier
from .base import Identity

__all__ = ["ClaimNames", "ClaimRules", "string_set"]

_MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z
_MAX_ITEMS = 1000


def string_set(name: str, value: Iterable[str] | str | None) -> frozenset[str] | None:
    """An option given as one string or a collection of strings, as a frozenset."""
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigurationError(f"{name} must be a non-empty string or list of strings")
    return frozenset(items)


def _claim_name(option: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{option} must be a non-empty claim name")
    return value


@dataclass(frozen=True, slots=True)
class ClaimNames:
    """Which claims carry the user id, tier, roles, permissions, scopes and session id."""

    user_id: str = "sub"
    tier: str = "tier"
    roles: str = "roles"
    permissions: str = "permissions"
    scope: str = "scope"
    session: str = "sid"

    def __post_init__(self) -> None:
        for option in ("user_id", "tier", "roles", "permissions", "scope", "session"):
            _claim_name(f"{option}_claim", getattr(self, option))


def _time(payload: dict[str, Any], name: str) -> float | None:
    if name not in payload:
        return None
    value: Any = payload[name]
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= _MAX_TIME:
        raise InvalidTokenError(f"The token's '{name}' claim is not a valid time.")
    return float(value)


def _strings(payload: dict[str, Any], name: str) -> frozenset[str]:
    value = payload.get(name)
    if value is None:
        return frozenset()
    if (
        type(value) is not list
        or len(value) > _MAX_ITEMS
        or not all(type(item) is str and item for item in value)
    ):
        raise InvalidTokenError(f"The token's '{name}' claim must be a list of strings.")
    return frozenset(value)


def _scopes(payload: dict[str, Any], name: str) -> frozenset[str]:
    value = payload.get(name)
    if value is None:
        return frozenset()
    if type(value) is str:
        return frozenset(value.split())
    if type(value) is not list:
        raise InvalidTokenError(f"The token's '{name}' claim must be a string or a list.")
    return _strings(payload, name)


class ClaimRules:
    """Issuer, audience, leeway and required claims, checked against a payload."""

    __slots__ = ("audience", "issuer", "leeway", "names", "required", "strict_audience")

    def __init__(
        self,
        *,
        issuer: Iterable[str] | str | None,
        audience: Iterable[str] | str | None,
        leeway: float,
        required: Iterable[str],
        names: ClaimNames,
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
        self.required = tuple(_claim_name("required_claims", c) for c in required)
        self.names = names
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
        for claim in self.required:
            if payload.get(claim) is None:
                raise InvalidTokenError(f"The token lacks the required '{claim}' claim.")
        exp = self._check_times(payload, now)
        self._check_parties(payload)
        names = self.names
        user_id = payload.get(names.user_id)
        if type(user_id) is not str or not is_valid_id(user_id, get_id_rules()):
            raise InvalidTokenError("The token's subject is not a valid user id.")
        jti = payload.get("jti")
        if jti is not None and type(jti) is not str:
            raise InvalidTokenError("The token's 'jti' claim must be a string.")
        tier_value = payload.get(names.tier)
        tier = None
        if tier_value is not None:
            try:
                tier = Tier.parse(tier_value)
            except ValueError:
                raise InvalidTokenError("The token's tier is unknown.") from None
        session = payload.get(names.session)
        if session is not None and (type(session) is not str or not session):
            raise InvalidTokenError("The token's session id is malformed.")
        return Identity(
            user_id=user_id,
            tier=tier,
            roles=_strings(payload, names.roles),
            permissions=_strings(payload, names.permissions),
            scopes=_scopes(payload, names.scope),
            session_id=session,
            claims=freeze_mapping(payload),
            auth_method=auth_method,
            expires_at=exp,
        )
