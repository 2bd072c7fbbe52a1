"""The Redis Streams event backend: at-least-once delivery to every process, with replay.

Every event is one entry of one stream, ``<channel_prefix>{stream}``, holding the user's tag
(``sha256(user_id)[:32]``, so no id can be confused with another's) and the encoded envelope.
The entry id Redis gives it (``<ms>-<seq>``) is the event's ``"id"``.

* **Publishing** is one Lua script: ``XADD ... MAXLEN ~ history_max_events``, then ``XTRIM
  MINID ~`` for ``history_seconds`` (by the Redis clock), and the key expires when nobody
  publishes for that long. Each publish carries an idempotency key, remembered next to the
  stream for ``history_seconds``: a publish that timed out is retried with the same key, so a
  first attempt that did reach Redis is not stored twice, and a caller that retries with its
  own ``idempotency_key`` gets the first publish's id back. ``publish`` returns once the entry
  is stored, or raises :class:`~ctxvars_mw.ServiceUnavailableError`.
* **Reading.** Each process runs one reader: ``XREAD BLOCK`` from the last id it saw. Entries
  of users with no connection on this process are skipped without being decoded. After a lost
  connection (one warning per outage, capped exponential backoff with jitter) it reads on from
  that id, so nothing stored after ``publish()`` returned is missed. A connection that goes
  silent is caught because every blocking read has a deadline (``keepalive`` + ``timeout``).
* **Replay.** ``history`` reads a user's entries after a given id (``XRANGE``) for a client
  that reconnects with the last id it saw. The replay is known to be whole only while the
  client's last entry is still in the stream (trimming drops the oldest first) and the stream
  has not started over since (a Redis that lost its data); otherwise it says it may not be.

Events survive a Redis restart as far as Redis keeps its data: run it with AOF
(``appendonly yes``) when a restart must not lose what was stored but not yet read.
``redis`` is imported only when a ``RedisBackend`` is constructed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
from collections import deque
from typing import Any

from ..auth.options import seconds_option
from ..errors import ConfigurationError, ServiceUnavailableError
from .codec import MalformedMessageError, decode, parse_event_id
from .local import (
    DEFAULT_HISTORY_MAX_EVENTS,
    DEFAULT_HISTORY_SECONDS,
    Deliver,
    history_options,
)

__all__ = ["RedisBackend"]

logger = logging.getLogger("ctxvars_mw.events")

# KEYS: stream, idempotency key, generation key.
# ARGV: user tag, envelope, max events, window ms.
_PUBLISH = """
local seen = redis.call('GET', KEYS[2])
if seen then return seen end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'u', ARGV[1], 'd', ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[4])
redis.call('XTRIM', KEYS[1], 'MINID', '~', tostring(now - window))
redis.call('SET', KEYS[2], id, 'PX', window)
redis.call('SET', KEYS[3], id, 'NX')
redis.call('PEXPIRE', KEYS[1], window)
redis.call('PEXPIRE', KEYS[3], window)
return id
"""
_PAGE = 500
_PUBLISH_RETRY_DELAYS = (0.05, 0.2)


class RedisBackend:
    """Carries events between processes through a Redis stream (redis-py asyncio).

    ``url_or_client`` is a ``redis://`` URL or a ``redis.asyncio.Redis`` (used as is and not
    closed by :meth:`stop`; its ``socket_timeout``, if any, must exceed ``keepalive``).
    ``history_max_events`` and ``history_seconds`` bound the replay window (all users
    together). ``timeout`` bounds connecting and each command (with a URL); ``keepalive`` is
    how long one blocking read waits before it is issued again.
    """

    def __init__(
        self,
        url_or_client: Any,
        *,
        channel_prefix: str = "ctxvars:events:",
        history_max_events: int = DEFAULT_HISTORY_MAX_EVENTS,
        history_seconds: float = DEFAULT_HISTORY_SECONDS,
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
        timeout: float = 2.0,
        keepalive: float = 15.0,
    ) -> None:
        import redis.asyncio
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError
        from redis.retry import Retry

        if not isinstance(channel_prefix, str) or not channel_prefix.isprintable():
            raise ConfigurationError("channel_prefix must be a printable string")
        if " " in channel_prefix or "{" in channel_prefix or "}" in channel_prefix:
            raise ConfigurationError("channel_prefix must not contain spaces or braces")
        if not 0 < backoff_initial <= backoff_max:
            raise ConfigurationError("need 0 < backoff_initial <= backoff_max")
        self._max_events, window = history_options(history_max_events, history_seconds)
        self._window_ms = max(round(window * 1000), 1)
        timeout = seconds_option("timeout", timeout, above=True)
        keepalive = seconds_option("keepalive", keepalive, above=True)
        # Typed loosely: the redis stubs lag behind redis-py itself (aclose(), retry=...).
        redis_class: Any = redis.asyncio.Redis
        if isinstance(url_or_client, str):
            try:
                self._client = redis_class.from_url(
                    url_or_client,
                    socket_connect_timeout=timeout,
                    socket_timeout=timeout,
                    retry=Retry(NoBackoff(), 1),
                )
                self._reader = redis_class.from_url(
                    url_or_client,
                    socket_connect_timeout=timeout,
                    socket_timeout=keepalive + timeout,
                    retry=Retry(NoBackoff(), 0),
                )
            except ValueError as exc:
                raise ConfigurationError("url_or_client is not a valid Redis URL") from exc
            self._owns_clients = True
        elif isinstance(url_or_client, redis_class):
            self._client = self._reader = url_or_client
            self._owns_clients = False
        else:
            raise ConfigurationError(
                "url_or_client must be a redis:// URL or a redis.asyncio.Redis"
            )
        self._errors = (RedisError, OSError, TimeoutError)
        self._prefix = channel_prefix
        self._stream = channel_prefix + "{stream}"
        self._generation = self._stream + ":since"
        self._backoff = (float(backoff_initial), float(backoff_max))
        self._block_ms = max(round(keepalive * 1000), 1)
        self._publish = self._client.register_script(_PUBLISH)
        self._deliver: Deliver | None = None
        self._max_bytes = 0
        self._last_id = "0-0"
        self._wanted: set[bytes] = set()
        self._listener: asyncio.Task[None] | None = None
        #: Entries refused as malformed, oversized or tagged for another user.
        self.rejected_count = 0
        #: Times the reader lost its connection.
        self.outage_count = 0

    def channel(self, user_id: str) -> str:
        """The tag that marks ``user_id``'s entries in the stream (with the prefix)."""
        return self._prefix + "u:" + self._tag(user_id).decode("ascii")

    @staticmethod
    def _tag(user_id: str) -> bytes:
        return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:32].encode("ascii")

    @property
    def stream_key(self) -> str:
        """The Redis key of the event stream."""
        return self._stream

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, deliver: Deliver, max_message_bytes: int) -> None:
        """Find where the stream ends now and start reading from there."""
        if self._deliver is not None:
            raise RuntimeError("this RedisBackend already serves an EventBus")
        try:
            info = await self._stream_info()
        except self._errors as exc:
            raise ServiceUnavailableError("Redis is unreachable for events") from exc
        self._last_id = _text(info.get("last-generated-id", b"0-0")) if info else "0-0"
        self._deliver = deliver
        self._max_bytes = max_message_bytes
        self._listener = asyncio.create_task(self._listen(), name="ctxvars_mw.events.redis")

    async def stop(self) -> None:
        """Stop reading; close the connections this backend opened."""
        self._deliver = None
        task, self._listener = self._listener, None
        if task is not None:
            task.cancel()
            _, pending = await asyncio.wait([task], timeout=0.1)
            if pending and self._owns_clients:
                # A read redis-py does not give up on cancellation ends with its connection.
                await self._reader.connection_pool.disconnect()
            _, stuck = await asyncio.wait([task], timeout=_STOP_GRACE)
            if stuck:
                logger.warning("the Redis event reader did not stop in time")
        self._wanted.clear()
        if self._owns_clients:
            await self._client.aclose()
            await self._reader.aclose()

    async def _stream_info(self) -> dict[str, Any] | None:
        from redis.exceptions import ResponseError

        try:
            info: dict[str, Any] = await self._client.xinfo_stream(self._stream)
        except ResponseError:  # no such key: nothing was published in the window
            return None
        return info

    # -- publish / subscribe -----------------------------------------------------------------

    async def publish(
        self, user_id: str, data: bytes, idempotency_key: str | None = None
    ) -> tuple[str, int | None]:
        """Store the envelope in the stream (at most once per key); return its id."""
        if self._deliver is None:
            raise RuntimeError("the EventBus is not started")
        tag = self._tag(user_id)
        key = idempotency_key if idempotency_key is not None else secrets.token_urlsafe(12)
        keys = [self._stream, f"{self._stream}:k:{tag.decode('ascii')}:{key}", self._generation]
        args = [tag, data, self._max_events, self._window_ms]
        for delay in (*_PUBLISH_RETRY_DELAYS, None):
            try:
                event_id = await self._publish(keys=keys, args=args)
            except self._errors as exc:
                if delay is None:
                    raise ServiceUnavailableError("Redis is unreachable for events") from exc
                await asyncio.sleep(delay)
                continue
            return _text(event_id), None
        raise AssertionError("unreachable")  # pragma: no cover

    async def subscribe(self, user_id: str) -> None:
        """Read ``user_id``'s entries on this process from now on (no round trip)."""
        self._wanted.add(self._tag(user_id))

    def unsubscribe(self, user_id: str) -> None:
        """Skip ``user_id``'s entries on this process again."""
        self._wanted.discard(self._tag(user_id))

    # -- replay --------------------------------------------------------------------------------

    async def history(
        self, user_id: str, after: str, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """``user_id``'s entries after ``after`` still in the stream, and whether that is all."""
        since = parse_event_id(after)
        tag = self._tag(user_id)
        found: deque[dict[str, Any]] = deque(maxlen=limit)
        overflow = False
        start = "(" + after
        try:
            info = await self._stream_info()
            while info is not None:
                entries = await self._client.xrange(self._stream, min=start, max="+", count=_PAGE)
                for entry_id, fields in entries:
                    message = self._accept(entry_id, fields, tag, user_id)
                    if message is not None:
                        overflow = overflow or len(found) == limit
                        found.append(message)
                if len(entries) < _PAGE:
                    break
                start = "(" + _text(entries[-1][0])
            first = await self._client.get(self._generation)
        except self._errors as exc:
            raise ServiceUnavailableError("Redis is unreachable for events") from exc
        complete = (
            info is not None
            and not overflow
            and first is not None
            and since >= parse_event_id(_text(first))
            and _kept_since(info, since)
        )
        return list(found), complete

    # -- reading -------------------------------------------------------------------------------

    async def _listen(self) -> None:
        # Loops until stop() clears _deliver, not only until cancelled: a cancellation that a
        # library turns into another exception on its way out must not keep the task alive.
        delay, cap = self._backoff
        down = False
        while self._deliver is not None:
            try:
                reply = await self._reader.xread(
                    {self._stream: self._last_id}, count=_PAGE, block=self._block_ms
                )
            except Exception as exc:  # connection errors, and anything else: never stop reading
                if self._deliver is None:
                    return
                if not down:
                    down = True
                    self.outage_count += 1
                    logger.warning(
                        "lost the Redis connection for events (%s); reading on with backoff",
                        type(exc).__name__,
                    )
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter
                delay = min(delay * 2, cap)
                continue
            if down:
                down, delay = False, self._backoff[0]
                logger.debug("the Redis event reader is back; reading on from the last id")
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self._last_id = _text(entry_id)
                    self._on_entry(entry_id, fields)

    def _on_entry(self, entry_id: bytes | str, fields: dict[bytes, bytes]) -> None:
        tag = fields.get(b"u")
        if tag is None or tag not in self._wanted:
            return
        message = self._accept(entry_id, fields, tag, None)
        deliver = self._deliver
        if message is not None and deliver is not None:
            deliver(message)

    def _accept(
        self,
        entry_id: bytes | str,
        fields: dict[bytes, bytes],
        tag: bytes,
        user_id: str | None,
    ) -> dict[str, Any] | None:
        """The validated message of an entry tagged ``tag``; None (and counted) otherwise."""
        if fields.get(b"u") != tag:
            return None
        data = fields.get(b"d", b"")
        try:
            message = decode(data, self._max_bytes)
        except MalformedMessageError as exc:
            self.rejected_count += 1
            logger.warning("rejected an event entry (%s, %d bytes)", exc, len(data))
            return None
        owner = message["user_id"]
        if self._tag(owner) != tag or (user_id is not None and owner != user_id):
            self.rejected_count += 1
            logger.warning("rejected an event entry whose user does not own its tag")
            return None
        message["id"] = _text(entry_id)
        return message


def _kept_since(info: dict[str, Any], since: tuple[int, int]) -> bool:
    """Whether no entry after ``since`` was trimmed or deleted from the stream ``info`` describes.

    Trimming drops the oldest entries, so the entry ``since`` itself still being there (the
    first entry is not newer) proves nothing after it went; so does an empty stream that never
    went past ``since``. Redis 7.0 updates ``max-deleted-entry-id`` on XDEL only.
    """
    if since < parse_event_id(_text(info.get("max-deleted-entry-id") or b"0-0")):
        return False
    first = info.get("first-entry")
    if first:
        return parse_event_id(_text(first[0])) <= since
    return since >= parse_event_id(_text(info.get("last-generated-id") or b"0-0"))


_STOP_GRACE = 5.0  # seconds stop() waits for the cancelled reader before giving up on it


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
