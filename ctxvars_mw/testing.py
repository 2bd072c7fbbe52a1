"""pytest-free test helpers; :mod:`ctxvars_mw.pytest_plugin` is a thin layer over them.

- :class:`ContextRegistry` tracks live contexts by weak reference while enabled, so a test
  can prove that no context outlives its request. While disabled it costs one ``is None``
  check per context created.
- Factories of realistic contexts: :func:`make_context` (one tier, the policy's permissions
  and features, ids shaped like a real identity provider's), :func:`tier_contexts`,
  :func:`concurrent_contexts`, :func:`context_chain`, :func:`websocket_scenarios`.
- :func:`mint_token`: a really signed JWT (PyJWT) for a user or a context.
- :func:`context_scope`: make a context current with ``with`` or ``async with``.

Nothing here imports pytest or a web framework.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from . import context as _context_module
from .context import UserExecutionContext
from .current import use_context
from .policy import Policy
from .tier import Tier

__all__ = [
    "DEFAULT_TIER_ROLES",
    "ContextRegistry",
    "HierarchyBuilder",
    "concurrent_contexts",
    "context_chain",
    "context_registry",
    "context_scope",
    "make_context",
    "mint_token",
    "realistic_session_id",
    "realistic_user_id",
    "tier_contexts",
    "websocket_scenarios",
]


class ContextRegistry:
    """Opt-in tracking of live :class:`UserExecutionContext` objects by weak reference."""

    def __init__(self) -> None:
        # Keyed by identity, not a WeakSet: equal contexts (a copy with a db_session, the
        # same context deserialized twice) are distinct objects and must each be counted.
        self._live: weakref.WeakValueDictionary[int, UserExecutionContext] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()
        self._enabled = False

    @property
    def enabled(self) -> bool:
        """True while contexts are being tracked."""
        return self._enabled

    def _track(self, ctx: UserExecutionContext) -> None:
        with self._lock:
            self._live[id(ctx)] = ctx

    def enable(self) -> None:
        """Start tracking every context created from now on (process-wide)."""
        if _context_module._track not in (None, self._track):
            raise RuntimeError("another ContextRegistry is already enabled")
        self._enabled = True
        _context_module._track = self._track

    def disable(self) -> None:
        """Stop tracking; contexts already tracked stay counted until collected."""
        self._enabled = False
        if _context_module._track == self._track:
            _context_module._track = None

    def clear(self) -> None:
        """Forget every tracked context."""
        with self._lock:
            self._live = weakref.WeakValueDictionary()

    def active_count(self, user_id: str | None = None) -> int:
        """How many tracked contexts are still alive (for ``user_id``, when given)."""
        with self._lock:
            live = list(self._live.values())
        if user_id is None:
            return len(live)
        return sum(1 for ctx in live if ctx.user_id == user_id)

    def __enter__(self) -> ContextRegistry:
        self.clear()
        self.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disable()


#: The process-wide registry the pytest plugin uses.
context_registry = ContextRegistry()


# -- realistic contexts ----------------------------------------------------------------------

#: The roles :func:`make_context` gives each tier unless told otherwise.
DEFAULT_TIER_ROLES: Mapping[Tier, tuple[str, ...]] = {
    Tier.FREE: ("user",),
    Tier.EARLY: ("user",),
    Tier.BUSINESS: ("user",),
    Tier.ENTERPRISE: ("admin",),
    Tier.INTERNAL: ("admin",),
}


def realistic_user_id(provider: str = "auth0") -> str:
    """A fresh user id shaped like an identity provider's.

    ``auth0|5f7c8ec7c33c6c004bbafe82`` by default; ``provider="google-oauth2"`` gives
    ``google-oauth2|<21 digits>`` and ``provider="uuid"`` a uuid4 string.
    """
    if provider == "google-oauth2":
        return f"google-oauth2|{secrets.randbelow(10**21):021d}"
    if provider == "uuid":
        return str(uuid.uuid4())
    return f"{provider}|{secrets.token_hex(12)}"


def realistic_session_id() -> str:
    """A fresh, unguessable session id."""
    return secrets.token_urlsafe(24)


def make_context(
    tier: Tier | str = Tier.FREE,
    *,
    user_id: str | None = None,
    roles: Iterable[str] | None = None,
    policy: Policy | None = None,
    auth_method: str = "jwt",
    **fields: Any,
) -> UserExecutionContext:
    """An authenticated context at ``tier``, as the middleware would build it.

    ``roles`` defaults to :data:`DEFAULT_TIER_ROLES`; permissions and features are those
    ``policy`` (default :meth:`Policy.default`) grants; ``user_id`` and ``session_id`` are
    realistic fresh ids unless given. Any other field may be passed through ``fields``.
    """
    tier = Tier.parse(tier)
    role_set = frozenset(DEFAULT_TIER_ROLES[tier] if roles is None else roles)
    permissions, features = (policy or Policy.default()).resolve(role_set, tier)
    fields.setdefault("session_id", realistic_session_id())
    fields.setdefault("permissions", permissions)
    fields.setdefault("features", features)
    return UserExecutionContext(
        user_id=user_id or realistic_user_id(),
        tier=tier,
        roles=role_set,
        auth_method=auth_method,
        **fields,
    )


def tier_contexts(policy: Policy | None = None) -> dict[str, UserExecutionContext]:
    """One context per tier, keyed by the tier's value (``"free"`` … ``"internal"``)."""
    return {tier.value: make_context(tier, policy=policy) for tier in Tier}


def concurrent_contexts(
    count: int, base_name: str = "user", *, tier: Tier | str = Tier.BUSINESS
) -> list[UserExecutionContext]:
    """``count`` contexts for ``count`` distinct users named ``<base_name>-<i>-<random>``."""
    if count < 0:
        raise ValueError("count must be >= 0")
    run = secrets.token_hex(6)
    return [make_context(tier, user_id=f"{base_name}-{i:04d}-{run}") for i in range(count)]


def context_chain(root: UserExecutionContext, depth: int) -> list[UserExecutionContext]:
    """``root`` and ``depth`` generations of children: ``len == depth + 1``, the last at
    ``operation_depth == root.operation_depth + depth``."""
    chain = [root]
    for level in range(1, depth + 1):
        chain.append(chain[-1].child(f"step.{level}", audit_metadata={"step": level}))
    return chain


class HierarchyBuilder:
    """Builds parent → child chains from one root context (fresh enterprise one by default)."""

    def __init__(self, root: UserExecutionContext | None = None) -> None:
        self.root = root or make_context(Tier.ENTERPRISE)

    def chain(self, depth: int) -> list[UserExecutionContext]:
        """The root and ``depth`` generations of children (see :func:`context_chain`)."""
        return context_chain(self.root, depth)


def websocket_scenarios() -> dict[str, list[UserExecutionContext]]:
    """Named sets of websocket connection contexts, each with its own ``websocket_client_id``.

    ``one_user_one_connection``, ``one_user_two_connections`` (same user, two sockets),
    ``two_users`` (different users, same tier) and ``anonymous``.
    """

    def ws(ctx: UserExecutionContext) -> UserExecutionContext:
        return ctx.with_websocket_client(f"ws-{secrets.token_hex(12)}")

    alice, bob = make_context(Tier.BUSINESS), make_context(Tier.BUSINESS)
    return {
        "one_user_one_connection": [ws(alice)],
        "one_user_two_connections": [ws(alice), ws(alice)],
        "two_users": [ws(alice), ws(bob)],
        "anonymous": [ws(UserExecutionContext.anonymous())],
    }


def context_scope(ctx: UserExecutionContext | None = None, **kwargs: Any) -> use_context:
    """Make ``ctx`` (or ``make_context(**kwargs)``) current for a ``with``/``async with`` block."""
    return use_context(ctx if ctx is not None else make_context(**kwargs))


# -- tokens ----------------------------------------------------------------------------------


def mint_token(
    key: Any,
    *,
    user_id: str | None = None,
    ctx: UserExecutionContext | None = None,
    tier: Tier | str | None = None,
    roles: Iterable[str] = (),
    permissions: Iterable[str] = (),
    session_id: str | None = None,
    algorithm: str = "HS256",
    expires_in: float = 300,
    issuer: str | None = None,
    audience: str | None = None,
    headers: Mapping[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A JWT signed with ``key`` (a secret for HS*, a private key for RS/ES/PS) by PyJWT.

    The subject, tier, roles and session come from ``ctx`` when given, else from the
    arguments; the claim names are :class:`~ctxvars_mw.JWTAuthenticator`'s defaults
    (``sub tier roles permissions sid``), with ``iat``/``exp`` (``expires_in`` seconds, may be
    negative for an expired token). Extra ``claims`` are added as they are.
    """
    import jwt  # PyJWT: imported here so the pytest plugin loads without it

    if key is None or key == "":
        raise ValueError("mint_token() needs a signing key")
    if ctx is not None:
        user_id, tier, session_id = ctx.user_id, ctx.tier, ctx.session_id
        roles = ctx.roles
    if not user_id:
        raise ValueError("mint_token() needs user_id or ctx")
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + int(expires_in)}
    if tier is not None:
        payload["tier"] = Tier.parse(tier).value
    if roles:
        payload["roles"] = sorted(roles)
    if permissions:
        payload["permissions"] = sorted(permissions)
    if session_id is not None:
        payload["sid"] = session_id
    if issuer is not None:
        payload["iss"] = issuer
    if audience is not None:
        payload["aud"] = audience
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=algorithm, headers=dict(headers or {}))
