"""Per-request resources: things to close when the request is done.

Inside a request handled by :class:`~ctxvars_mw.ContextMiddleware` (or a
:func:`resource_scope` / :func:`managed_context` block), :func:`attach_resource` registers a
cleanup. Cleanups run last-in-first-out after the response is sent (background tasks
included), also on error and on cancellation; a cleanup that fails is logged and the others
still run.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from .context import UserExecutionContext
from .current import (
    FrameToken,
    current_cleanups,
    current_headers,
    get_context_or_none,
    open_frame,
    reset_frame,
    use_context,
)
from .errors import ContextNotSetError

__all__ = [
    "attach_resource",
    "close_scope",
    "managed_context",
    "resource_scope",
    "run_cleanups",
]

T = TypeVar("T")
Cleanup = Callable[[], "Awaitable[Any] | Any"]

logger = logging.getLogger("ctxvars_mw.resources")


def _closed() -> None:
    """The marker a request's cleanup list ends with once the request is over."""


# A request's cleanups: a plain list, carried in the context's ContextVar (see
# ctxvars_mw.current), ended by ``_closed`` once the request is over, so that a task that
# outlived it is refused rather than registering a cleanup that would never run.


def _default_cleanup(resource: Any) -> Cleanup:
    for name in ("aclose", "close"):
        method = getattr(resource, name, None)
        if callable(method):
            return method  # type: ignore[no-any-return]
    raise TypeError(
        "attach_resource() needs a cleanup callback for objects without aclose() or close()"
    )


def attach_resource(resource: T, cleanup: Cleanup | None = None) -> T:
    """Register ``resource`` for cleanup at the end of the current request; return it.

    ``cleanup`` (sync or async, no arguments) defaults to the resource's ``aclose`` or
    ``close`` method.
    """
    stack = current_cleanups()
    if stack is None:
        raise ContextNotSetError(
            "attach_resource() needs a request (ContextMiddleware) or a resource_scope() block"
        )
    if stack and stack[-1] is _closed:
        # A task that outlived its request: its cleanups already ran, this one never would.
        raise ContextNotSetError("attach_resource(): this request is over; its cleanups ran")
    if cleanup is not None and not callable(cleanup):
        raise TypeError("cleanup must be a callable taking no arguments")
    stack.append(_default_cleanup(resource) if cleanup is None else cleanup)
    return resource


async def run_cleanups(stack: list[Cleanup]) -> None:
    """Run ``stack``'s cleanups last-in-first-out; log failures; re-raise a cancellation last."""
    cancelled: BaseException | None = None
    while stack:
        cleanup = stack.pop()
        try:
            result = cleanup()
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception(
                "a request cleanup failed: %s", getattr(cleanup, "__qualname__", cleanup)
            )
        except BaseException as exc:  # cancellation: finish the others first
            cancelled = cancelled or exc
    if cancelled is not None:
        raise cancelled


def close_scope(token: FrameToken, cleanups: list[Cleanup]) -> None:
    """End a scope opened with ``open_frame(ctx, cleanups, headers)`` once its cleanups ran
    (:func:`run_cleanups`): restore the frame before it. Tasks that copied the context still
    see the list, closed: attaching to it raises instead of registering a cleanup that would
    never run."""
    cleanups.append(_closed)
    reset_frame(token)


@asynccontextmanager
async def resource_scope() -> AsyncIterator[None]:
    """A block whose attached resources are cleaned up on exit; the current context does
    not change."""
    cleanups: list[Cleanup] = []
    token = open_frame(get_context_or_none(), cleanups, current_headers())
    try:
        yield
    finally:
        try:
            await run_cleanups(cleanups)
        finally:
            close_scope(token, cleanups)


@asynccontextmanager
async def managed_context(
    ctx: UserExecutionContext, *, close_db_session: bool = True
) -> AsyncIterator[UserExecutionContext]:
    """Make ``ctx`` current with its own resource scope (for workers and scripts).

    With ``close_db_session``, ``ctx.db_session`` is closed (``aclose``/``close``) on exit,
    after the other attached resources.
    """
    async with use_context(ctx), resource_scope():
        if close_db_session and ctx.db_session is not None:
            attach_resource(ctx.db_session)
        yield ctx
