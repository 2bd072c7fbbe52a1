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

_current: ContextVar[UserExecutionContext | None] = ContextVar("ctxvars_mw.context", default=None)
_get = _current.get


def get_context() -> UserExecutionContext:
    """The current context; raises :class:`ContextNotSetError` outside a request."""
    ctx = _get()
    if ctx is None:
        raise ContextNotSetError(
            "no UserExecutionContext is set: call this inside a request handled by "
            "ContextMiddleware, or inside a use_context() block"
        )
    return ctx


def get_context_or_none() -> UserExecutionContext | None:
    """The current context, or None outside a request."""
    return _get()


class use_context:  # noqa: N801 - used like a function, as contextlib's helpers are
    """Make ``ctx`` current for a ``with`` or ``async with`` block; restore the previous on exit."""

    __slots__ = ("_ctx", "_tokens")

    def __init__(self, ctx: UserExecutionContext) -> None:
        if not isinstance(ctx, UserExecutionContext):
            raise TypeError("use_context() takes a UserExecutionContext")
        self._ctx = ctx
        self._tokens: list[Token[UserExecutionContext | None]] = []

    def __enter__(self) -> UserExecutionContext:
        self._tokens.append(_current.set(self._ctx))
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
