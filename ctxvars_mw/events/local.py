"""The in-process event backend and the interface every backend implements."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import ConfigurationError
from .codec import decode, parse_event_id

__all__ = ["Deliver", "EventBackend", "LocalBackend", "history_options"]

#: What a backend calls with each validated message (its ``"id"`` set): the bus's router,
#: which returns how many connections of this process it was queued on.
Deliver = Callable[[dict[str, Any]], int]

#: Replay history defaults: how many events (all users together) and for how long. The
#: in-process history is kept smaller (each event held costs a few hundred bytes of memory).
DEFAULT_HISTORY_MAX_EVENTS = 10_000
DEFAULT_LOCAL_HISTORY_MAX_EVENTS = 1_000
DEFAULT_HISTORY_SECONDS = 120.0


class EventBackend(Protocol):
    """Carries encoded envelopes from publishers to every :class:`EventBus` that listens.

    ``publish`` stores the envelope, gives it its id and returns ``(id, connections)`` —
    ``connections`` is how many connections it was queued on, or None when it is delivered in
    other processes too and that is not known at once. ``history`` returns a user's envelopes
    after an id, for replay. ``subscribe`` is awaited when a user gets a connection on this
    process; ``unsubscribe`` is called (without awaiting) when the user's last one is gone.
    """

    async def start(self, deliver: Deliver, max_message_bytes: int) -> None:
        """Begin delivering envelopes to ``deliver``."""
        ...

    async def stop(self) -> None:
        """Stop delivering and release every resource."""
        ...

    async def publish(
        self, user_id: str, data: bytes, idempotency_key: str | None
    ) -> tuple[str, int | None]:
        """Store and send one encoded envelope for ``user_id``; return its id."""
        ...

    async def history(
        self, user_id: str, after: str, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """``user_id``'s messages with an id after ``after`` (oldest first, at most the last
        ``limit``), and whether that is all of them (False when some may have been dropped)."""
        ...

    async def subscribe(self, user_id: str) -> None:
        """Start receiving ``user_id``'s events on this process."""
        ...

    def unsubscribe(self, user_id: str) -> None:
        """Stop receiving ``user_id``'s events on this process (best effort, non-blocking)."""
        ...


def history_options(max_events: object, seconds: object) -> tuple[int, float]:
    """Checked ``history_max_events`` and ``history_seconds`` (ConfigurationError otherwise)."""
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
        raise ConfigurationError("history_max_events must be a positive int")
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise ConfigurationError("history_seconds must be a positive number of seconds")
    return max_events, float(seconds)


class LocalBackend:
    """Delivers events within this process only: the default, for a single worker.

    Each delivery decodes the encoded envelope again, so every delivery gets its own copy and
    a publisher mutating its event afterwards changes nothing that was sent. The last
    ``history_max_events`` envelopes of the last ``history_seconds`` are kept for replay
    (``bus.connect(ws, last_event_id=...)``); a restarted process has no history, and replay
    says so (``Subscription.recovered`` is False).
    """

    def __init__(
        self,
        *,
        history_max_events: int = DEFAULT_LOCAL_HISTORY_MAX_EVENTS,
        history_seconds: float = DEFAULT_HISTORY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_events, self._seconds = history_options(history_max_events, history_seconds)
        self._clock = clock
        self._deliver: Deliver | None = None
        self._max_bytes = 0
        self._last = (0, 0)
        self._floor = (0, 0)  # ids before this were given out before this backend started
        self._dropped = (0, 0)  # the newest id dropped from the history
        self._history: deque[tuple[tuple[int, int], str, str, bytes]] = deque()
        self._keys: OrderedDict[tuple[str, str], tuple[str, tuple[int, int]]] = OrderedDict()

    async def start(self, deliver: Deliver, max_message_bytes: int) -> None:
        """Deliver to ``deliver`` from now on."""
        if self._deliver is not None:
            raise RuntimeError("this LocalBackend already serves an EventBus")
        self._deliver = deliver
        self._max_bytes = max_message_bytes
        if self._floor == (0, 0):
            self._floor = (math.floor(self._clock() * 1000), 0)

    async def stop(self) -> None:
        """Stop delivering."""
        self._deliver = None

    def _next_id(self) -> tuple[int, int]:
        ms = max(math.floor(self._clock() * 1000), self._last[0])
        self._last = (ms, self._last[1] + 1) if ms == self._last[0] else (ms, 0)
        return self._last

    def _trim(self) -> None:
        horizon = (math.floor((self._clock() - self._seconds) * 1000), 0)
        history = self._history
        while history and (len(history) > self._max_events or history[0][0] < horizon):
            self._dropped = history.popleft()[0]
        keys = self._keys
        while keys and next(iter(keys.values()))[1] < horizon:
            keys.popitem(last=False)

    async def publish(
        self, user_id: str, data: bytes, idempotency_key: str | None = None
    ) -> tuple[str, int | None]:
        """Give the envelope its id, keep it for replay and queue it on this process's
        connections; with a key seen in the window, return the first publish's id instead."""
        deliver = self._deliver
        if deliver is None:
            raise RuntimeError("the EventBus is not started")
        if idempotency_key is not None:
            seen = self._keys.get((user_id, idempotency_key))
            if seen is not None:
                return seen[0], 0
        message = decode(data, self._max_bytes)
        number = self._next_id()
        event_id = f"{number[0]}-{number[1]}"
        self._history.append((number, event_id, user_id, data))
        if idempotency_key is not None:
            self._keys[user_id, idempotency_key] = (event_id, number)
        self._trim()
        message["id"] = event_id
        return event_id, deliver(message)

    async def history(
        self, user_id: str, after: str, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """``user_id``'s kept messages after ``after``; complete unless some were dropped."""
        since = parse_event_id(after)
        self._trim()
        found: deque[dict[str, Any]] = deque(maxlen=limit)
        overflow = False
        for number, event_id, owner, data in self._history:
            if number > since and owner == user_id:
                overflow = overflow or len(found) == limit
                message = decode(data, self._max_bytes)
                message["id"] = event_id
                found.append(message)
        complete = not overflow and since >= self._dropped and since >= self._floor
        return list(found), complete

    async def subscribe(self, user_id: str) -> None:
        """Nothing to do in process."""

    def unsubscribe(self, user_id: str) -> None:
        """Nothing to do in process."""
