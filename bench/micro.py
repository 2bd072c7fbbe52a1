"""Micro-benchmarks of the context API, with baselines timed in the same, interleaved run.

Each case is a ``timeit`` statement; every repeat runs every case once (in a rotated order),
and the figure is the median CPU time per operation across repeats.
"""

from __future__ import annotations

import os
import time
import timeit
import uuid
from dataclasses import dataclass
from typing import Any

from ctxvars_mw import Tier, UserExecutionContext, get_context, use_context

from .driver import complete

USER = "auth0|5f7c8ec7c33c6c004bbafe82"
SESSION = "sess_8f14e45fceea167a5a36dedd4bea2543"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ROLES = frozenset({"user"})
PERMISSIONS = frozenset(
    {"threads:read", "agents:read", "threads:write", "agents:execute", "tools:*", "reports:read"}
)
FEATURES = frozenset({"chat", "basic_agents", "history_7d", "beta_features", "history_30d"})


@dataclass(frozen=True, slots=True)
class Frozen22:
    """Baseline: a plain frozen, slotted dataclass with as many fields as the context."""

    f01: Any
    f02: Any
    f03: Any
    f04: Any
    f05: Any
    f06: Any
    f07: Any
    f08: Any
    f09: Any
    f10: Any
    f11: Any
    f12: Any
    f13: Any
    f14: Any
    f15: Any
    f16: Any
    f17: Any
    f18: Any
    f19: Any
    f20: Any
    f21: Any
    f22: Any


def _realistic() -> UserExecutionContext:
    return UserExecutionContext(
        user_id=USER,
        session_id=SESSION,
        tier=Tier.BUSINESS,
        roles=ROLES,
        permissions=PERMISSIONS,
        features=FEATURES,
        auth_method="jwt",
        trace_id=TRACE,
    )


def _noop() -> None:
    return None


def _decorated() -> tuple[Any, Any] | None:
    """A ``requires_permission``-decorated no-op and the bare no-op, when the module exists."""
    try:
        from ctxvars_mw.permissions import requires_permission
    except ImportError:
        return None

    def handler() -> None:
        return None

    return requires_permission("threads:read")(handler), _noop


def _jwt_namespace() -> dict[str, Any]:
    """The pieces of the cached-JWT request path, when ``JWTAuthenticator`` exists."""
    from ctxvars_mw import ContextMiddleware
    from ctxvars_mw.auth.cache import token_digest
    from ctxvars_mw.context import request_context

    from . import tokens
    from .apps import bare_app
    from .driver import http_scope

    auth = tokens.jwt_authenticator("HS256")
    if auth is None:
        return {}
    token = tokens.mint("HS256", unique=False)
    identity = complete(auth.verify(token))
    scope = http_scope(token)
    admission = ContextMiddleware(bare_app(), authenticator=auth).admission
    return {
        "jwt_auth": auth,
        "token": token,
        "identity": identity,
        "scope": scope,
        "authorization": b"Bearer " + token.encode("ascii"),
        "admission": admission,
        "caller": admission.caller(identity),
        "token_digest": token_digest,
        "request_context": request_context,
    }


def namespace() -> dict[str, Any]:
    """What the statements below refer to."""
    ctx = _realistic()
    decorated = _decorated()
    return _jwt_namespace() | {
        "UEC": UserExecutionContext,
        "Tier": Tier,
        "USER": USER,
        "SESSION": SESSION,
        "TRACE": TRACE,
        "ROLES": ROLES,
        "ROLE_LIST": sorted(ROLES),
        "PERMISSION_LIST": sorted(PERMISSIONS),
        "FEATURE_LIST": sorted(FEATURES),
        "PERMISSIONS": PERMISSIONS,
        "FEATURES": FEATURES,
        "ctx": ctx,
        "data": ctx.to_dict(),
        "text": ctx.to_json(),
        "get_context": get_context,
        "Frozen22": Frozen22,
        "uuid4": uuid.uuid4,
        "urandom": os.urandom,
        "args22": tuple(range(22)),
        "decorated": None if decorated is None else decorated[0],
        "noop": _noop,
    }


ROOT = (
    "UEC(user_id=USER, session_id=SESSION, tier=Tier.BUSINESS, roles=ROLES,"
    " permissions=PERMISSIONS, features=FEATURES, auth_method='jwt', trace_id=TRACE)"
)
ROOT_FROM_LISTS = (
    ROOT.replace("=ROLES", "=ROLE_LIST")
    .replace("=PERMISSIONS", "=PERMISSION_LIST")
    .replace("=FEATURES", "=FEATURE_LIST")
)
#: name → (statement, what it is compared with or None)
CASES: dict[str, tuple[str, str | None]] = {
    "root context, validated (8 fields given)": (ROOT, "frozen dataclass, 22 fields"),
    "root context, validated (8 fields, name sets as new lists)": (ROOT_FROM_LISTS, None),
    "root context, validated (user_id only)": ("UEC(user_id=USER)", None),
    "anonymous()": ("UEC.anonymous()", None),
    "child('op')": ("ctx.child('agent.plan')", None),
    "child narrowing permissions": ("ctx.child('tool', permissions=('threads:read',))", None),
    "to_dict()": ("ctx.to_dict()", None),
    "from_dict()": ("UEC.from_dict(data)", None),
    "to_json()": ("ctx.to_json()", None),
    "from_json()": ("UEC.from_json(text)", None),
    "has_permission, exact": ("ctx.has_permission('threads:read')", None),
    "has_permission, wildcard": ("ctx.has_permission('tools:execute')", None),
    "has_permission, denied": ("ctx.has_permission('billing:manage')", None),
    "get_context()": ("get_context()", None),
    "requires_permission check": ("decorated()", "bare no-op call"),
    "bare no-op call": ("noop()", None),
    "frozen dataclass, 22 fields": ("Frozen22(*args22)", None),
    "uuid4()": ("uuid4()", None),
    "os.urandom(16).hex()": ("urandom(16).hex()", None),
}


#: The cached-JWT request path, piece by piece (what the middleware adds over anonymous).
JWT_CASES: dict[str, tuple[str, str | None]] = {
    "JWT path: Admission.admit_known, hit": ("admission.admit_known(scope, authorization)", None),
    "JWT path: find the bearer token": ("admission.credentials(scope, authorization)", None),
    "JWT path: JWTAuthenticator.cached, hit": ("jwt_auth.cached(token)", None),
    "JWT path: the token's cache key (BLAKE2b)": ("token_digest(token, 8192)", None),
    "JWT path: Admission.caller, memo hit": ("admission.caller(identity)", None),
    "JWT path: request_context, authenticated": (
        "request_context(caller, TRACE, TRACE, TRACE, None)",
        None,
    ),
}


def run(*, repeats: int, block_seconds: float) -> dict[str, Any]:
    """Median µs per operation of every case (and the paired differences with baselines)."""
    ns = namespace()
    cases = {k: v for k, v in CASES.items() if "decorated" not in v[0] or ns["decorated"]}
    if "jwt_auth" in ns:
        cases |= JWT_CASES
    timers = {
        name: timeit.Timer(stmt, globals=ns, timer=time.thread_time)
        for name, (stmt, _) in cases.items()
    }
    with use_context(ns["ctx"]):
        broken = _broken(timers)
        for name in broken:
            del timers[name]
        samples: dict[str, list[float]] = {name: [] for name in timers}
        names = list(timers)
        numbers = {name: _calibrate(t, block_seconds) for name, t in timers.items()}
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seconds = timers[name].timeit(numbers[name])
                samples[name].append(seconds / numbers[name] * 1e6)
    return {
        "config": {"repeats": repeats, "block_seconds": block_seconds},
        "cases": {
            name: {"us": samples[name], "baseline": cases[name][1], "number": numbers[name]}
            for name in names
        },
        "decorator_available": ns["decorated"] is not None,
        "skipped": broken,
    }


def _broken(timers: dict[str, timeit.Timer]) -> dict[str, str]:
    """Cases whose statement fails against this version of the library (name → error)."""
    broken = {}
    for name, timer in timers.items():
        try:
            timer.timeit(1)
        except Exception as exc:  # reported in the results, never hidden
            broken[name] = f"{type(exc).__name__}: {exc}"
    return broken


def _calibrate(timer: timeit.Timer, block_seconds: float) -> int:
    number = 1
    while True:
        if timer.timeit(number) >= block_seconds / 10:
            return max(1, int(number * 10))
        number *= 4
