"""The Redis pub/sub event backend: events reach every process that shares the Redis.

Each user has one channel, ``<channel_prefix>u:<sha256(user_id)[:32]>``: hashed, so no user
id can be confused with another's channel, whatever characters it holds. A process subscribes
to a user's channel while that user has a connection on it. A received message is decoded,
validated (size, shape) and checked against its channel before it is routed by exact user id;
anything else is counted in ``rejected_count`` and logged without its content.

When the pub/sub connection is lost, the listener logs ONE warning for the outage, then
reconnects and resubscribes every channel with capped exponential backoff (with jitter).
A connection that dies silently (a half-open TCP connection after a network partition or a
failover, where no reset ever arrives) is caught by a keepalive: after ``keepalive`` idle
seconds the listener sends a PING, and no answer within another ``keepalive`` seconds counts
as an outage. Every connect and every command has a ``timeout``, so no await can hang.
Pub/sub is at-most-once: events published while a process is disconnected do not reach it.
``redis`` is imported only when a ``RedisBackend`` is constructed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from typing import Any

from ..auth.options import seconds_option
from ..errors import ConfigurationError, ServiceUnavailableError
from .codec import MalformedMessageError, decode
from .local import Deliver

__all__ = ["RedisBackend"]

logger = logging.getLogger("ctxvars_mw.events")


class RedisBackend:
    """Carries events between processes through Redis pub/sub (redis-py asyncio).

    ``url_or_client`` is a ``redis://`` URL or a ``redis.asyncio.Redis``. With a URL, the
    pub/sub connection is made without redis-py's own retries, so this backend's backoff and
    its one-warning-per-outage apply; with a client, that client's retry policy applies first.
    A client passed in is not closed by :meth:`stop`.

    ``timeout`` bounds connecting and each command (with a URL); ``keepalive`` is the idle
    time after which the listener checks the pub/sub connection with a PING.
    """

    def __init__(
        self,
        url_or_client: Any,
        *,
        channel_prefix: str = "ctxvars:events:",
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        subscribe_timeout: float = 5.0,
        timeout: float = 2.0,
        keepalive: float = 15.0,
    ) -> None:
        import redis.asyncio
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError, TimeoutError
        from redis.retry import Retry

        if not isinstance(channel_prefix, str) or not channel_prefix.isprintable():
            raise ConfigurationError("channel_prefix must be a printable string")
        if " " in channel_prefix:
            raise ConfigurationError("channel_prefix must not contain spaces")
        if not 0 < backoff_initial <= backoff_max or subscribe_timeout <= 0:
            raise ConfigurationError(
                "need 0 < backoff_initial <= backoff_max, subscribe_timeout > 0"
            )
        timeout = seconds_option("timeout", timeout, above=True)
        keepalive = seconds_option("keepalive", keepalive, above=True)
        # Typed loosely: the redis stubs lag behind redis-py itself (aclose(), retry=...).
        redis_class: Any = redis.asyncio.Redis
        if isinstance(url_or_client, str):
            try:
                bounds = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
                self._client = redis_class.from_url(url_or_client, **bounds)
                self._sub_client = redis_class.from_url(
                    url_or_client, retry=Retry(NoBackoff(), 0), **bounds
                )
            except ValueError as exc:
                raise ConfigurationError("url_or_client is not a valid Redis URL") from exc
            self._owns_clients = True
        elif isinstance(url_or_client, redis_class):
            self._client = self._sub_client = url_or_client
            self._owns_clients = False
        else:
            raise ConfigurationError(
                "url_or_client must be a redis:// URL or a redis.asyncio.Redis"
            )
        self._errors = (ConnectionError, TimeoutError, OSError)
        self._prefix = channel_prefix + "u:"
        self._backoff = (float(backoff_initial), float(backoff_max))
        self._subscribe_timeout = subscribe_timeout
        self._keepalive = keepalive
        self._deliver: Deliver | None = None
        self._max_bytes = 0
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._wanted: set[str] = set()
        self._live: set[str] = set()
        self._pending: dict[str, list[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Messages refused as malformed, oversized or sent on the wrong channel.
        self.rejected_count = 0
        #: Times the pub/sub connection was lost.
        self.outage_count = 0

    def channel(self, user_id: str) -> str:
        """The Redis channel that carries ``user_id``'s events."""
        return self._prefix + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:32]

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, deliver: Deliver, max_message_bytes: int) -> None:
        """Connect the pub/sub connection and start listening."""
        if self._deliver is not None:
            raise RuntimeError("this RedisBackend already serves an EventBus")
        pubsub = self._sub_client.pubsub()
        try:
            await pubsub.connect()
        except self._errors as exc:
            await pubsub.aclose()
            raise ServiceUnavailableError("Redis is unreachable for events") from exc
        self._pubsub = pubsub
        self._deliver = deliver
        self._max_bytes = max_message_bytes
        self._listener = asyncio.create_task(self._listen(), name="ctxvars_mw.events.redis")

    async def stop(self) -> None:
        """Stop listening; close the connections this backend opened."""
        self._deliver = None
        tasks = [t for t in (self._listener, *self._tasks) if t is not None]
        self._listener = None
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=_STOP_GRACE)
            if stuck:
                logger.warning("%d Redis event task(s) did not stop in time", len(stuck))
        await self._close_pubsub()
        self._wanted.clear()
        self._live.clear()
        for waiters in self._pending.values():
            for fut in waiters:
                fut.cancel()
        self._pending.clear()
        if self._owns_clients:
            await self._client.aclose()
            await self._sub_client.aclose()

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*self._errors):
                await pubsub.aclose()

    # -- publish / subscribe -----------------------------------------------------------------

    async def publish(self, user_id: str, data: bytes) -> None:
        """PUBLISH the envelope on ``user_id``'s channel."""
        if self._deliver is None:
            raise RuntimeError("the EventBus is not started")
        try:
            await self._client.publish(self.channel(user_id), data)
        except self._errors as exc:
            raise ServiceUnavailableError("Redis is unreachable for events") from exc

    async def subscribe(self, user_id: str) -> None:
        """SUBSCRIBE to ``user_id``'s channel; return once Redis confirmed it.

        During an outage (or after ``subscribe_timeout``) it returns without confirmation:
        the channel is resubscribed when the connection comes back.
        """
        channel = self.channel(user_id)
        self._wanted.add(channel)
        if channel in self._live:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._pending.setdefault(channel, [])
        waiters.append(fut)
        try:
            if len(waiters) == 1:
                await self._send("subscribe", channel)
            if self._pubsub is not None:
                async with asyncio.timeout(self._subscribe_timeout):
                    await fut
        except TimeoutError:
            logger.warning("a Redis event subscription was not confirmed in time")
        finally:
            waiters = self._pending.get(channel, [])
            if fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._pending[channel]

    def unsubscribe(self, user_id: str) -> None:
        """UNSUBSCRIBE from ``user_id``'s channel (in the background)."""
        channel = self.channel(user_id)
        self._wanted.discard(channel)
        self._live.discard(channel)
        if self._deliver is not None:
            task = asyncio.get_running_loop().create_task(self._send("unsubscribe", channel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, command: str, channel: str) -> None:
        """Send (UN)SUBSCRIBE in order, unless the wish changed meanwhile."""
        async with self._lock:
            pubsub = self._pubsub
            if pubsub is None or (channel in self._wanted) != (command == "subscribe"):
                return
            # On failure the listener sees the outage too, and resubscribes what is wanted.
            with contextlib.suppress(*self._errors):
                await getattr(pubsub, command)(channel)

    # -- listening -----------------------------------------------------------------------------

    async def _listen(self) -> None:
        # Loops until stop() clears _deliver, not only until cancelled: a cancellation that a
        # library turns into another exception on its way out must not keep the task alive.
        while self._deliver is not None:
            try:
                await self._read(self._pubsub)
            except Exception as exc:  # connection errors, and anything else: never stop listening
                if self._deliver is None:
                    return
                self.outage_count += 1
                logger.warning(
                    "lost the Redis pub/sub connection for events (%s); resubscribing with backoff",
                    type(exc).__name__,
                )
                await self._recover()

    async def _read(self, pubsub: Any) -> None:
        if pubsub is None:
            raise ConnectionError("no pub/sub connection")
        get_message = pubsub.get_message
        keepalive = self._keepalive
        pinged = False
        while True:
            message = await get_message(timeout=keepalive)
            if message is None:  # idle for `keepalive` seconds
                if pinged:
                    raise ConnectionError("the pub/sub connection did not answer a PING")
                async with self._lock:
                    await pubsub.ping()
                pinged = True
                continue
            pinged = False  # any traffic proves the connection alive
            kind = message["type"]
            if kind == "message":
                self._on_message(message["channel"], message["data"])
            elif kind == "subscribe":
                self._on_subscribed(_text(message["channel"]))

    async def _recover(self) -> None:
        """Reconnect and resubscribe, backing off exponentially (capped, with jitter)."""
        delay, cap = self._backoff
        attempt = 0
        while self._deliver is not None:
            await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter
            attempt += 1
            try:
                await self._resubscribe()
            except Exception:
                delay = min(delay * 2, cap)
                continue
            logger.debug("Redis pub/sub for events is back after %d attempt(s)", attempt)
            return

    async def _resubscribe(self) -> None:
        async with self._lock:
            await self._close_pubsub()
            self._live.clear()
            pubsub = self._sub_client.pubsub()
            try:
                await pubsub.connect()
                if self._wanted:
                    await pubsub.subscribe(*self._wanted)
            except BaseException:
                await pubsub.aclose()
                raise
            self._pubsub = pubsub

    def _on_subscribed(self, channel: str) -> None:
        if channel in self._wanted:
            self._live.add(channel)
        for fut in self._pending.pop(channel, ()):
            if not fut.done():
                fut.set_result(None)

    def _on_message(self, channel: bytes | str, data: bytes | str) -> None:
        try:
            message = decode(data, self._max_bytes)
        except MalformedMessageError as exc:
            self.rejected_count += 1
            logger.warning("rejected an event message (%s, %d bytes)", exc, len(data))
            return
        if self.channel(message["user_id"]) != _text(channel):
            self.rejected_count += 1
            logger.warning("rejected an event message whose user does not own its channel")
            return
        deliver = self._deliver
        if deliver is not None:
            deliver(message)


_STOP_GRACE = 5.0  # seconds stop() waits for cancelled tasks before giving up on them


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
