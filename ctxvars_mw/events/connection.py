"""One registered websocket: its bounded queue and its sender task.

Overflow policy: **drop the oldest**. Each connection queues at most ``queue_size`` events;
when a new event arrives at a full queue, the oldest queued event is discarded,
:attr:`Subscription.dropped` (and the bus's ``dropped_count``) goes up, and the first drop
on a connection is logged. A live UI wants the newest state, and one slow socket must never
hold back the publisher or other sockets.

A sender task runs only while the queue holds events, in the context captured when the
connection was registered (so ``get_context()`` inside ``send_json`` is the connection's
request, never the publisher's). A send that raises or exceeds ``send_timeout`` unregisters
the connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["JSONSender", "Subscription"]

logger = logging.getLogger("ctxvars_mw.events")


class JSONSender(Protocol):
    """Anything with ``async send_json(obj)``, e.g. Starlette's ``WebSocket``."""

    async def send_json(self, data: Any) -> None:
        """Send one JSON-serializable object."""
        ...


class Subscription:
    """A websocket registered with an :class:`~ctxvars_mw.events.EventBus`.

    ``connect()`` yields it. ``user_id`` and ``thread_id`` are what it was registered under;
    ``dropped`` counts events discarded by the drop-oldest policy; ``active`` turns False
    once it is unregistered (on exit, on a failed send, or when the bus stops).
    """

    __slots__ = (
        "_context",
        "_forget",
        "_loop",
        "_maxlen",
        "_queue",
        "_send_timeout",
        "_task",
        "active",
        "dropped",
        "thread_id",
        "user_id",
        "websocket",
    )

    def __init__(
        self,
        websocket: JSONSender,
        user_id: str,
        thread_id: str | None,
        maxlen: int,
        send_timeout: float | None,
        forget: Callable[[Subscription], None],
    ) -> None:
        self.websocket = websocket
        self.user_id = user_id
        self.thread_id = thread_id
        self.dropped = 0
        self.active = True
        self._maxlen = maxlen
        self._send_timeout = send_timeout
        self._forget = forget
        self._queue: deque[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._context = contextvars.copy_context()
        self._loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        return f"<Subscription active={self.active} dropped={self.dropped}>"

    @property
    def pending(self) -> int:
        """How many events wait in this connection's queue."""
        return 0 if self._queue is None else len(self._queue)

    def enqueue(self, message: dict[str, Any]) -> bool:
        """Queue ``message``; return True when an older event had to be dropped for it."""
        if not self.active:
            return False
        queue = self._queue
        if queue is None:
            queue = self._queue = deque(maxlen=self._maxlen)
        dropped = len(queue) == self._maxlen
        if dropped:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning(
                    "an event queue is full (%d): dropping the oldest events for a slow websocket",
                    self._maxlen,
                )
        queue.append(message)
        if self._task is None:
            self._task = self._loop.create_task(self._drain(), context=self._context)
        return dropped

    async def _drain(self) -> None:
        queue = self._queue
        assert queue is not None
        send = self.websocket.send_json
        timeout = self._send_timeout
        try:
            while queue:
                message = queue.popleft()
                if timeout is None:
                    await send(message)
                else:
                    async with asyncio.timeout(timeout):
                        await send(message)
        except Exception as exc:
            # Only the error's type: a send error may quote what was being sent.
            logger.warning(
                "sending an event to a websocket failed (%s); the connection is unregistered",
                type(exc).__name__,
            )
            self._task = None
            self._queue = None
            self._forget(self)
            return
        self._task = None
        self._queue = None

    async def close(self) -> None:
        """Stop the sender task (queued events are discarded) and wait for it to end."""
        self.active = False
        task = self._task
        self._task = None
        self._queue = None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])
