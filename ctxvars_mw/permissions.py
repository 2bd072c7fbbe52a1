"""Authorization on the current context: decorators, ``Depends`` factories, ``authorize()``.

The checks themselves live in :mod:`ctxvars_mw.requirements`, compiled when a decorator or
factory is called (misuse raises :class:`ConfigurationError` then). At call time:

- no context, or an anonymous one → :class:`AuthenticationRequiredError` (401), for every check;
- authenticated but lacking → :class:`PermissionDeniedError` (403) whose ``required`` names what
  the check asked for;
- every denial is audited once on the ``ctxvars_mw.audit`` logger.

The decorators keep the wrapped function's kind (a coroutine function stays one) and signature
(``functools.wraps``), so Starlette, FastAPI (path/query parameters, ``Depends``, OpenAPI) and
Django see the original endpoint; stacked decorators merge into one wrapper. The ``depends_*``
factories return the same checks as no-argument async callables for ``Depends(...)``.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Collection, Coroutine
from typing import Any, Final, ParamSpec, Protocol, TypeVar, cast

from .context import UserExecutionContext
from .current import get_context_or_none
from .errors import ConfigurationError, PermissionDeniedError
from .requirements import (
    Requirement,
    all_of,
    anonymous_error,
    audit_denial,
    authenticated_requirement,
    feature_requirement,
    permission_requirement,
    role_requirement,
    tier_requirement,
)
from .tier import Tier

__all__ = [
    "Decorator",
    "authorize",
    "depends_authenticated",
    "depends_feature",
    "depends_permission",
    "depends_role",
    "depends_tier",
    "requires_authenticated",
    "requires_feature",
    "requires_permission",
    "requires_role",
    "requires_tier",
]

P = ParamSpec("P")
R = TypeVar("R")
_get = get_context_or_none
_READ_ANY: Final = "resources:read_any"
#: authorize(): who may do each action, as named in the 403's ``required``.
_OWNERSHIP: Final[dict[str, tuple[str, ...]]] = {
    "read": ("owner", "shared", _READ_ANY),
    "write": ("owner", "shared"),
    "delete": ("owner",),
}
_OWNERSHIP_TEXT: Final[dict[str, str]] = {
    "read": "Only the owner, users it is shared with, or resources:read_any may read this.",
    "write": "Only the resource's owner or users it is shared with may write it.",
    "delete": "Only the resource's owner may delete it.",
}


class Decorator(Protocol):
    """What ``requires_*()`` return: a decorator that keeps the wrapped signature."""

    def __call__(self, fn: Callable[P, R], /) -> Callable[P, R]:
        """Wrap ``fn`` with the check."""
        ...


# -- decorators ---------------------------------------------------------------------------

#: Our wrappers → (the function they guard, their requirements), so stacked decorators
#: merge into one wrapper (one call, checks outermost first).
_Guarded = tuple[Callable[..., Any], tuple[Requirement, ...]]
_guarded: weakref.WeakKeyDictionary[Callable[..., Any], _Guarded] = weakref.WeakKeyDictionary()


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    # An instance whose __call__ is async counts too (as Starlette's is_async_callable does).
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _guard(requirement: Requirement) -> Decorator:
    def decorator(fn: Callable[P, R], /) -> Callable[P, R]:
        if inspect.isclass(fn) or not callable(fn):
            raise ConfigurationError("decorate a function or method (for classes: its methods)")
        if inspect.isasyncgenfunction(fn):
            raise ConfigurationError("async generator functions cannot be guarded")
        inner, below = _guarded.get(fn, (fn, ()))
        wrapper = _wrap(inner, (requirement, *below))
        functools.update_wrapper(wrapper, fn)
        _guarded[wrapper] = (inner, (requirement, *below))
        return cast("Callable[P, R]", wrapper)

    return decorator


def _wrap(fn: Callable[..., Any], requirements: tuple[Requirement, ...]) -> Callable[..., Any]:
    """A wrapper of ``fn``'s kind that enforces ``requirements`` first (one fast path)."""
    enforce = requirements[0].enforce if len(requirements) == 1 else all_of(requirements)

    if _is_async(fn):
        call = cast("Callable[..., Coroutine[Any, Any, Any]]", fn)

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            enforce()
            return await call(*args, **kwargs)

        return async_wrapper

    def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
        enforce()
        return fn(*args, **kwargs)

    return sync_wrapper


def requires_authenticated() -> Decorator:
    """Allow only authenticated callers (anonymous or no context → 401)."""
    return _guard(authenticated_requirement())


def requires_tier(tier: Tier | str) -> Decorator:
    """Allow callers whose tier is ``tier`` or above (a Tier or its value, e.g. ``"business"``)."""
    return _guard(tier_requirement(tier))


def requires_role(*roles: str, any_: bool = False) -> Decorator:
    """Allow callers holding every role in ``roles`` (with ``any_=True``: at least one)."""
    return _guard(role_requirement(*roles, any_=any_))


def requires_permission(*permissions: str, any_: bool = False) -> Decorator:
    """Allow callers holding every permission (``any_=True``: one); ``agents:*``/``*`` count."""
    return _guard(permission_requirement(*permissions, any_=any_))


def requires_feature(*features: str, any_: bool = False) -> Decorator:
    """Allow callers whose tier grants every feature in ``features`` (``any_=True``: one)."""
    return _guard(feature_requirement(*features, any_=any_))


# -- dependencies (Depends(...)) ------------------------------------------------------------


def _dependency(
    requirement: Requirement,
) -> Callable[[], Coroutine[Any, Any, UserExecutionContext]]:
    enforce = requirement.enforce

    async def dependency() -> UserExecutionContext:
        return enforce()

    dependency.__qualname__ = dependency.__name__ = f"depends_{requirement.kind}"
    dependency.__doc__ = f"Return the current context if it passes {requirement!r}; else raise."
    return dependency


def depends_authenticated() -> Callable[[], Coroutine[Any, Any, UserExecutionContext]]:
    """``Depends(depends_authenticated())``: the current context, authenticated, or 401."""
    return _dependency(authenticated_requirement())


def depends_tier(tier: Tier | str) -> Callable[[], Coroutine[Any, Any, UserExecutionContext]]:
    """``Depends(depends_tier(tier))``: the current context if its tier is ``tier`` or above."""
    return _dependency(tier_requirement(tier))


def depends_role(
    *roles: str, any_: bool = False
) -> Callable[[], Coroutine[Any, Any, UserExecutionContext]]:
    """``Depends(depends_role(...))``: the current context if it holds the roles."""
    return _dependency(role_requirement(*roles, any_=any_))


def depends_permission(
    *permissions: str, any_: bool = False
) -> Callable[[], Coroutine[Any, Any, UserExecutionContext]]:
    """``Depends(depends_permission(...))``: the current context if it holds the permissions."""
    return _dependency(permission_requirement(*permissions, any_=any_))


def depends_feature(
    *features: str, any_: bool = False
) -> Callable[[], Coroutine[Any, Any, UserExecutionContext]]:
    """``Depends(depends_feature(...))``: the current context if its tier grants the features."""
    return _dependency(feature_requirement(*features, any_=any_))


# -- resource ownership ---------------------------------------------------------------------


def authorize(
    action: str,
    *,
    owner_id: str | None = None,
    shared_with: Collection[str] = (),
    ctx: UserExecutionContext | None = None,
) -> UserExecutionContext:
    """Check that the caller may ``action`` (``"read"``, ``"write"``, ``"delete"``) a resource.

    The owner may read, write and delete; users in ``shared_with`` may read and write; a holder
    of ``resources:read_any`` may read anything; everything else raises
    :class:`PermissionDeniedError`. ``ctx`` defaults to the current context; none, or an
    anonymous one, raises :class:`AuthenticationRequiredError`. Returns the context that was
    checked. An unknown action or a mistyped argument raises :class:`ConfigurationError`.
    """
    required = _OWNERSHIP.get(action)
    if required is None:
        raise ConfigurationError("authorize() action must be 'read', 'write' or 'delete'")
    if owner_id is not None and not isinstance(owner_id, str):
        raise ConfigurationError("authorize(owner_id=...) must be a str user id (or None)")
    if isinstance(shared_with, (str, bytes)) or not isinstance(shared_with, Collection):
        raise ConfigurationError("authorize(shared_with=...) must be a collection of user ids")
    if ctx is None:
        ctx = _get()
    if ctx is None or not ctx.is_authenticated:
        raise anonymous_error(f"ownership:{action}", required, True, ctx)
    user_id = ctx.user_id
    if (
        user_id == owner_id
        or (action != "delete" and user_id in shared_with)
        or (action == "read" and ctx.has_permission(_READ_ANY))
    ):
        return ctx
    held = ["owner"] if user_id == owner_id else ["shared"] if user_id in shared_with else []
    held += [_READ_ANY] if ctx.has_permission(_READ_ANY) else []
    audit_denial(ctx, 403, f"ownership:{action}", required, True, held)
    raise PermissionDeniedError(_OWNERSHIP_TEXT[action], required=required)
