"""Where an identity provider puts the user, tier, roles and permissions among its claims.

Claim options take a *claim path*: dotted segments into nested objects
(``"realm_access.roles"``, ``"resource_access.my-api.roles"``), with a segment that itself
contains dots written in brackets (``"[https://example.com/roles]"``, Auth0's namespaced
claims; ``"[https://example.com/app].plan"``). An unbracketed ``://`` is refused at
construction, so a URL-named claim can never silently read as empty. ``roles_claim`` and
``permissions_claim`` may name several paths: their lists are joined. A path whose object
is missing is an absent claim; a value of the wrong type refuses the token.

``tier_map`` turns the provider's own plan or group names into tiers (``{"gold":
Tier.ENTERPRISE}``); a tier claim may be one name or a list of names (the highest tier
wins). ``claims_mapper`` is the hook for anything else: it receives the verified, frozen
claims and returns a mapping with any of ``"tier"``, ``"roles"``, ``"permissions"``, which
replace what the claim options found (return None or ``{}`` to keep them; raise
:class:`~ctxvars_mw.InvalidTokenError` to refuse the token).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import ConfigurationError, InvalidTokenError
from ..ids import get_id_rules, is_valid_id
from ..tier import Tier

__all__ = ["ClaimMapper", "ClaimMapping", "ClaimPath", "lookup", "parse_path"]

logger = logging.getLogger("ctxvars_mw.auth")

#: A claim path, parsed: its segments.
ClaimPath = tuple[str, ...]
#: The ``claims_mapper`` hook: verified claims → overrides for tier / roles / permissions.
ClaimMapper = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]

_MAX_ITEMS = 1000
_SEGMENT = re.compile(r"\[([^\[\]]+)\]|([^.\[\]]+)")
_BRACKETED = re.compile(r"\[[^\[\]]*\]")
_HOOK_KEYS = frozenset({"tier", "roles", "permissions"})


def parse_path(option: str, value: object) -> ClaimPath:
    """The segments of claim path ``value`` (ConfigurationError when it is malformed)."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{option} must be a non-empty claim path")
    if "://" in _BRACKETED.sub("", value):
        raise ConfigurationError(
            f"{option}: a claim named by a URL goes in brackets, e.g. '[https://example.com/roles]'"
        )
    segments: list[str] = []
    pos = 0
    while True:
        match = _SEGMENT.match(value, pos)
        if match is None:
            raise ConfigurationError(
                f"{option}: {value!r} is not a claim path (dotted names; a name that "
                "contains dots goes in brackets, e.g. '[https://example.com/roles]')"
            )
        bare = match.group(2)
        segments.append(match.group(1) if bare is None else bare)
        pos = match.end()
        if pos == len(value):
            return tuple(segments)
        if value[pos] != "." or pos + 1 == len(value):
            raise ConfigurationError(f"{option}: {value!r} is not a claim path")
        pos += 1


def _paths(option: str, value: object) -> tuple[ClaimPath, ...]:
    if isinstance(value, str):
        return (parse_path(option, value),)
    if not isinstance(value, Iterable):
        raise ConfigurationError(f"{option} must be a claim path or a list of claim paths")
    paths = tuple(parse_path(option, item) for item in value)
    if not paths:
        raise ConfigurationError(f"{option} must name at least one claim path")
    return paths


def lookup(payload: Mapping[str, Any], path: ClaimPath) -> Any:
    """The value at ``path`` in ``payload``, or None when any object on the way is missing."""
    value: Any = payload
    for segment in path:
        if type(value) is not dict and not isinstance(value, Mapping):  # JSON: dicts, mostly
            return None
        value = value.get(segment)
        if value is None:
            return None
    return value


def _shown(path: ClaimPath) -> str:
    return ".".join(s if "." not in s else f"[{s}]" for s in path)


def _strings(payload: Mapping[str, Any], path: ClaimPath) -> frozenset[str]:
    value = lookup(payload, path)
    if value is None:
        return frozenset()
    if (
        not isinstance(value, (list, tuple))
        or len(value) > _MAX_ITEMS
        or not all(type(item) is str and item for item in value)
    ):
        raise InvalidTokenError(f"The token's '{_shown(path)}' claim must be a list of strings.")
    return frozenset(value)


def _tier_map(value: object) -> dict[str, Tier]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError("tier_map must map the provider's names to tiers")
    mapped: dict[str, Tier] = {}
    for name, tier in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError("tier_map's keys must be non-empty strings")
        try:
            mapped[name] = tier if isinstance(tier, Tier) else Tier.parse(tier)
        except (ValueError, TypeError):
            raise ConfigurationError(f"tier_map[{name!r}] is not a tier") from None
    return mapped


class ClaimMapping:
    """Which claims carry the user id, tier, roles, permissions, scopes, session and client."""

    __slots__ = (
        "fallback_user_id",
        "mapper",
        "permissions",
        "roles",
        "scope",
        "session",
        "tier",
        "tier_map",
        "user_id",
    )

    def __init__(
        self,
        *,
        user_id_claim: str = "sub",
        fallback_user_id_claim: str | None = None,
        tier_claim: str = "tier",
        roles_claim: str | Iterable[str] = "roles",
        permissions_claim: str | Iterable[str] = "permissions",
        scope_claim: str = "scope",
        session_claim: str = "sid",
        tier_map: Mapping[str, Tier | str] | None = None,
        claims_mapper: ClaimMapper | None = None,
    ) -> None:
        self.user_id = parse_path("user_id_claim", user_id_claim)
        self.fallback_user_id = (
            None
            if fallback_user_id_claim is None
            else parse_path("fallback_user_id_claim", fallback_user_id_claim)
        )
        self.tier = parse_path("tier_claim", tier_claim)
        self.roles = _paths("roles_claim", roles_claim)
        self.permissions = _paths("permissions_claim", permissions_claim)
        self.scope = parse_path("scope_claim", scope_claim)
        self.session = parse_path("session_claim", session_claim)
        self.tier_map = _tier_map(tier_map)
        if claims_mapper is not None and not callable(claims_mapper):
            raise ConfigurationError("claims_mapper must be a callable")
        self.mapper = claims_mapper

    def user_id_of(self, payload: Mapping[str, Any]) -> str:
        """The user id (the fallback claim's value when the user id claim is absent)."""
        user_id = lookup(payload, self.user_id)
        if user_id is None and self.fallback_user_id is not None:
            user_id = lookup(payload, self.fallback_user_id)
        if type(user_id) is not str or not is_valid_id(user_id, get_id_rules()):
            raise InvalidTokenError("The token's subject is not a valid user id.")
        return user_id

    def _one_tier(self, name: str) -> Tier | None:
        mapped = self.tier_map.get(name)
        if mapped is not None:
            return mapped
        try:
            return Tier.parse(name)
        except ValueError:
            if self.tier_map:
                return None  # a name the map leaves out: no tier (the lowest)
            raise InvalidTokenError("The token's tier is unknown.") from None

    def tier_of(self, value: Any) -> Tier | None:
        """The tier for a tier claim value: one name, or a list of names (the highest)."""
        if value is None:
            return None
        if type(value) is str:
            return self._one_tier(value)
        if isinstance(value, (list, tuple)) and len(value) <= _MAX_ITEMS:
            if not all(type(item) is str for item in value):
                raise InvalidTokenError("The token's tier claim must hold names.")
            tiers = [tier for tier in map(self._one_tier, value) if tier is not None]
            return max(tiers) if tiers else None
        raise InvalidTokenError("The token's tier is unknown.")

    def roles_of(self, payload: Mapping[str, Any]) -> frozenset[str]:
        """Every role named under the roles paths."""
        return frozenset().union(*(_strings(payload, path) for path in self.roles))

    def permissions_of(self, payload: Mapping[str, Any]) -> frozenset[str]:
        """Every permission named under the permissions paths."""
        return frozenset().union(*(_strings(payload, path) for path in self.permissions))

    def scopes_of(self, payload: Mapping[str, Any]) -> frozenset[str]:
        """The scopes: a space-separated string or a list of strings."""
        value = lookup(payload, self.scope)
        if type(value) is str:
            return frozenset(value.split())
        if value is not None and not isinstance(value, (list, tuple)):
            raise InvalidTokenError(f"The token's '{_shown(self.scope)}' claim is malformed.")
        return _strings(payload, self.scope)

    def session_of(self, payload: Mapping[str, Any]) -> str | None:
        """The session id, if the token carries one."""
        session = lookup(payload, self.session)
        if session is not None and (type(session) is not str or not session):
            raise InvalidTokenError("The token's session id is malformed.")
        return session

    @staticmethod
    def client_id_of(payload: Mapping[str, Any]) -> str | None:
        """The OAuth client the token was issued to: ``client_id`` (RFC 9068, RFC 7662), else
        ``azp`` (OpenID Connect's authorized party)."""
        for name in ("client_id", "azp"):
            value = payload.get(name)
            if value is not None:
                if type(value) is not str or not value:
                    raise InvalidTokenError(f"The token's '{name}' claim is malformed.")
                return value
        return None

    def hooked(
        self,
        claims: Mapping[str, Any],
        tier: Tier | None,
        roles: frozenset[str],
        permissions: frozenset[str],
    ) -> tuple[Tier | None, frozenset[str], frozenset[str]]:
        """Tier, roles and permissions after the ``claims_mapper`` hook (if any)."""
        if self.mapper is None:
            return tier, roles, permissions
        try:
            result = self.mapper(claims)
            if not result:
                return tier, roles, permissions
            if not isinstance(result, Mapping) or not _HOOK_KEYS.issuperset(result):
                raise TypeError("it must return a mapping of tier / roles / permissions")
            if "tier" in result:
                tier = None if result["tier"] is None else self._hook_tier(result["tier"])
            if "roles" in result:
                roles = _names(result["roles"])
            if "permissions" in result:
                permissions = _names(result["permissions"])
        except InvalidTokenError:
            raise
        except Exception as exc:
            # The type only: the message may quote claim values.
            logger.error("claims_mapper failed (%s); refusing the token", type(exc).__name__)
            raise InvalidTokenError("The token's claims could not be mapped.") from None
        return tier, roles, permissions

    def _hook_tier(self, value: object) -> Tier:
        if isinstance(value, Tier):
            return value
        if not isinstance(value, str):
            raise TypeError("the tier must be a Tier or a tier name")
        return self.tier_map[value] if value in self.tier_map else Tier.parse(value)


def _names(value: object) -> frozenset[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError("roles and permissions must be collections of strings")
    items = frozenset(value)
    if not all(isinstance(item, str) and item for item in items):
        raise TypeError("roles and permissions must be non-empty strings")
    return items
