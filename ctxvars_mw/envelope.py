"""A signed envelope that carries a context across a queue or service boundary.

``dumps(ctx, secret)`` signs ``ctx.to_dict()`` as a JWT with PyJWT (HS256, header
``typ: "ctxvars+jwt"``, ``iat`` and ``exp`` claims); ``loads(token, secret)`` verifies it and
rebuilds an equal context. No cryptography is done here: PyJWT signs and verifies.

* The secret must be at least 32 bytes (:class:`ConfigurationError` otherwise). ``loads``
  also takes a sequence of secrets, newest first, to rotate without dropping queued work.
* A tampered, wrong-secret, wrong-``typ`` or malformed envelope raises
  :class:`InvalidTokenError`; an expired one raises :class:`ExpiredTokenError`. Messages never
  contain the envelope or the secret.
* ``db_session`` is never included (``to_dict`` leaves it out); anonymous contexts round-trip.
  The envelope is signed, not encrypted: do not put secrets in the context's metadata.
* The request's metadata (``client_ip``, ``user_agent``, ``method``, ``path``) crosses with
  the rest of the context: work done for a request elsewhere (a Celery task) is still
  attributed to the client and the endpoint that asked for it, and its audit records say so.
  Drop it first, ``dumps(ctx.replace(client_ip=None), secret)``, where the queue must not
  hold a client's address.
* **One-time envelopes.** Every envelope carries a random ``jti``. ``loads(...,
  replay_store=store)`` claims that id in ``store`` and refuses a second use with
  :class:`InvalidTokenError`; the id is kept for the envelope's remaining lifetime (``exp`` plus
  the leeway), after which the envelope is refused as expired anyway. Use
  :class:`InMemoryReplayStore` in one process and :class:`RedisReplayStore` (``SET NX`` with that
  lifetime as the expiry) when several processes verify envelopes. The id is claimed only after
  the signature, the expiry and the context itself were checked, so a forged or broken envelope
  never uses up an id.
"""

from __future__ import annotations

import heapq
import math
import re
import secrets
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

import jwt

from .context import UserExecutionContext
from .errors import (
    ConfigurationError,
    ExpiredTokenError,
    InvalidContextError,
    InvalidTokenError,
    ServiceUnavailableError,
)

__all__ = [
    "DEFAULT_LEEWAY",
    "ENVELOPE_TYP",
    "MAX_ENVELOPE_BYTES",
    "MIN_SECRET_BYTES",
    "InMemoryReplayStore",
    "RedisReplayStore",
    "ReplayStore",
    "dumps",
    "loads",
]

#: The JOSE ``typ`` header of an envelope; a JWT of any other type is refused.
ENVELOPE_TYP = "ctxvars+jwt"
#: Secrets shorter than this are refused (HS256 wants a key at least as long as its hash).
MIN_SECRET_BYTES = 32
#: Envelopes longer than this are refused before any parsing.
MAX_ENVELOPE_BYTES = 64 * 1024
#: Seconds of clock skew :func:`loads` tolerates past ``exp`` unless told otherwise.
DEFAULT_LEEWAY = 5.0
_ALGORITHMS = ["HS256"]
_JTI = re.compile(r"[A-Za-z0-9_-]{16,64}")
_OPTIONS: Any = {"require": ["exp", "iat"]}

Secret = str | bytes


def _key(secret: object) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes):
        raise ConfigurationError("the envelope secret must be str or bytes")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigurationError(f"the envelope secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def _keys(secret: Secret | Sequence[Secret]) -> list[bytes]:
    if isinstance(secret, (str, bytes)):
        return [_key(secret)]
    if isinstance(secret, Sequence) and secret:
        return [_key(s) for s in secret]
    raise ConfigurationError("loads() takes a secret or a non-empty sequence of secrets")


def _seconds(expires_in: float | timedelta) -> int:
    if isinstance(expires_in, timedelta):
        expires_in = expires_in.total_seconds()
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
        raise ConfigurationError("expires_in must be a number of seconds or a timedelta")
    if not math.isfinite(expires_in) or expires_in <= 0:
        raise ConfigurationError("expires_in must be positive")
    return math.ceil(expires_in)


def dumps(ctx: UserExecutionContext, secret: Secret, *, expires_in: float | timedelta = 60) -> str:
    """Sign ``ctx`` into a compact envelope that :func:`loads` accepts for ``expires_in`` s."""
    if not isinstance(ctx, UserExecutionContext):
        raise TypeError("dumps() takes a UserExecutionContext")
    key = _key(secret)
    now = int(time.time())
    payload = {
        "ctx": ctx.to_dict(),
        "iat": now,
        "exp": now + _seconds(expires_in),
        "jti": secrets.token_urlsafe(16),
    }
    return jwt.encode(payload, key, algorithm="HS256", headers={"typ": ENVELOPE_TYP})


def loads(
    token: str | bytes,
    secret: Secret | Sequence[Secret],
    *,
    leeway: float | timedelta = DEFAULT_LEEWAY,
    replay_store: ReplayStore | None = None,
) -> UserExecutionContext:
    """Verify an envelope made by :func:`dumps` and return its context.

    ``leeway`` (seconds, default :data:`DEFAULT_LEEWAY`) absorbs clock skew between the signing
    and the verifying host. With ``replay_store``, the envelope is accepted once: a second
    ``loads`` of the same envelope through a store that saw it raises :class:`InvalidTokenError`.
    """
    keys = _keys(secret)
    skew = leeway_seconds(leeway)
    if replay_store is not None and not isinstance(replay_store, ReplayStore):
        raise ConfigurationError("replay_store must have a claim(jti, ttl) method")
    if isinstance(token, bytes):
        token = token.decode("ascii", errors="replace")
    if not isinstance(token, str) or not token or len(token) > MAX_ENVELOPE_BYTES:
        raise InvalidTokenError("The context envelope is malformed.")
    decoded = _verify(token, keys, skew)
    if decoded["header"].get("typ") != ENVELOPE_TYP:
        raise InvalidTokenError("The token is not a context envelope.")
    payload = decoded["payload"]
    data = payload.get("ctx")
    if not isinstance(data, dict):
        raise InvalidTokenError("The context envelope carries no context.")
    try:
        ctx = UserExecutionContext.from_dict(data)
    except (InvalidContextError, TypeError, ValueError) as exc:
        raise InvalidTokenError("The context in the envelope is not valid here.") from exc
    if replay_store is not None:
        _claim_once(replay_store, payload, skew)
    return ctx


def leeway_seconds(leeway: object) -> float:
    """``leeway`` as seconds: a finite number ≥ 0 or a timedelta; ConfigurationError otherwise."""
    if isinstance(leeway, timedelta):
        leeway = leeway.total_seconds()
    if isinstance(leeway, bool) or not isinstance(leeway, (int, float)):
        raise ConfigurationError("leeway must be a number of seconds or a timedelta")
    if not math.isfinite(leeway) or leeway < 0:
        raise ConfigurationError("leeway must be zero or more seconds")
    return float(leeway)


def _claim_once(store: ReplayStore, payload: dict[str, Any], leeway: float) -> None:
    jti = payload.get("jti")
    if type(jti) is not str or not _JTI.fullmatch(jti):
        raise InvalidTokenError("The context envelope has no valid id; it cannot be used once.")
    ttl = max(payload["exp"] + leeway - time.time(), 0.001)
    if not store.claim(jti, ttl):
        raise InvalidTokenError("The context envelope was already used.")


def _verify(token: str, keys: list[bytes], leeway: float) -> dict[str, Any]:
    last = len(keys) - 1
    for index, key in enumerate(keys):
        try:
            return jwt.decode_complete(
                token, key, algorithms=_ALGORITHMS, options=_OPTIONS, leeway=leeway
            )
        except jwt.InvalidSignatureError as exc:
            if index == last:
                raise InvalidTokenError("The context envelope's signature is invalid.") from exc
        except jwt.ExpiredSignatureError as exc:
            raise ExpiredTokenError("The context envelope has expired.") from exc
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as exc:
            raise InvalidTokenError("The context envelope is malformed.") from exc
    raise InvalidTokenError("The context envelope's signature is invalid.")  # pragma: no cover


# -- replay stores ----------------------------------------------------------------------------


@runtime_checkable
class ReplayStore(Protocol):
    """Remembers envelope ids: :meth:`claim` is True the first time an id is seen, else False."""

    def claim(self, jti: str, ttl: float) -> bool:
        """Record ``jti`` for ``ttl`` seconds; True if it was not recorded already."""
        ...  # pragma: no cover


class InMemoryReplayStore:
    """A :class:`ReplayStore` for one process (thread-safe); ids are forgotten once expired.

    Memory is bounded by how many envelopes are verified within their lifetime; expired ids are
    dropped as new ones are claimed.
    """

    def __init__(self, *, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def claim(self, jti: str, ttl: float) -> bool:
        """Record ``jti`` for ``ttl`` seconds; True if it was not live already."""
        now = self._clock()
        with self._lock:
            self._forget_expired(now)
            if jti in self._expiry:
                return False
            expires = now + ttl
            self._expiry[jti] = expires
            heapq.heappush(self._heap, (expires, jti))
            return True

    def __len__(self) -> int:
        """How many ids are remembered (expired ones included until the next claim)."""
        return len(self._expiry)

    def _forget_expired(self, now: float) -> None:
        heap, expiry = self._heap, self._expiry
        while heap and heap[0][0] <= now:
            _, jti = heapq.heappop(heap)
            expiry.pop(jti, None)


class RedisReplayStore:
    """A :class:`ReplayStore` in Redis, shared by every process that verifies envelopes.

    One ``SET prefix+jti 1 NX PX <ttl>`` per claim: atomic, so two workers handed the same
    envelope at once cannot both win, and Redis drops the id when the envelope expires.
    ``url_or_client`` is a ``redis://`` URL or a synchronous ``redis.Redis`` client (used as is,
    not closed by :meth:`close`). A Redis failure raises
    :class:`~ctxvars_mw.ServiceUnavailableError`: the envelope is not accepted (fail closed).
    The claim is a blocking round trip, as :func:`loads` is synchronous: in async code, call
    ``loads`` through :func:`ctxvars_mw.run_in_thread`.
    """

    def __init__(
        self, url_or_client: Any, *, prefix: str = "ctxvars:envelope:", timeout: float = 2.0
    ) -> None:
        import redis

        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError("RedisReplayStore prefix must be a non-empty str")
        self._prefix = prefix
        self._owned = isinstance(url_or_client, str)
        if isinstance(url_or_client, str):
            self._redis = redis.Redis.from_url(
                url_or_client, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        elif isinstance(url_or_client, redis.Redis):
            self._redis = url_or_client
        else:
            raise ConfigurationError("RedisReplayStore takes a redis:// URL or a redis.Redis")
        self._errors = (redis.RedisError, OSError)

    def claim(self, jti: str, ttl: float) -> bool:
        """``SET NX`` the id with a ``ttl`` expiry; True if this call set it."""
        try:
            done = self._redis.set(
                self._prefix + jti, b"1", nx=True, px=max(math.ceil(ttl * 1000), 1)
            )
        except self._errors as exc:
            raise ServiceUnavailableError("The envelope replay store is unavailable.") from exc
        return bool(done)

    def close(self) -> None:
        """Close the client this store created (a client passed in is left open)."""
        if self._owned:
            self._redis.close()
