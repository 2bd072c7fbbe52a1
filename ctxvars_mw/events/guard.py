"""Closing websockets whose credentials ended: revocation, session expiry, token expiry.

A websocket is authenticated once, at the handshake; the :class:`EventBus` keeps checking for
as long as it is registered with ``bus.connect()``, and closes it with a code that names the
reason:

============  ========================================================================
close code    reason
============  ========================================================================
4001          the session was revoked (``revoke()`` / ``revoke_user()``, in any process)
4002          the session expired (idle or absolute timeout)
4003          the token expired (its ``exp`` claim, ``ctx.claims["exp"]``)
============  ========================================================================

* **Token expiry** needs nothing: a timer fires at ``exp``.
* **Sessions** need ``EventBus(session_store=store)``. The bus runs
  ``store.watch_revocations()``: a revocation (a Redis pub/sub notice for
  :class:`~ctxvars_mw.auth.redis_sessions.RedisSessionStore`, so every process hears it within
  milliseconds) closes the session's sockets at once. A timer at the session's deadline
  (``min(created + absolute_timeout, last_seen + idle_timeout)``) checks it again with
  ``store.get()``: gone → 4002, still active (HTTP requests touched it) → check again at the
  new deadline. After the watcher lost its connection, every open session is checked again,
  since notices sent meanwhile are lost. A store that cannot be reached keeps sockets open and
  is asked again after ``recheck_interval`` seconds.

A closed socket is unregistered first and its queue discarded, so it receives nothing more.
Traffic on the websocket itself does not touch the session: an endpoint that wants a busy
socket to keep its session alive calls ``store.touch(ctx.session_id)`` on client messages.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..auth.sessions import Revocation, session_digest
from .connection import Subscription

__all__ = ["CLOSE_REVOKED", "CLOSE_SESSION_EXPIRED", "CLOSE_TOKEN_EXPIRED", "SessionGuard"]

logger = logging.getLogger("ctxvars_mw.events")

#: Close code: the connection's session was revoked.
CLOSE_REVOKED = 4001
#: Close code: the connection's session expired (idle or absolute timeout).
CLOSE_SESSION_EXPIRED = 4002
#: Close code: the connection's token expired (``exp``).
CLOSE_TOKEN_EXPIRED = 4003

_REASONS = {
    CLOSE_REVOKED: "session revoked",
    CLOSE_SESSION_EXPIRED: "session expired",
    CLOSE_TOKEN_EXPIRED: "token expired",
}
_EPSILON = 0.05  # seconds past a session deadline before checking it (the store's own clock)


class _Watch:
    """The timers of one guarded connection, and its session's last known deadline."""

    __slots__ = ("deadline", "session_timer", "token_timer")

    def __init__(self) -> None:
        self.token_timer: asyncio.TimerHandle | None = None
        self.session_timer: asyncio.TimerHandle | None = None
        self.deadline = math.inf

    def cancel(self) -> None:
        for timer in (self.token_timer, self.session_timer):
            if timer is not None:
                timer.cancel()


class SessionGuard:
    """Watches the credentials of a bus's registered connections and closes ended ones."""

    def __init__(
        self,
        store: Any,
        recheck_interval: float,
        connections: Callable[[], list[Subscription]],
    ) -> None:
        self._store = store
        self._recheck = recheck_interval
        self._connections = connections
        self._watches: dict[Subscription, _Watch] = {}
        self._by_digest: dict[str, set[Subscription]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start watching revocations (when the store reports them)."""
        watch = getattr(self._store, "watch_revocations", None)
        if callable(watch):
            self._watcher = asyncio.create_task(
                watch(self._on_revocation), name="ctxvars_mw.events.revocations"
            )

    async def stop(self) -> None:
        """Stop watching; cancel every timer and pending check."""
        tasks = [t for t in (self._watcher, *self._tasks) if t is not None]
        self._watcher = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for sub in list(self._watches):
            self.release(sub)

    async def admit(self, sub: Subscription) -> None:
        """Start guarding ``sub``: its token's expiry, and its session when there is one."""
        watch = self._watches[sub] = _Watch()
        if sub.expires_at is not None:
            delay = max(sub.expires_at - time.time(), 0.0)
            loop = asyncio.get_running_loop()
            watch.token_timer = loop.call_later(delay, self._close, sub, CLOSE_TOKEN_EXPIRED)
        if self._store is not None and sub.session_id is not None:
            self._by_digest.setdefault(session_digest(sub.session_id), set()).add(sub)
            await self._check(sub)

    def release(self, sub: Subscription) -> None:
        """Stop guarding ``sub`` (it was unregistered)."""
        watch = self._watches.pop(sub, None)
        if watch is not None:
            watch.cancel()
        if sub.session_id is not None:
            digest = session_digest(sub.session_id)
            subs = self._by_digest.get(digest)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_digest[digest]

    # -- checks --------------------------------------------------------------------------------

    def _close(self, sub: Subscription, code: int) -> None:
        if sub.active:
            self._spawn(sub.shut(code, _REASONS[code]))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, sub: Subscription) -> None:
        """Ask the store about ``sub``'s session; close it if gone (4002 past its deadline,
        4001 before it), else check again at its deadline."""
        if not sub.active or sub.session_id is None:
            return
        try:
            session = await self._store.get(sub.session_id)
        except Exception as exc:
            logger.warning("could not check a websocket's session (%s)", type(exc).__name__)
            self._check_in(sub, self._recheck)
            return
        watch = self._watches.get(sub)
        if watch is None:
            return
        if session is None or session.user_id != sub.user_id:
            expired = time.time() >= watch.deadline
            self._close(sub, CLOSE_SESSION_EXPIRED if expired else CLOSE_REVOKED)
            return
        idle = getattr(self._store, "idle_timeout", math.inf)
        absolute = getattr(self._store, "absolute_timeout", math.inf)
        watch.deadline = min(
            session.created_at.timestamp() + absolute,
            session.last_seen_at.timestamp() + idle,
        )
        delay = max(watch.deadline - time.time(), 0.0) + _EPSILON
        self._check_in(sub, min(delay, self._recheck))

    def _check_in(self, sub: Subscription, delay: float) -> None:
        watch = self._watches.get(sub)
        if watch is None:
            return
        if watch.session_timer is not None:
            watch.session_timer.cancel()
        loop = asyncio.get_running_loop()
        watch.session_timer = loop.call_later(delay, self._spawn_check, sub)

    def _spawn_check(self, sub: Subscription) -> None:
        self._spawn(self._check(sub))

    def _on_revocation(self, revocation: Revocation | None) -> None:
        """Close the revoked sessions' sockets; on None (notices lost) check every session."""
        if revocation is None:
            for sub in self._connections():
                if sub.session_id is not None:
                    self._spawn(self._check(sub))
            return
        targets: set[Subscription] = set()
        for digest in revocation.session_digests:
            targets |= self._by_digest.get(digest, set())
        if revocation.user_id is not None:
            targets |= {
                sub
                for sub in self._connections()
                if sub.user_id == revocation.user_id and sub.session_id is not None
            }
        for sub in targets:
            self._close(sub, CLOSE_REVOKED)
