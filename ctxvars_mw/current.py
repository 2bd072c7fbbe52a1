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

# The one ContextVar. It holds a *frame*: ``(context, cleanups, headers)``.
#
# - ``context`` is the current UserExecutionContext, or None.
# - ``cleanups`` is the cleanup list of the innermost request or ``resource_scope()``
#   (``ctxvars_mw.resources``), or None: one ContextVar carries both, so a request sets one.
# - ``headers`` is the request's ``scope["headers"]`` list, or None. A ContextMiddleware nested
#   in the same request (a mounted sub-app with its own) finds the frame of a request whose
#   header list is its own, and keeps that request's ids; any other ASGI call (an in-process
#   ``httpx.ASGITransport`` request made by a handler) has a list of its own.
#
# ``use_context()`` inside a request sets a frame with its context and the request's cleanups
# and headers. A tuple because it is the cheapest object there is; the functions below are
# the only code that knows its layout.
Frame = tuple[UserExecutionContext | None, "list[Any] | None", "list[Any] | None"]
_NO_FRAME: Frame = (None, None, None)
_current: ContextVar[Frame] = ContextVar("ctxvars_mw.context", default=_NO_FRAME)
_get_frame = _current.get
FrameToken = Token[Frame]


def get_context() -> UserExecutionContext:
    """The current context; raises :class:`ContextNotSetError` outside a request."""
    ctx = _get_frame()[0]
    if ctx is None:
        raise ContextNotSetError(
            "no UserExecutionContext is set: call this inside a request handled by "
            "ContextMiddleware, or inside a use_context() block"
        )
    return ctx


def get_context_or_none() -> UserExecutionContext | None:
    """The current context, or None outside a request."""
    return _get_frame()[0]


def set_context(ctx: UserExecutionContext) -> FrameToken:
    """Make ``ctx`` current, keeping the enclosing request's cleanups and headers; undo with
    :func:`reset_frame` and the token (for integrations that cannot use ``use_context``)."""
    _, cleanups, headers = _get_frame()
    return _current.set((ctx, cleanups, headers))


def open_frame(
    ctx: UserExecutionContext | None, cleanups: list[Any], headers: list[Any] | None
) -> FrameToken:
    """Start a request's (or a resource scope's) frame: ``ctx`` current, ``cleanups`` the list
    that ``attach_resource()`` adds to, ``headers`` the request's header list (or None)."""
    return _current.set((ctx, cleanups, headers))


#: ``reset_frame(token)``: restore the frame that was current before ``token``'s ``set``
#: (the ContextVar's own ``reset``: no call of ours in between).
reset_frame: Callable[[FrameToken], None] = _current.reset


def current_cleanups() -> list[Any] | None:
    """The cleanup list of the innermost request or resource scope, if any."""
    return _get_frame()[1]


def current_headers() -> list[Any] | None:
    """The header list of the request being handled, if any."""
    return _get_frame()[2]


def request_context_for(headers: list[Any]) -> UserExecutionContext | None:
    """The context of the request whose ``scope["headers"]`` is ``headers``, when that very
    request is being handled already (a ContextMiddleware nested in it)."""
    ctx, _, current = _get_frame()
    return ctx if current is headers else None


class use_context:  # noqa: N801 - used like a function, as contextlib's helpers are
    """Make ``ctx`` current for a ``with`` or ``async with`` block; restore the previous on exit."""

    __slots__ = ("_ctx", "_tokens")

    def __init__(self, ctx: UserExecutionContext) -> None:
        if not isinstance(ctx, UserExecutionContext):
            raise TypeError("use_context() takes a UserExecutionContext")
        self._ctx = ctx
        self._tokens: list[FrameToken] = []

    def __enter__(self) -> UserExecutionContext:
        self._tokens.append(set_context(self._ctx))
        return self._ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reset_frame(self._tokens.pop())

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
