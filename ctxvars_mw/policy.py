"""Policy: which permissions each role grants and which features each tier unlocks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._memo import remember
from .errors import ConfigurationError
from .ratelimit.declarations import TierLimits, compile_tier_limits, limits_to_data
from .tier import Tier

__all__ = ["Policy", "check_name", "check_permission"]

_DEFAULT_ROLE_PERMISSIONS: dict[str, tuple[str, ...]] = {
    "readonly": ("threads:read", "agents:read"),
    "user": ("threads:write", "agents:execute", "tools:execute"),
    "admin": (
        "threads:delete",
        "agents:manage",
        "tools:manage",
        "users:read",
        "users:manage",
        "billing:read",
        "billing:manage",
        "resources:read_any",
    ),
}
_DEFAULT_ROLE_INHERITS: dict[str, tuple[str, ...]] = {"user": ("readonly",), "admin": ("user",)}
_DEFAULT_TIER_FEATURES: dict[str, tuple[str, ...]] = {
    "free": ("chat", "basic_agents", "history_7d"),
    "early": ("beta_features", "history_30d"),
    "business": ("advanced_agents", "api_access"),
    "enterprise": (
        "sso",
        "custom_integrations",
        "audit_export",
        "dedicated_support",
        "custom_policies",
        "data_residency",
        "history_unlimited",
        "priority_queue",
        "sla",
    ),
    "internal": ("impersonation", "admin_console"),
}
_RESOLVE_CACHE_MAX = 1024
_NO_LIMITS = TierLimits()


def check_name(where: str, value: object) -> str:
    """``value`` if it is a usable role, feature or tier-feature name; else ConfigurationError.

    A name is a non-empty printable string without whitespace.
    """
    if (
        not isinstance(value, str)
        or not value
        or not value.isprintable()
        or value.split() != [value]
    ):
        raise ConfigurationError(f"{where} must be non-empty strings without whitespace")
    return value


def check_permission(where: str, value: object) -> str:
    """``value`` if it is a permission string; else ConfigurationError.

    Permissions are ``resource:action`` strings (any number of ``:``-separated segments, none
    empty); ``*`` may only stand alone or as the whole last segment (``"agents:*"``, ``"*"``).
    """
    name = check_name(where, value)
    segments = name.split(":")
    if any(not seg or ("*" in seg and seg != "*") for seg in segments) or "*" in segments[:-1]:
        raise ConfigurationError(
            f"{where}: a permission is 'resource:action' with '*' only as the last segment"
        )
    return name


def _names(where: str, value: object, check: Callable[[str, object], str]) -> frozenset[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{where} must be a list of strings")
    return frozenset(check(where, v) for v in value)


class Policy:
    """Roles → permissions (with inheritance), tiers → features (cumulative up the tiers) and,
    optionally, tiers → limits (request rates and quotas, see :mod:`ctxvars_mw.ratelimit`).

    Deny by default: a role the policy does not know grants nothing. Everything is checked
    and flattened at construction; :meth:`resolve` is a cached lookup.
    """

    __slots__ = ("_cache", "_limits", "_limits_data", "_raw", "_role_permissions", "_tier_features")

    def __init__(
        self,
        *,
        tier_features: Mapping[Tier | str, Iterable[str]],
        role_permissions: Mapping[str, Iterable[str]],
        role_inherits: Mapping[str, Iterable[str]] | None = None,
        tier_limits: Mapping[Tier | str, Any] | None = None,
    ) -> None:
        if not isinstance(tier_features, Mapping) or not isinstance(role_permissions, Mapping):
            raise ConfigurationError("tier_features and role_permissions must be mappings")
        inherits = role_inherits or {}
        if not isinstance(inherits, Mapping):
            raise ConfigurationError("role_inherits must be a mapping")
        own_features = _own_features(tier_features)
        own_perms, parents = _own_roles(role_permissions, inherits)
        flat: dict[str, frozenset[str]] = {}
        for role in sorted(own_perms.keys() | parents.keys()):
            _flatten(role, own_perms, parents, (), flat)
        self._role_permissions = flat
        self._tier_features = _cumulative(own_features)
        self._cache: dict[tuple[frozenset[str], Tier], tuple[frozenset[str], frozenset[str]]] = {}
        self._raw = {
            "tier_features": {t.value: sorted(f) for t, f in own_features.items()},
            "role_permissions": {r: sorted(p) for r, p in own_perms.items()},
            "role_inherits": {r: sorted(p) for r, p in parents.items()},
        }
        self._limits = None if tier_limits is None else compile_tier_limits(tier_limits)
        self._limits_data = None if tier_limits is None else limits_to_data(tier_limits)

    @classmethod
    def default(cls) -> Policy:
        """The default policy: roles readonly ⊂ user ⊂ admin, the five tiers' features."""
        return _DEFAULT

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        """Build a policy from plain data (as loaded from JSON or TOML)."""
        if not isinstance(data, Mapping):
            raise ConfigurationError("Policy.from_mapping() takes a mapping")
        unknown = set(data) - {"tier_features", "role_permissions", "role_inherits", "tier_limits"}
        if unknown:
            raise ConfigurationError(f"unknown policy key(s): {', '.join(sorted(unknown))}")
        return cls(
            tier_features=data.get("tier_features", {}),
            role_permissions=data.get("role_permissions", {}),
            role_inherits=data.get("role_inherits", {}),
            tier_limits=data.get("tier_limits"),
        )

    def to_mapping(self) -> dict[str, Any]:
        """The policy as plain data, accepted back by :meth:`from_mapping`."""
        data: dict[str, Any] = {
            k: {name: list(items) for name, items in v.items()} for k, v in self._raw.items()
        }
        if self._limits_data is not None:
            data["tier_limits"] = limits_to_data(self._limits_data)  # a fresh copy
        return data

    @property
    def roles(self) -> frozenset[str]:
        """The roles this policy knows."""
        return frozenset(self._role_permissions)

    def permissions_for_role(self, role: str) -> frozenset[str]:
        """The permissions ``role`` grants, inherited ones included (empty if unknown)."""
        return self._role_permissions.get(role, frozenset())

    def features_for_tier(self, tier: Tier | str) -> frozenset[str]:
        """The features ``tier`` unlocks, those of lower tiers included."""
        return self._tier_features[Tier.parse(tier)]

    @property
    def has_limits(self) -> bool:
        """True when the policy declares ``tier_limits``."""
        return self._limits is not None

    def limits_for_tier(self, tier: Tier | str) -> TierLimits:
        """The rates and quotas ``tier`` meets (none when the policy declares no limits)."""
        if self._limits is None:
            return _NO_LIMITS
        return self._limits[Tier.parse(tier)]

    def resolve(
        self, roles: Iterable[str], tier: Tier | str
    ) -> tuple[frozenset[str], frozenset[str]]:
        """Return ``(permissions, features)`` for ``roles`` at ``tier``."""
        key_roles = roles if isinstance(roles, frozenset) else frozenset(roles)
        key_tier = tier if isinstance(tier, Tier) else Tier.parse(tier)
        key = (key_roles, key_tier)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        perms: frozenset[str] = frozenset().union(
            *(self._role_permissions.get(r, ()) for r in key_roles)
        )
        result = (perms, self._tier_features[key_tier])
        return remember(self._cache, key, result, _RESOLVE_CACHE_MAX)

    def __repr__(self) -> str:
        return f"Policy(roles={sorted(self._role_permissions)})"


def _own_features(tier_features: Mapping[Tier | str, Iterable[str]]) -> dict[Tier, frozenset[str]]:
    """Each tier's own features (validated), keyed by Tier."""
    own: dict[Tier, frozenset[str]] = {}
    for key, features in tier_features.items():
        try:
            tier = Tier.parse(key)
        except ValueError:
            raise ConfigurationError(f"tier_features names an unknown tier: {key!r}") from None
        own[tier] = _names(f"tier_features[{tier.value}]", features, check_name)
    return own


def _cumulative(own: Mapping[Tier, frozenset[str]]) -> dict[Tier, frozenset[str]]:
    """Every tier's features: its own and those of every lower tier."""
    result: dict[Tier, frozenset[str]] = {}
    acc: frozenset[str] = frozenset()
    for tier in Tier:
        acc = acc | own.get(tier, frozenset())
        result[tier] = acc
    return result


def _own_roles(
    role_permissions: Mapping[str, Iterable[str]], inherits: Mapping[str, Iterable[str]]
) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """Each role's own permissions and parents (validated; unknown parents refused)."""
    own = {
        _role(role): _names(f"role_permissions[{role}]", perms, check_permission)
        for role, perms in role_permissions.items()
    }
    parents: dict[str, frozenset[str]] = {}
    for role, parent_roles in inherits.items():
        role = _role(role)
        parents[role] = _names(f"role_inherits[{role}]", parent_roles, check_name)
        unknown = parents[role] - own.keys() - inherits.keys()
        if unknown:
            raise ConfigurationError(
                f"role_inherits names unknown role(s): {', '.join(sorted(unknown))}"
            )
    return own, parents


def _role(value: object) -> str:
    return check_name("role names", value)


def _flatten(
    role: str,
    own: Mapping[str, frozenset[str]],
    parents: Mapping[str, frozenset[str]],
    path: tuple[str, ...],
    done: dict[str, frozenset[str]],
) -> frozenset[str]:
    """``role``'s permissions with every inherited one; memoized in ``done``; cycles refused."""
    if role in done:
        return done[role]
    if role in path:
        raise ConfigurationError(f"role_inherits has a cycle: {' -> '.join((*path, role))}")
    result = own.get(role, frozenset())
    for parent in sorted(parents.get(role, ())):
        result = result | _flatten(parent, own, parents, (*path, role), done)
    done[role] = result
    return result


_DEFAULT = Policy(
    tier_features=_DEFAULT_TIER_FEATURES,
    role_permissions=_DEFAULT_ROLE_PERMISSIONS,
    role_inherits=_DEFAULT_ROLE_INHERITS,
)
