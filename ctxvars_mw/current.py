"""The one ContextVar: the current UserExecutionContext, and helpers to carry it along."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from .context import UserExecutionContext
from .errors import ContextNotSetError

__all__ = [
    "bind",
    "child_context",
    "get_context",
    "get_context_or_none",
    "run_in_thread",
    "use_context",
]

P = ParamSpec("P")
R = TypeVar("R")

# The one ContextVar. It holds a UserExecutionContext, None, or a *frame*: a list
# ``[context or None, build, args, cleanups, headers]``.
#
# - A request that ContextMiddleware handles is a *pending* frame ``[None, build, args,
#   cleanups, headers]``. The middleware has already done everything that decides the
#   request's fate (ids validated, caller authenticated, session checked); what is left, the
#   22-field object itself, is built by ``build(*args)`` the first time anything asks for it,
#   and then stands in the first slot for every later reader, in every task and thread of
#   the request. A request whose code never reads its context (health checks, static files,
#   most proxies' traffic) never pays for one.
# - ``cleanups`` is the list of the request's (or a ``resource_scope()``'s) cleanups, so one
#   ContextVar carries both. ``use_context()`` inside a frame sets ``[ctx, None, None,
#   cleanups, headers]``: the new context, the same cleanup list. A frame with no context at
#   all (a ``resource_scope()`` outside any) is ``[None, None, None, cleanups, None]``.
# - ``headers`` is the request's ``scope["headers"]`` list: a ContextMiddleware nested in
#   the same request (a mounted sub-app with its own) finds the frame of a request whose
#   header list is its own, and keeps that request's ids; any other ASGI call (an in-process
#   ``httpx.ASGITransport`` request made by a handler) has a list of its own.
#
# A plain list because the middleware makes one per request: a literal costs a tenth of an
# instance of a class of our own.
_Pending = list[Any]
_current: ContextVar[UserExecutionContext | _Pending | None] = ContextVar(
    "ctxvars_mw.context", default=None
)
_get_raw = _current.get
_CLEANUPS = 3  # the index of a frame's cleanup list
_HEADERS = 4  # the index of a frame's request header list
_FIRST_BUILT = 5  # the index of the first context appended to a pending frame


def _materialize(pending: _Pending) -> UserExecutionContext | None:
    """Build a pending frame's context and return the one every reader of it gets (None for
    a frame without a context).

    Threads that read a new request's context at the same moment may each build one; each
    appends its own (``list.append`` is atomic), and all of them return the first appended,
    so the request has one context object, one set of generated ids. No lock, which the
    first read of every request would pay for to settle a race that is rare and harmless.
    """
    build = pending[1]
    if build is None:
        return None
    pending.append(build(*pending[2]))
    ctx: UserExecutionContext = pending[_FIRST_BUILT]
    pending[0] = ctx
    return ctx


def _set(ctx: UserExecutionContext) -> Token[UserExecutionContext | _Pending | None]:
    """Make ``ctx`` current (reset with the token), keeping the enclosing frame's cleanups."""
    outer = _get_raw()
    if type(outer) is list:
        return _current.set([ctx, None, None, outer[_CLEANUPS], outer[_HEADERS]])
    return _current.set(ctx)


def resolved(value: UserExecutionContext | _Pending | None) -> UserExecutionContext | None:
    """The context that ``value``, a value of the ContextVar, stands for."""
    if type(value) is list:
        return value[0] or _materialize(value)
    return value  # type: ignore[return-value]


def get_context() -> UserExecutionContext:
    """The current context; raises :class:`ContextNotSetError` outside a request."""
    ctx = _get_raw()
    if type(ctx) is list:
        ctx = ctx[0] or _materialize(ctx)
    if ctx is None:
        raise ContextNotSetError(
            "no UserExecutionContext is set: call this inside a request handled by "
            "ContextMiddleware, or inside a use_context() block"
        )
    return ctx  # type: ignore[return-value]


def get_context_or_none() -> UserExecutionContext | None:
    """The current context, or None outside a request."""
    ctx = _get_raw()
    if type(ctx) is list:
        return ctx[0] or _materialize(ctx)
    return ctx  # type: ignore[return-value]


class use_context:  # noqa: N801 - used like a function, as contextlib's helpers are
    """Make ``ctx`` current for a ``with`` or ``async with`` block; restore the previous on exit."""

    __slots__ = ("_ctx", "_tokens")

    def __init__(self, ctx: UserExecutionContext) -> None:
        if not isinstance(ctx, UserExecutionContext):
            raise TypeError("use_context() takes a UserExecutionContext")
        self._ctx = ctx
        self._tokens: list[Token[UserExecutionContext | _Pending | None]] = []

    def __enter__(self) -> UserExecutionContext:
        self._tokens.append(_set(self._ctx))
        return self._ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _current.reset(self._tokens.pop())

    async def __aenter__(self) -> UserExecutionContext:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class child_context(use_context):  # noqa: N801
    """Derive ``get_context().child(operation, ...)`` and make it current for the block."""

    __slots__ = ()

    def __init__(self, operation: str, **kwargs: Any) -> None:
        super().__init__(get_context().child(operation, **kwargs))


def bind(fn: Callable[P, R]) -> Callable[P, R]:
    """Return a callable that runs ``fn`` in a copy of the caller's context.

    Use it for ``loop.run_in_executor``, ``ThreadPoolExecutor.submit``, ``threading.Thread``
    and callbacks. Each call runs in its own copy, so values set inside one call never leak
    into another, and the bound callable may run concurrently in many threads.
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        return captured.copy().run(fn, *args, **kwargs)

    return bound


async def run_in_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run the sync ``fn`` in the default executor's worker thread, with the current context."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, bind(functools.partial(fn, *args, **kwargs)))
