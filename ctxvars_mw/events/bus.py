"""EventBus: routes events to the websockets of exactly one user (or one of their threads)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..context import ANONYMOUS_USER_ID
from ..current import get_context, get_context_or_none
from ..errors import AuthenticationRequiredError, ConfigurationError
from ..ids import is_valid_id
from .codec import DEFAULT_MAX_MESSAGE_BYTES, check_idempotency_key, encode, parse_event_id
from .connection import JSONSender, Subscription
from .guard import SessionGuard
from .local import EventBackend, LocalBackend

__all__ = ["EventBus", "PublishResult"]


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What :meth:`EventBus.publish` did: the event's ``id``, and ``connections`` — how many
    connections of this process it was queued on (:class:`LocalBackend`), or None when the
    backend delivers it in every process (:class:`RedisBackend`: it is stored, and each
    process's reader delivers it)."""

    id: str
    connections: int | None


class EventBus:
    """Per-user event routing to websocket connections, in one process or across many.

    ``backend`` carries events between processes: :class:`LocalBackend` (the default, one
    process) or :class:`RedisBackend` (many processes sharing a Redis). Routing is by exact
    user id: an event published for one user is never queued on another user's socket.

    ``queue_size`` bounds each connection's queue (the oldest event is dropped when full);
    ``max_message_bytes`` bounds an encoded event; ``send_timeout`` (seconds, or None)
    unregisters a socket whose ``send_json`` takes longer.

    Registered sockets are closed when their credentials end (see :mod:`ctxvars_mw.events.guard`):
    4003 when the token's ``exp`` passes, and — with ``session_store`` (the middleware's) —
    4001 when the session is revoked in any process and 4002 when it expires; a session is
    asked about again at least every ``session_recheck_interval`` seconds.
    """

    def __init__(
        self,
        backend: EventBackend | None = None,
        *,
        queue_size: int = 256,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        send_timeout: float | None = 10.0,
        session_store: Any = None,
        session_recheck_interval: float = 60.0,
    ) -> None:
        if backend is not None and not callable(getattr(backend, "publish", None)):
            raise ConfigurationError("backend must be an event backend (LocalBackend, ...)")
        if not _positive_int(queue_size):
            raise ConfigurationError("queue_size must be a positive int")
        if not _positive_int(max_message_bytes) or max_message_bytes < 256:
            raise ConfigurationError("max_message_bytes must be an int >= 256")
        if send_timeout is not None and not _positive_seconds(send_timeout):
            raise ConfigurationError("send_timeout must be a positive number of seconds or None")
        if session_store is not None and not callable(getattr(session_store, "get", None)):
            raise ConfigurationError("session_store must be a SessionStore")
        if not _positive_seconds(session_recheck_interval):
            raise ConfigurationError("session_recheck_interval must be a positive number")
        self.backend: EventBackend = backend if backend is not None else LocalBackend()
        self._guard = SessionGuard(
            session_store, float(session_recheck_interval), self._subscriptions
        )
        self._queue_size = queue_size
        self._max_bytes = max_message_bytes
        self._send_timeout = send_timeout
        self._by_user: dict[str, dict[Subscription, None]] = {}
        self._count = 0
        self._dropped = 0
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the backend; publish and connect work from now on."""
        if self._started:
            raise RuntimeError("the EventBus is already started")
        await self.backend.start(self._dispatch, self._max_bytes)
        try:
            await self._guard.start()
        except BaseException:
            await self.backend.stop()
            raise
        self._started = True

    async def stop(self) -> None:
        """Unregister every connection (their queued events are discarded); stop the backend."""
        if not self._started:
            return
        self._started = False
        await self._guard.stop()
        subscriptions = self._subscriptions()
        for sub in subscriptions:
            self._forget(sub)
        for sub in subscriptions:
            await sub.close()
        await self.backend.stop()

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- connections ---------------------------------------------------------------------------

    def connect(
        self,
        websocket: JSONSender,
        *,
        thread_id: str | None = None,
        last_event_id: str | None = None,
    ) -> _Connect:
        """Register ``websocket`` under the current context's user for an ``async with`` block.

        With ``thread_id``, the socket receives the user's events published to that thread
        and those published to the user as a whole; without, it receives every event of the
        user. The current context must be authenticated (``AuthenticationRequiredError``
        otherwise): anonymous users share one id and must never share events.

        With ``last_event_id`` (the ``"id"`` of the last event the client received), the
        user's events published after it that are still in the backend's history are sent
        first, then live ones, each once and in order; the yielded
        :class:`Subscription`'s ``recovered`` tells whether none were missed. A malformed id is
        a ``ValueError``. Replay only ever reads the connecting user's own events.
        """
        if not callable(getattr(websocket, "send_json", None)):
            raise TypeError("connect() needs an object with an async send_json(obj) method")
        if thread_id is not None and not _valid_id(thread_id):
            raise ValueError("thread_id must be a valid id")
        if last_event_id is not None:
            parse_event_id(last_event_id)
        return _Connect(self, websocket, thread_id, last_event_id)

    @property
    def connection_count(self) -> int:
        """How many connections are registered on this process."""
        return self._count

    @property
    def user_count(self) -> int:
        """How many users have at least one connection registered on this process."""
        return len(self._by_user)

    @property
    def dropped_count(self) -> int:
        """How many events the drop-oldest policy has discarded on this process."""
        return self._dropped

    def connections_for(self, user_id: str) -> int:
        """How many connections ``user_id`` has registered on this process."""
        return len(self._by_user.get(user_id, ()))

    def _register(self, sub: Subscription) -> None:
        if not self._started:
            raise RuntimeError("the EventBus is not started: call await bus.start() first")
        subs = self._by_user.get(sub.user_id)
        if subs is None:
            subs = self._by_user[sub.user_id] = {}
        subs[sub] = None
        self._count += 1

    def _subscriptions(self) -> list[Subscription]:
        return [sub for subs in self._by_user.values() for sub in subs]

    def _forget(self, sub: Subscription) -> None:
        if not sub.active:
            return
        sub.active = False
        self._guard.release(sub)
        subs = self._by_user.get(sub.user_id)
        if subs is None or sub not in subs:
            return
        del subs[sub]
        self._count -= 1
        if not subs:
            del self._by_user[sub.user_id]
            if self._started:
                self.backend.unsubscribe(sub.user_id)

    # -- publishing ----------------------------------------------------------------------------

    async def publish(
        self, user_id: str, event: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> PublishResult:
        """Deliver ``event`` (a JSON-serializable mapping) to every connection of ``user_id``.

        The message carries the publisher's ``request_id`` and ``correlation_id`` (None
        outside a request) and the event's ``id``. Returns a :class:`PublishResult` once the
        event is stored; raises ``ServiceUnavailableError`` when the backend (Redis) is
        unreachable. A retry after that error may find the first attempt stored after all:
        pass the same ``idempotency_key`` (``[A-Za-z0-9._:-]{1,128}``) to both and the event is
        stored once (the retry returns the first id). ``TypeError``/``ValueError`` for a bad
        user id, key or event, or an event over ``max_message_bytes``.
        """
        return await self._publish(user_id, None, event, idempotency_key)

    async def publish_to_thread(
        self,
        user_id: str,
        thread_id: str,
        event: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
    ) -> PublishResult:
        """Deliver ``event`` to ``user_id``'s connections for ``thread_id`` (and the user's
        connections registered without a thread); never to the user's other threads."""
        if not _valid_id(thread_id):
            raise ValueError("thread_id must be a valid id")
        return await self._publish(user_id, thread_id, event, idempotency_key)

    async def publish_to_current_user(
        self, event: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> PublishResult:
        """:meth:`publish` to the current context's user (which must be authenticated)."""
        ctx = get_context()
        if not ctx.is_authenticated:
            raise AuthenticationRequiredError("events need an authenticated user")
        return await self._publish(ctx.user_id, None, event, idempotency_key)

    async def _publish(
        self,
        user_id: str,
        thread_id: str | None,
        event: Mapping[str, Any],
        idempotency_key: str | None,
    ) -> PublishResult:
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        if not isinstance(user_id, str):
            raise TypeError("user_id must be a string")
        if not _valid_id(user_id):
            raise ValueError("user_id must be a valid, authenticated user id")
        if not self._started:
            raise RuntimeError("the EventBus is not started: call await bus.start() first")
        ctx = get_context_or_none()
        if ctx is None:
            data = encode(user_id, thread_id, event, None, None, self._max_bytes)
        else:
            data = encode(
                user_id, thread_id, event, ctx.request_id, ctx.correlation_id, self._max_bytes
            )
        event_id, connections = await self.backend.publish(user_id, data, idempotency_key)
        return PublishResult(event_id, connections)

    def _dispatch(self, message: dict[str, Any]) -> int:
        """Queue a validated message on its user's connections (called by the backend);
        return how many connections it was meant for."""
        subs = self._by_user.get(message["user_id"])
        if not subs:
            return 0
        thread_id = message.get("thread_id")
        number = parse_event_id(message["id"])
        reached = 0
        for sub in subs:
            if thread_id is None or sub.thread_id is None or sub.thread_id == thread_id:
                reached += 1
                if sub.enqueue(message, number):
                    self._dropped += 1
        return reached


class _Connect:
    """The ``async with bus.connect(ws)`` block: registers on entry, unregisters on exit."""

    __slots__ = ("_bus", "_last_event_id", "_sub", "_thread_id", "_websocket")

    def __init__(
        self,
        bus: EventBus,
        websocket: JSONSender,
        thread_id: str | None,
        last_event_id: str | None,
    ) -> None:
        self._bus = bus
        self._websocket = websocket
        self._thread_id = thread_id
        self._last_event_id = last_event_id
        self._sub: Subscription | None = None

    async def __aenter__(self) -> Subscription:
        if self._sub is not None:
            raise RuntimeError("this connect() block is already in use")
        ctx = get_context()
        if not ctx.is_authenticated or ctx.user_id == ANONYMOUS_USER_ID:
            raise AuthenticationRequiredError("events need an authenticated user")
        bus = self._bus
        sub = Subscription(
            self._websocket,
            ctx.user_id,
            self._thread_id,
            bus._queue_size,
            bus._send_timeout,
            bus._forget,
        )
        last = self._last_event_id
        if last is not None:
            sub.hold(parse_event_id(last))
        sub.session_id = ctx.session_id
        sub.expires_at = _expiry(ctx.claims.get("exp"))
        bus._register(sub)
        self._sub = sub
        try:
            await bus.backend.subscribe(sub.user_id)
            await bus._guard.admit(sub)
            if last is not None and sub.active:
                await self._replay(sub, last)
        except BaseException:
            await self._close()
            raise
        return sub

    async def _replay(self, sub: Subscription, last: str) -> None:
        """Queue the user's events after ``last`` (own events only), then the held live ones."""
        bus = self._bus
        messages, complete = await bus.backend.history(sub.user_id, last, bus._queue_size)
        thread = sub.thread_id
        replayed = [
            (message, parse_event_id(message["id"]))
            for message in messages
            if message["user_id"] == sub.user_id
            and (thread is None or message.get("thread_id") in (None, thread))
        ]
        sub.recovered = complete
        bus._dropped += sub.release(replayed)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        sub = self._sub
        if sub is not None:
            self._sub = None
            self._bus._forget(sub)
            await sub.close()


def _expiry(exp: object) -> float | None:
    """A token's ``exp`` claim as a Unix time, or None when it has none usable."""
    if isinstance(exp, (int, float)) and not isinstance(exp, bool) and math.isfinite(exp):
        return float(exp)
    return None


def _positive_seconds(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and value != ANONYMOUS_USER_ID and is_valid_id(value)
