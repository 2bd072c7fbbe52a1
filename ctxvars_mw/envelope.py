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
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import jwt

from .context import UserExecutionContext
from .errors import ConfigurationError, ExpiredTokenError, InvalidContextError, InvalidTokenError

__all__ = ["ENVELOPE_TYP", "MAX_ENVELOPE_BYTES", "MIN_SECRET_BYTES", "dumps", "loads"]

#: The JOSE ``typ`` header of an envelope; a JWT of any other type is refused.
ENVELOPE_TYP = "ctxvars+jwt"
#: Secrets shorter than this are refused (HS256 wants a key at least as long as its hash).
MIN_SECRET_BYTES = 32
#: Envelopes longer than this are refused before any parsing.
MAX_ENVELOPE_BYTES = 64 * 1024
_ALGORITHMS = ["HS256"]
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
    payload = {"ctx": ctx.to_dict(), "iat": now, "exp": now + _seconds(expires_in)}
    return jwt.encode(payload, key, algorithm="HS256", headers={"typ": ENVELOPE_TYP})


def loads(
    token: str | bytes, secret: Secret | Sequence[Secret], *, leeway: float = 5.0
) -> UserExecutionContext:
    """Verify an envelope made by :func:`dumps` and return its context.

    ``leeway`` (seconds) absorbs clock skew between the signing and the verifying host.
    """
    keys = _keys(secret)
    if isinstance(token, bytes):
        token = token.decode("ascii", errors="replace")
    if not isinstance(token, str) or not token or len(token) > MAX_ENVELOPE_BYTES:
        raise InvalidTokenError("The context envelope is malformed.")
    decoded = _verify(token, keys, leeway)
    if decoded["header"].get("typ") != ENVELOPE_TYP:
        raise InvalidTokenError("The token is not a context envelope.")
    data = decoded["payload"].get("ctx")
    if not isinstance(data, dict):
        raise InvalidTokenError("The context envelope carries no context.")
    try:
        return UserExecutionContext.from_dict(data)
    except (InvalidContextError, TypeError, ValueError) as exc:
        raise InvalidTokenError("The context in the envelope is not valid here.") from exc


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
