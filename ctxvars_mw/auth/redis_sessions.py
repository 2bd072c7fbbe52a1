"""RedisSessionStore: sessions shared by every process that uses the same Redis.

Layout under ``prefix``: ``s:<id>`` is a hash (``user_id``, ``created``, ``last_seen``,
``data`` as JSON) whose key TTL is ``min(idle_timeout, absolute time left)``, and ``u:<user>``
is the set of that user's session ids (for :meth:`~RedisSessionStore.revoke_user`).
:meth:`~RedisSessionStore.touch` is one Lua script — check both timeouts, update
``last_seen``, reset the TTL — so a session is checked in a single atomic round trip, and
the absolute timeout holds however often the session is touched. Revocation deletes the
key, so every process sees it at once, and publishes a notice on ``<prefix>revocations`` in
the same transaction (``{"s": [digests], "u": user id or null}``), which
:meth:`~RedisSessionStore.watch_revocations` turns into callbacks in every process — that is
how open websockets learn of it. Any Redis failure surfaces as
:class:`~ctxvars_mw.ServiceUnavailableError` (the middleware answers 503, fail closed).

redis-py is imported when a store is constructed, never when ``ctxvars_mw`` is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from .._redis import redis_client, redis_errors
from ..errors import ConfigurationError, ServiceUnavailableError
from ..frozen import freeze_mapping, thaw
from .sessions import (
    DEFAULT_ABSOLUTE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    Revocation,
    RevocationCallback,
    Session,
    new_session_id,
    seconds,
    session_digest,
)

__all__ = ["RedisSessionStore"]

logger = logging.getLogger("ctxvars_mw.sessions")

# KEYS[1] session hash; ARGV: now, idle timeout, absolute timeout (seconds, as strings).
_TOUCH = """
local v = redis.call('HMGET', KEYS[1], 'user_id', 'created', 'last_seen', 'data')
if not v[1] then return false end
local now, idle, absolute = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local age = now - tonumber(v[2])
if age >= absolute or now - tonumber(v[3]) >= idle then
  redis.call('DEL', KEYS[1])
  return false
end
redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(math.min(idle, absolute - age) * 1000))
return {v[1], v[2], ARGV[1], v[4]}
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError("The session store is unavailable.")


class RedisSessionStore:
    """A :class:`~ctxvars_mw.SessionStore` in Redis (redis-py asyncio), for many processes.

    ``url_or_client`` is a ``redis://`` URL (a client is created with ``timeout`` seconds
    for connecting and for each command, and one immediate retry on a connection error, so
    a pooled connection that died with a Redis restart is reconnected rather than failing a
    request) or a ``redis.asyncio.Redis`` client (used as is, not closed by :meth:`aclose`).
    ``clock`` returns the current Unix time (tests).
    """

    def __init__(
        self,
        url_or_client: Any,
        *,
        idle_timeout: float | timedelta = DEFAULT_IDLE_TIMEOUT,
        absolute_timeout: float | timedelta = DEFAULT_ABSOLUTE_TIMEOUT,
        prefix: str = "ctxvars:session:",
        timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.idle_timeout = seconds("idle_timeout", idle_timeout)
        self.absolute_timeout = seconds("absolute_timeout", absolute_timeout)
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError("prefix must be a non-empty string")
        self.prefix = prefix
        self._redis, self._owns_client = redis_client(url_or_client, timeout=timeout)
        self._errors = redis_errors()
        self._listen_errors: tuple[type[Exception], ...] = (*self._errors, ConnectionError)
        self._touch = self._redis.register_script(_TOUCH)
        self._clock = clock

    @property
    def revocation_channel(self) -> str:
        """The Redis channel revocation notices are published on."""
        return f"{self.prefix}revocations"

    def _notice(self, digests: list[str], user_id: str | None) -> str:
        return json.dumps({"s": digests, "u": user_id}, separators=(",", ":"))

    def _session_key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _user_key(self, user_id: str) -> str:
        return f"{self.prefix}u:{user_id}"

    def _ttl_ms(self, now: float, created: float) -> int:
        left = min(self.idle_timeout, self.absolute_timeout - (now - created))
        return max(1, math.ceil(left * 1000))

    async def create(self, user_id: str, **data: Any) -> Session:
        """Start a session for ``user_id`` carrying ``data`` (JSON-like values)."""
        if not isinstance(user_id, str) or not user_id:
            raise ValueError("user_id must be a non-empty string")
        frozen = freeze_mapping(data)
        sid, now = new_session_id(), self._clock()
        fields = {
            "user_id": user_id,
            "created": repr(now),
            "last_seen": repr(now),
            "data": json.dumps(thaw(frozen), separators=(",", ":")),
        }
        user_key = self._user_key(user_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._session_key(sid), mapping=fields)
                pipe.pexpire(self._session_key(sid), self._ttl_ms(now, now))
                pipe.sadd(user_key, sid)
                pipe.pexpire(user_key, math.ceil(self.absolute_timeout * 1000))
                await pipe.execute()
        except self._errors as exc:
            raise _unavailable() from exc
        return Session(sid, user_id, _dt(now), _dt(now), frozen)

    async def get(self, session_id: str) -> Session | None:
        """The session if it is active, else None (does not count as activity)."""
        try:
            raw = await self._redis.hmget(
                self._session_key(session_id), ["user_id", "created", "last_seen", "data"]
            )
        except self._errors as exc:
            raise _unavailable() from exc
        if raw[0] is None:
            return None
        now = self._clock()
        created, last_seen = float(raw[1]), float(raw[2])
        if now - created >= self.absolute_timeout or now - last_seen >= self.idle_timeout:
            return None
        return self._session(session_id, raw)

    async def touch(self, session_id: str) -> Session | None:
        """Mark the session as seen now and return it, in one atomic step; None if inactive."""
        try:
            raw = await self._touch(
                keys=[self._session_key(session_id)],
                args=[repr(self._clock()), repr(self.idle_timeout), repr(self.absolute_timeout)],
            )
        except self._errors as exc:
            raise _unavailable() from exc
        return None if not raw else self._session(session_id, raw)

    def _session(self, session_id: str, raw: list[Any]) -> Session:
        user_id, created, last_seen, data = (_text(v) for v in raw)
        return Session(
            session_id,
            user_id,
            _dt(float(created)),
            _dt(float(last_seen)),
            freeze_mapping(json.loads(data)),
        )

    async def revoke(self, session_id: str) -> None:
        """End one session, at once for every process (a no-op for an unknown id)."""
        key = self._session_key(session_id)
        try:
            user_id = await self._redis.hget(key, "user_id")
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if user_id is not None:
                    pipe.srem(self._user_key(_text(user_id)), session_id)
                notice = self._notice([session_digest(session_id)], None)
                pipe.publish(self.revocation_channel, notice)
                await pipe.execute()
        except self._errors as exc:
            raise _unavailable() from exc

    async def revoke_user(self, user_id: str) -> int:
        """End every session of ``user_id``; return how many were active."""
        from redis.exceptions import WatchError

        user_key = self._user_key(user_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(user_key)
                        sids = await pipe.smembers(user_key)
                        pipe.multi()
                        for sid in sids:
                            pipe.delete(self._session_key(_text(sid)))
                        pipe.delete(user_key)
                        digests = [session_digest(_text(sid)) for sid in sids]
                        pipe.publish(self.revocation_channel, self._notice(digests, user_id))
                        results = await pipe.execute()
                        return int(sum(results[:-2]))
                    except WatchError:
                        continue  # a session was created meanwhile: read the set again
        except self._errors as exc:
            raise _unavailable() from exc

    async def watch_revocations(
        self, callback: RevocationCallback, *, keepalive: float = 15.0
    ) -> None:
        """Call ``callback`` with every revocation any process makes, until cancelled.

        Listens on :attr:`revocation_channel`. It calls ``callback(None)`` each time it starts
        listening — first, and again after a lost connection (one warning per outage;
        reconnection with capped exponential backoff) — since notices sent before that are
        not heard: the caller re-checks its sessions. An idle connection is checked with a
        PING every ``keepalive`` seconds.
        """
        delay, outage = _BACKOFF[0], False

        def listening() -> None:
            nonlocal delay, outage
            callback(None)  # notices sent before now (or while disconnected) are not heard
            delay, outage = _BACKOFF[0], False

        while True:
            pubsub = self._redis.pubsub()
            try:
                await self._listen(pubsub, callback, keepalive, listening)
            except self._listen_errors as exc:
                if not outage:
                    outage = True
                    logger.warning(
                        "lost the Redis connection for session revocations (%s); reconnecting",
                        type(exc).__name__,
                    )
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter
                delay = min(delay * 2, _BACKOFF[1])
            finally:
                with contextlib.suppress(*self._errors):
                    await pubsub.aclose()

    async def _listen(
        self,
        pubsub: Any,
        callback: RevocationCallback,
        keepalive: float,
        listening: Callable[[], None],
    ) -> None:
        await pubsub.subscribe(self.revocation_channel)
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=keepalive)
            if message is None:
                if pinged:
                    raise ConnectionError("the revocation channel did not answer a PING")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            if message["type"] == "subscribe":
                listening()  # also when redis-py reconnected and resubscribed by itself
            elif message["type"] == "message":
                revocation = _revocation(message["data"])
                if revocation is not None:
                    callback(revocation)

    async def aclose(self) -> None:
        """Close the Redis client this store created (not one passed in)."""
        if self._owns_client:
            await self._redis.aclose()


_BACKOFF = (0.05, 1.0)


def _revocation(data: bytes | str) -> Revocation | None:
    """The notice as a Revocation; None (logged without content) when it is not one."""
    try:
        notice = json.loads(data)
        digests, user_id = notice["s"], notice["u"]
        if not (isinstance(digests, list) and all(isinstance(d, str) for d in digests)):
            raise TypeError
        if user_id is not None and not isinstance(user_id, str):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        logger.warning("ignored a malformed session revocation notice (%d bytes)", len(data))
        return None
    return Revocation(frozenset(digests), user_id)
