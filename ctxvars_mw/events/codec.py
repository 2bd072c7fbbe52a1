"""The wire form of an event: one JSON object, validated on the way out and on the way in.

The object a websocket receives is the one on the wire plus its event ``"id"``::

    {"type": "event", "user_id": ..., "event": {...}, "request_id": ..., "correlation_id": ...,
     "id": "1733212345678-0"}

plus ``"thread_id"`` when the event was published to a thread. ``request_id`` and
``correlation_id`` are the publisher's (``None`` when published outside a request). The id is
given by the backend when the event is stored (``<milliseconds>-<sequence>``, as Redis Streams
number their entries): ids only grow, so a client keeps the last one it saw, reconnects with
it, and drops any message whose id it has already seen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MalformedMessageError",
    "check_idempotency_key",
    "decode",
    "encode",
    "parse_event_id",
]

#: The largest encoded message accepted, in bytes (ids and envelope included).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024

_KEYS = frozenset(("type", "user_id", "event", "request_id", "correlation_id"))
_THREAD_KEYS = _KEYS | {"thread_id"}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_loads = json.loads
_EVENT_ID = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class MalformedMessageError(ValueError):
    """An incoming message is not a well-formed event envelope (never carries its content)."""


def encode(
    user_id: str,
    thread_id: str | None,
    event: Mapping[str, Any],
    request_id: str | None,
    correlation_id: str | None,
    max_bytes: int,
) -> bytes:
    """Encode one event envelope.

    Raises ``TypeError`` when ``event`` is not a mapping or holds something JSON cannot carry,
    and ``ValueError`` when it holds NaN/infinity or a cycle, or encodes to more than
    ``max_bytes``.
    """
    if not isinstance(event, Mapping):
        raise TypeError(f"an event must be a mapping, not {type(event).__name__}")
    if not all(type(key) is str for key in event):
        raise TypeError("an event's keys must be strings")
    envelope: dict[str, Any] = {
        "type": "event",
        "user_id": user_id,
        "event": event if type(event) is dict else dict(event),
        "request_id": request_id,
        "correlation_id": correlation_id,
    }
    if thread_id is not None:
        envelope["thread_id"] = thread_id
    try:
        data = _dumps(envelope).encode("utf-8")
    except RecursionError:
        raise ValueError("the event is nested too deeply to encode") from None
    if len(data) > max_bytes:
        raise ValueError(f"the encoded event is {len(data)} bytes; the limit is {max_bytes}")
    return data


def decode(data: bytes | str, max_bytes: int) -> dict[str, Any]:
    """Decode and validate one envelope; raise :class:`MalformedMessageError` otherwise."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, bytes):
        raise MalformedMessageError("not bytes")
    if len(data) > max_bytes:
        raise MalformedMessageError("oversized")
    try:
        message = _loads(data)
    except (ValueError, RecursionError):
        raise MalformedMessageError("not JSON") from None
    if type(message) is not dict:
        raise MalformedMessageError("not an object")
    keys = message.keys()
    if keys != _KEYS and keys != _THREAD_KEYS:
        raise MalformedMessageError("unexpected keys")
    if (
        message["type"] != "event"
        or not _is_id(message["user_id"])
        or type(message["event"]) is not dict
        or not _is_optional_id(message["request_id"])
        or not _is_optional_id(message["correlation_id"])
        or ("thread_id" in message and not _is_id(message["thread_id"]))
    ):
        raise MalformedMessageError("bad field")
    return message


def _is_id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= 256


def _is_optional_id(value: object) -> bool:
    return value is None or _is_id(value)


def parse_event_id(value: object) -> tuple[int, int]:
    """An event id (``"1733212345678-0"``) as a comparable pair; ``ValueError`` otherwise.

    The error never quotes the value (it may come from a client).
    """
    match = _EVENT_ID.fullmatch(value) if type(value) is str else None
    if match is None:
        raise ValueError("not an event id (expected <milliseconds>-<sequence>)")
    return int(match[1]), int(match[2])


def check_idempotency_key(key: object) -> str:
    """``key`` if it is ``[A-Za-z0-9._:-]{1,128}``; ``ValueError`` (not quoting it) otherwise."""
    if type(key) is not str or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValueError("idempotency_key must match [A-Za-z0-9._:-]{1,128}")
    return key
