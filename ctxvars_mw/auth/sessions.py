"""Server-side sessions: the :class:`SessionStore` protocol and the in-process store.

A session is *active* while it is neither revoked, nor idle for longer than
``idle_timeout``, nor older than ``absolute_timeout`` (however often it is touched).

Both stores also report revocations as they happen, for connections that outlive the request
that opened them (an :class:`~ctxvars_mw.events.EventBus` with ``session_store=`` closes the
revoked sessions' websockets): ``await store.watch_revocations(callback)`` runs until cancelled
and calls ``callback`` with a :class:`Revocation` for every ``revoke``/``revoke_user`` — in
every process, for :class:`~ctxvars_mw.auth.redis_sessions.RedisSessionStore` — and with None
when it starts listening and whenever some may have been missed (after a lost connection),
so that the caller checks its sessions again. Revocations name sessions by
:func:`session_digest`, never by their id.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigurationError
from ..frozen import freeze_mapping

__all__ = [
    "InMemorySessionStore",
    "Revocation",
    "RevocationCallback",
    "Session",
    "SessionStore",
    "new_session_id",
    "seconds",
    "session_digest",
]

DEFAULT_IDLE_TIMEOUT = 30 * 60.0
DEFAULT_ABSOLUTE_TIMEOUT = 8 * 60 * 60.0


@dataclass(frozen=True, slots=True)
class Session:
    """An active session: its id, its user, when it began and was last seen, and its data."""

    id: str
    user_id: str
    created_at: datetime
    last_seen_at: datetime
    data: Mapping[str, Any]

    @property
    def age_seconds(self) -> float:
        """Seconds since the session was created."""
        return (datetime.now(UTC) - self.created_at).total_seconds()


@runtime_checkable
class SessionStore(Protocol):
    """Where sessions live; every method is a coroutine."""

    async def create(self, user_id: str, **data: Any) -> Session:
        """Start a session for ``user_id``."""
        ...

    async def get(self, session_id: str) -> Session | None:
        """The session if it is active, else None."""
        ...

    async def touch(self, session_id: str) -> Session | None:
        """Mark the session as seen now; return it if it is (still) active, else None."""
        ...

    async def revoke(self, session_id: str) -> None:
        """End one session."""
        ...

    async def revoke_user(self, user_id: str) -> int:
        """End every session of ``user_id``; return how many there were."""
        ...


def session_digest(session_id: str) -> str:
    """A session's name in revocation notices: its SHA-256, 32 hex digits (not the secret id)."""
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Revocation:
    """Sessions that were just ended: by digest (:func:`session_digest`), and — after
    ``revoke_user`` — every session of ``user_id``."""

    session_digests: frozenset[str] = frozenset()
    user_id: str | None = None

    def covers(self, session_id: str | None, user_id: str) -> bool:
        """Whether a connection of ``user_id`` on session ``session_id`` lost its session."""
        if session_id is None:
            return False
        return user_id == self.user_id or session_digest(session_id) in self.session_digests


#: Called with each :class:`Revocation`, or with None when some may have been missed.
RevocationCallback = Callable[[Revocation | None], None]


def seconds(name: str, value: float | timedelta) -> float:
    """A timeout given as seconds or a timedelta, as positive seconds."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds or a timedelta")
    return float(value)


def new_session_id() -> str:
    """An unguessable session id (256 bits from the OS)."""
    return secrets.token_urlsafe(32)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class _Record:
    __slots__ = ("created", "data", "id", "last_seen", "user_id")

    def __init__(self, sid: str, user_id: str, created: float, data: Mapping[str, Any]) -> None:
        self.id = sid
        self.user_id = user_id
        self.created = created
        self.last_seen = created
        self.data = data

    def session(self) -> Session:
        return Session(self.id, self.user_id, _dt(self.created), _dt(self.last_seen), self.data)


class InMemorySessionStore:
    """Sessions in this process's memory: the default, for a single process.

    ``clock`` returns the current time in seconds (``time.time`` by default).
    """

    def __init__(
        self,
        *,
        idle_timeout: float | timedelta = DEFAULT_IDLE_TIMEOUT,
        absolute_timeout: float | timedelta = DEFAULT_ABSOLUTE_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.idle_timeout = seconds("idle_timeout", idle_timeout)
        self.absolute_timeout = seconds("absolute_timeout", absolute_timeout)
        self._clock = clock
        self._sessions: dict[str, _Record] = {}
        self._by_user: dict[str, set[str]] = {}
        self._watchers: list[RevocationCallback] = []

    def _active(self, sid: str, now: float) -> _Record | None:
        record = self._sessions.get(sid)
        if record is None:
            return None
        if (
            now - record.last_seen > self.idle_timeout
            or now - record.created > self.absolute_timeout
        ):
            self._drop(record)
            return None
        return record

    def _drop(self, record: _Record) -> None:
        self._sessions.pop(record.id, None)
        ids = self._by_user.get(record.user_id)
        if ids is not None:
            ids.discard(record.id)
            if not ids:
                del self._by_user[record.user_id]

    async def create(self, user_id: str, **data: Any) -> Session:
        """Start a session for ``user_id`` carrying ``data`` (JSON-like values)."""
        if not isinstance(user_id, str) or not user_id:
            raise ValueError("user_id must be a non-empty string")
        record = _Record(new_session_id(), user_id, self._clock(), freeze_mapping(data))
        self._sessions[record.id] = record
        self._by_user.setdefault(user_id, set()).add(record.id)
        return record.session()

    async def get(self, session_id: str) -> Session | None:
        """The session if it is active, else None."""
        record = self._active(session_id, self._clock())
        return None if record is None else record.session()

    async def touch(self, session_id: str) -> Session | None:
        """Mark the session as seen now; return it if still active."""
        now = self._clock()
        record = self._active(session_id, now)
        if record is None:
            return None
        record.last_seen = now
        return record.session()

    async def revoke(self, session_id: str) -> None:
        """End one session (a no-op for an unknown id)."""
        record = self._sessions.get(session_id)
        if record is not None:
            self._drop(record)
        self._notify(Revocation(frozenset({session_digest(session_id)})))

    async def revoke_user(self, user_id: str) -> int:
        """End every session of ``user_id``."""
        ids = self._by_user.pop(user_id, set())
        for sid in ids:
            self._sessions.pop(sid, None)
        self._notify(Revocation(frozenset(map(session_digest, ids)), user_id))
        return len(ids)

    async def watch_revocations(self, callback: RevocationCallback) -> None:
        """Call ``callback`` with each revocation made through this store, until cancelled
        (first with None: revocations made before it started are not reported)."""
        self._watchers.append(callback)
        callback(None)
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._watchers.remove(callback)

    def _notify(self, revocation: Revocation) -> None:
        for callback in list(self._watchers):
            callback(revocation)

    def __len__(self) -> int:
        return len(self._sessions)
