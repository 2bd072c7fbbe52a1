"""A thread pool whose jobs run in the submitter's context.

A plain :class:`concurrent.futures.ThreadPoolExecutor` runs each job in whatever context its
worker thread happens to have — usually the empty one, so ``get_context()`` fails there.
:class:`ContextThreadPoolExecutor` copies the submitter's context (every ContextVar, not only
ours: OpenTelemetry's span and the id rules travel too) at ``submit`` time, and runs the job in
that copy. Each job gets its own copy, so a value a job sets never leaks into the next job that
runs on the same worker thread, nor back into the submitter.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["ContextThreadPoolExecutor"]

P = ParamSpec("P")
T = TypeVar("T")


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose ``submit`` and ``map`` carry the submitter's context.

    ``map`` submits through ``submit`` from the calling thread, so every item runs in a copy
    of the context current when ``map`` was called. The ``initializer`` (if any) runs in the
    worker thread's own context, as with the standard executor.
    """

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` to run in a copy of the current context."""
        ctx = contextvars.copy_context()
        return super().submit(functools.partial(ctx.run, fn, *args, **kwargs))
