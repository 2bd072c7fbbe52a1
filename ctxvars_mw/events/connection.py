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

Each connection remembers the id of the last event it queued and queues only later ones, so
an event that arrives twice (replayed and live at once, or read again after a reconnect) is
sent once. While a reconnecting client's missed events are fetched, live events are held and
queued after them, in id order.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

EventNumber = tuple[int, int]

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
    ``session_id`` and ``expires_at`` (the token's ``exp``) come from the context it was
    registered in. ``recovered`` is True when it was opened with a ``last_event_id`` and every
    event missed since was replayed; ``close_code`` is the code the bus closed it with (4001
    revoked, 4002 session expired, 4003 token expired), None otherwise.
    """

    __slots__ = (
        "_context",
        "_forget",
        "_held",
        "_last",
        "_loop",
        "_maxlen",
        "_queue",
        "_send_timeout",
        "_task",
        "active",
        "close_code",
        "dropped",
        "expires_at",
        "recovered",
        "session_id",
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
        self.session_id: str | None = None
        self.expires_at: float | None = None
        self.recovered = False
        self.close_code: int | None = None
        self._last: EventNumber = (0, 0)
        self._held: list[tuple[dict[str, Any], EventNumber]] | None = None
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

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event queued for this connection (None before the first)."""
        last = self._last
        return None if last == (0, 0) else f"{last[0]}-{last[1]}"

    def hold(self, after: EventNumber) -> None:
        """Hold live events (until :meth:`release`) and skip those up to ``after``."""
        self._last = after
        self._held = []

    def release(self, replayed: list[tuple[dict[str, Any], EventNumber]]) -> int:
        """Queue ``replayed`` then the held live events, in id order; return how many drops."""
        held, self._held = self._held or [], None
        return sum(self.enqueue(message, number) for message, number in (*replayed, *held))

    def enqueue(self, message: dict[str, Any], number: EventNumber) -> bool:
        """Queue ``message`` (event id ``number``) unless it is not newer than the last one;
        return True when an older event had to be dropped for it."""
        if not self.active:
            return False
        if self._held is not None:
            self._held.append((message, number))
            return False
        if number <= self._last:
            return False
        self._last = number
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

    async def shut(self, code: int, reason: str) -> None:
        """Unregister, discard what is queued, and close the websocket with ``code``.

        Nothing is sent on this connection afterwards. A websocket without ``close`` (a plain
        JSON sink) is only unregistered; errors from a socket that is already gone are ignored.
        """
        if not self.active:
            return
        self.close_code = code
        self._forget(self)
        await self.close()
        close = getattr(self.websocket, "close", None)
        if callable(close):
            try:
                async with asyncio.timeout(self._send_timeout):
                    await close(code=code, reason=reason)
            except Exception as exc:
                logger.debug("closing a websocket failed (%s)", type(exc).__name__)

    async def close(self) -> None:
        """Stop the sender task (queued events are discarded) and wait for it to end."""
        self.active = False
        self._held = None
        task = self._task
        self._task = None
        self._queue = None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])
