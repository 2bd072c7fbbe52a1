"""The in-process event backend and the interface every backend implements."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .codec import decode

__all__ = ["Deliver", "EventBackend", "LocalBackend"]

#: What a backend calls with each validated envelope: the bus's router.
Deliver = Callable[[dict[str, Any]], None]


class EventBackend(Protocol):
    """Carries encoded envelopes from publishers to every :class:`EventBus` that listens.

    ``subscribe`` is awaited when a user gets a connection on this process and returns once
    that user's events will arrive; ``unsubscribe`` is called (without awaiting) when the
    user's last connection here is gone.
    """

    async def start(self, deliver: Deliver, max_message_bytes: int) -> None:
        """Begin delivering envelopes to ``deliver``."""
        ...

    async def stop(self) -> None:
        """Stop delivering and release every resource."""
        ...

    async def publish(self, user_id: str, data: bytes) -> None:
        """Send one encoded envelope for ``user_id``."""
        ...

    async def subscribe(self, user_id: str) -> None:
        """Start receiving ``user_id``'s events on this process."""
        ...

    def unsubscribe(self, user_id: str) -> None:
        """Stop receiving ``user_id``'s events on this process (best effort, non-blocking)."""
        ...


class LocalBackend:
    """Delivers events within this process only: the default, for a single worker.

    Each publish decodes the encoded envelope again, so every delivery gets its own copy
    and a publisher mutating its event afterwards changes nothing that was sent.
    """

    __slots__ = ("_deliver", "_max_bytes")

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._max_bytes = 0

    async def start(self, deliver: Deliver, max_message_bytes: int) -> None:
        """Deliver to ``deliver`` from now on."""
        if self._deliver is not None:
            raise RuntimeError("this LocalBackend already serves an EventBus")
        self._deliver = deliver
        self._max_bytes = max_message_bytes

    async def stop(self) -> None:
        """Stop delivering."""
        self._deliver = None

    async def publish(self, user_id: str, data: bytes) -> None:
        """Hand the envelope to the bus's router (its connections' queues) right away."""
        deliver = self._deliver
        if deliver is None:
            raise RuntimeError("the EventBus is not started")
        deliver(decode(data, self._max_bytes))

    async def subscribe(self, user_id: str) -> None:
        """Nothing to do in process."""

    def unsubscribe(self, user_id: str) -> None:
        """Nothing to do in process."""
