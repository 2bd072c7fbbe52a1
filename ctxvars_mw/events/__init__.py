"""Per-user real-time events, routed to websocket connections in one process or many.

::

    bus = EventBus()                      # or EventBus(RedisBackend("redis://..."))
    async with bus:                       # start() / stop()
        ...
    # inside a websocket endpoint behind ContextMiddleware:
    async with bus.connect(websocket):    # registered under the current user
        ...
    await bus.publish(user_id, {"kind": "token", "text": "hi"})

Every delivered message is ``{"type": "event", "user_id", "event", "request_id",
"correlation_id", "id"}`` (plus ``"thread_id"`` for thread events), with the publisher's ids
and the event's own id; ``bus.connect(websocket, last_event_id=...)`` replays what a
reconnecting client missed. A registered socket is closed when its credentials end: 4001
session revoked, 4002 session expired, 4003 token expired (:mod:`ctxvars_mw.events.guard`).
``redis`` is imported only when a :class:`RedisBackend` is constructed.
"""

from __future__ import annotations

from .bus import EventBus, PublishResult
from .codec import DEFAULT_MAX_MESSAGE_BYTES, MalformedMessageError
from .connection import JSONSender, Subscription
from .guard import CLOSE_REVOKED, CLOSE_SESSION_EXPIRED, CLOSE_TOKEN_EXPIRED
from .local import EventBackend, LocalBackend
from .redis_backend import RedisBackend

__all__ = [
    "CLOSE_REVOKED",
    "CLOSE_SESSION_EXPIRED",
    "CLOSE_TOKEN_EXPIRED",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "EventBackend",
    "EventBus",
    "JSONSender",
    "LocalBackend",
    "MalformedMessageError",
    "PublishResult",
    "RedisBackend",
    "Subscription",
]
