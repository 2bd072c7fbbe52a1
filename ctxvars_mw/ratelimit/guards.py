"""Metering from code: ``consume()``, the ``@quota`` and ``@rate_limit`` decorators, and
their ``Depends`` forms.

They read the current context (its user and tier, as the ``requires_*`` decorators do) and
the limiter of the request being handled, which ContextMiddleware makes current — only when
its policy declares limits, so requests without any cost nothing here. Outside a request,
pass ``limiter=`` and make a context current with ``use_context``.

``@quota`` and ``@rate_limit`` guard async functions only: a check may wait on the store.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar, Token
from typing import Any, ParamSpec, TypeVar, cast

from ..context import UserExecutionContext
from ..current import get_context
from ..errors import ConfigurationError
from ..tier import Tier
from ..types import Scope
from .declarations import Rate, compile_rate_table
from .limiter import Limiter, QuotaUsage, plans_for

__all__ = [
    "consume",
    "depends_quota",
    "depends_rate_limit",
    "quota",
    "rate_limit",
    "reset_limiter",
    "set_limiter",
]

P = ParamSpec("P")
R = TypeVar("R")

#: The limiter of the request being handled, and the request's scope.
_Current = tuple[Limiter, Scope] | None
_current: ContextVar[_Current] = ContextVar("ctxvars_mw.limiter", default=None)
reset_limiter: Callable[[Token[_Current]], None] = _current.reset


#: ``set_limiter((limiter, scope))``: make ``limiter`` the limiter of the request ``scope``
#: (the ContextVar's own ``set``: no call of ours in between); undo with :func:`reset_limiter`
#: and the token.
set_limiter: Callable[[_Current], Token[_Current]] = _current.set


def _limiter(given: Limiter | None, what: str) -> tuple[Limiter, Scope | None]:
    found = _current.get()
    if given is not None:
        return given, None if found is None else found[1]
    if found is None:
        raise ConfigurationError(
            f"{what} needs a limiter: run it in a request handled by a ContextMiddleware "
            "whose policy declares tier_limits, or pass limiter="
        )
    return found


def _check_amount(amount: object) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        raise ConfigurationError("a quota amount must be an int >= 1")
    return amount


async def consume(name: str, amount: int = 1, *, limiter: Limiter | None = None) -> QuotaUsage:
    """Spend ``amount`` units of the quota ``name`` for the current context's caller.

    Returns what is left (:class:`~ctxvars_mw.ratelimit.QuotaUsage`). Raises
    :class:`~ctxvars_mw.QuotaExceededError` (429) when the units would pass the caller's
    tier's limit for the period (nothing is spent then), :class:`~ctxvars_mw.ContextNotSetError`
    outside a context, and :class:`~ctxvars_mw.ConfigurationError` for a quota the policy
    does not declare or when no limiter is at hand.
    """
    _check_amount(amount)
    ctx = get_context()
    limiter, scope = _limiter(limiter, "consume()")
    return await limiter.consume(ctx, limiter.caller_key(ctx, scope), name, amount)


def _async_only(what: str, fn: Callable[..., Any]) -> None:
    if inspect.isclass(fn) or not inspect.iscoroutinefunction(fn):
        raise ConfigurationError(f"{what} guards async functions (a check may wait on the store)")


def quota(name: str, amount: int = 1) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate an async function so that each call first spends ``amount`` of quota
    ``name`` (see :func:`consume`); a refused call does not run."""
    _check_amount(amount)
    if not isinstance(name, str) or not name:
        raise ConfigurationError("quota() takes the quota's name, e.g. @quota('agent_runs')")

    def decorator(fn: Callable[P, R]) -> Callable[P, R]:
        _async_only("quota()", fn)
        call = cast("Callable[..., Coroutine[Any, Any, Any]]", fn)

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            await consume(name, amount)
            return await call(*args, **kwargs)

        return cast("Callable[P, R]", wrapper)

    return decorator


class _RateCheck:
    """A rate limit of its own, per tier: a counter named ``bucket`` for each caller."""

    __slots__ = ("plans",)

    def __init__(self, rates: Mapping[Tier, tuple[Rate, ...]], bucket: str) -> None:
        self.plans = plans_for(bucket, rates)

    async def enforce(self) -> UserExecutionContext:
        ctx = get_context()
        plan = self.plans.get(ctx.tier)
        if plan is not None:
            limiter, scope = _limiter(None, "rate_limit()")
            await limiter.hit(limiter.caller_key(ctx, scope), plan, ctx)
        return ctx


def rate_limit(
    table: Mapping[Any, Any], *, name: str | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate an async function with a rate limit of its own: ``table`` is tier → rate(s)
    (``{"free": "5/minute", "business": "60/minute"}``, carried up the tiers; tiers below
    its first are not limited here), counted per caller under ``name`` (default: the
    function's qualified name). A refused call raises :class:`~ctxvars_mw.RateLimitedError`
    (429) and does not run."""
    rates = compile_rate_table("rate_limit()", table)

    def decorator(fn: Callable[P, R]) -> Callable[P, R]:
        _async_only("rate_limit()", fn)
        check = _RateCheck(rates, f"fn:{name or fn.__qualname__}")
        call = cast("Callable[..., Coroutine[Any, Any, Any]]", fn)

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            await check.enforce()
            return await call(*args, **kwargs)

        return cast("Callable[P, R]", wrapper)

    return decorator


def depends_quota(
    name: str, amount: int = 1
) -> Callable[[], Coroutine[Any, Any, UserExecutionContext]]:
    """``Depends(depends_quota(name))``: spend the units, return the current context."""
    _check_amount(amount)

    async def dependency() -> UserExecutionContext:
        await consume(name, amount)
        return get_context()

    dependency.__qualname__ = dependency.__name__ = f"depends_quota_{name}"
    return dependency


def depends_rate_limit(
    table: Mapping[Any, Any], *, name: str
) -> Callable[[], Coroutine[Any, Any, UserExecutionContext]]:
    """``Depends(depends_rate_limit(table, name=...))``: count the call against a rate limit
    of its own (see :func:`rate_limit`), return the current context."""
    check = _RateCheck(compile_rate_table("require_rate_limit()", table), f"dep:{name}")

    async def dependency() -> UserExecutionContext:
        return await check.enforce()

    dependency.__qualname__ = dependency.__name__ = f"depends_rate_limit_{name}"
    return dependency
