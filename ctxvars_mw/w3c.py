"""W3C Trace Context (``traceparent``, ``tracestate``) and W3C Baggage: strict parsing, safe
formatting. Every trace and baggage rule of the library lives here.

Parsing never raises: an invalid header (or, for baggage, an invalid member) is ignored, so a
bad header can never turn a request into a 500. Raw header values are never logged.

* ``traceparent`` (W3C Trace Context Level 2, §3.2): ``version-trace_id-parent_id-flags``,
  lowercase hex, optional blanks around it; version ``ff`` and all-zero ids are invalid, version
  ``00`` allows no trailing data, a later version may append ``-…`` fields (ignored). Of the
  flags, the two the spec defines travel on — sampled (``01``) and random trace id (``02``);
  the others are sent as zero, as the spec asks.
* ``tracestate`` (§3.3): ``key=value`` members (simple keys ``[a-z][a-z0-9_*/-]{0,255}``,
  multi-tenant keys ``tenant@system``), repeated headers combined in order. A repeated key
  keeps its first member (the spec allows dropping duplicates); an invalid member, or more
  than 32 members, makes the whole header invalid, and it is not forwarded. Over 512
  characters, members longer than 128 characters are dropped first, then members from the end.
  It is only meaningful next to a valid ``traceparent``.
* ``baggage`` (W3C Baggage): ``key=value`` members with optional ``;property`` parts (dropped
  here), values percent-decoded as UTF-8 (invalid UTF-8 becomes U+FFFD). ``+`` is read as a
  space and written as ``%2B``, as OpenTelemetry's propagators do, so values cross between
  them unchanged. Invalid members are skipped; a header longer than 8,192 bytes is ignored;
  at most 64 members are kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote_plus

from ._memo import remember
from .frozen import FrozenMap, freeze_mapping

__all__ = [
    "BAGGAGE_MAX_BYTES",
    "BAGGAGE_MAX_MEMBERS",
    "KNOWN_FLAGS",
    "NO_TRACE",
    "RANDOM_TRACE_ID",
    "SAMPLED",
    "TRACESTATE_MAX_MEMBERS",
    "format_baggage",
    "format_traceparent",
    "incoming_metadata",
    "is_trace_id",
    "parse_baggage",
    "parse_traceparent",
    "parse_tracestate",
    "trace_id_of",
    "trace_of",
]

BAGGAGE_MAX_MEMBERS = 64
BAGGAGE_MAX_BYTES = 8192
TRACESTATE_MAX_MEMBERS = 32
#: The trace flags of Trace Context Level 2: the caller may have recorded the trace; the
#: trace id's rightmost 7 bytes are random. Only these are propagated.
SAMPLED = 0x01
RANDOM_TRACE_ID = 0x02
KNOWN_FLAGS = SAMPLED | RANDOM_TRACE_ID
#: ``trace_of()`` of a request without a valid ``traceparent``: no trace id, no flags.
NO_TRACE: tuple[None, int] = (None, 0)

# RFC 7230 token: the baggage key.
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAGGAGE_VALUE_RE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
_BAGGAGE_MEMBER_RE = re.compile(r"([^=;\s]+)[ \t]*=[ \t]*([^;]*?)[ \t]*(?:;.*)?")
# Every baggage-octet but "%", which must itself be encoded, and "+", which OpenTelemetry (and
# so this module) reads as a space.
_BAGGAGE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\%+')
_needs_no_quoting = re.compile(r"[\x21\x23\x24\x26-\x2a\x2d-\x3a\x3c-\x5b\x5d-\x7e]*").fullmatch

_TS_KEY_RE = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}"
    r"|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
)
_TS_VALUE_RE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_TS_MAX_BYTES = 8192
# The combined length every vendor should forward, and the members dropped first above it.
_TS_FORWARD_CHARS = 512
_TS_LONG_MEMBER = 128


_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?")
# The usual form (version 00, ids not all zero), matched on the raw header bytes.
_TRACEPARENT_00 = re.compile(
    rb"00-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-([0-9a-f]{2})"
).fullmatch
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_FLAG_VALUES = {b"%02x" % n: n for n in range(256)}
_FLAG_TEXT = tuple(f"{n & KNOWN_FLAGS:02x}" for n in range(256))


def parse_traceparent(value: str | bytes | None) -> tuple[str, str, str] | None:
    """Return ``(trace_id, parent_id, flags)`` of a valid W3C traceparent, else None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(value) > 512:
        return None
    match = _TRACEPARENT_RE.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if version == "00" and rest:
        return None
    return trace_id, parent_id, flags


def trace_of(raw: bytes | None) -> tuple[str | None, int]:
    """``(trace_id, flags)`` of a request's raw ``traceparent`` header (flags as an int), or
    :data:`NO_TRACE` when it is absent or invalid."""
    if raw is None:
        return NO_TRACE
    match = _TRACEPARENT_00(raw)
    if match is not None:
        return match[1].decode(), _FLAG_VALUES[match[2]]
    parsed = parse_traceparent(raw)  # another version, surrounding blanks, or invalid
    return NO_TRACE if parsed is None else (parsed[0], int(parsed[2], 16))


def trace_id_of(raw: bytes | None) -> str | None:
    """The trace id of a request's raw ``traceparent`` header, when it is valid."""
    return trace_of(raw)[0]


def format_traceparent(trace_id: str, parent_id: str, flags: int) -> str:
    """A version ``00`` ``traceparent``; of ``flags`` only the :data:`KNOWN_FLAGS` are sent."""
    return f"00-{trace_id}-{parent_id}-{_FLAG_TEXT[flags & 0xFF]}"


def is_trace_id(value: object) -> bool:
    """True for a W3C trace id: 32 lowercase hex characters, not all zero."""
    if not isinstance(value, str) or len(value) != 32 or value == _ZERO_TRACE:
        return False
    try:
        # fromhex() refuses anything but hex digits and whitespace; hex() gives back 32
        # lowercase digits, equal to ``value`` only when that is what it was.
        return bytes.fromhex(value).hex() == value
    except ValueError:
        return False


def _text(raw: str | bytes) -> str | None:
    if isinstance(raw, bytes):
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    return raw if raw.isascii() else None


def parse_tracestate(raw: str | bytes | None) -> str | None:
    """The ``tracestate`` to forward (``k=v,k=v``), or None when absent, empty or invalid.

    Members keep their order; a repeated key keeps its first member; an invalid member or
    more than 32 members invalidate the whole header (see the module docstring).
    """
    if raw is None or len(raw) > _TS_MAX_BYTES:
        return None
    text = _text(raw)
    if text is None:
        return None
    members: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or _TS_KEY_RE.fullmatch(key) is None or _TS_VALUE_RE.fullmatch(value) is None:
            return None
        members.setdefault(key, f"{key}={value}")
    if not members or len(members) > TRACESTATE_MAX_MEMBERS:
        return None
    return _within_forward_limit(list(members.values()))


def _within_forward_limit(members: list[str]) -> str:
    """``members`` joined, shortened to 512 characters as the spec suggests: members over 128
    characters are dropped first, then members from the end."""
    joined = ",".join(members)
    if len(joined) <= _TS_FORWARD_CHARS:
        return joined
    kept = [member for member in members if len(member) <= _TS_LONG_MEMBER]
    while len(",".join(kept)) > _TS_FORWARD_CHARS:
        kept.pop()
    return ",".join(kept)


def parse_baggage(raw: str | bytes | None) -> dict[str, str]:
    """The valid members of a ``baggage`` header as ``{key: decoded value}`` (first key wins)."""
    if raw is None or len(raw) > BAGGAGE_MAX_BYTES:
        return {}
    text = _text(raw)
    if text is None:
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        if len(out) >= BAGGAGE_MAX_MEMBERS:
            break
        match = _BAGGAGE_MEMBER_RE.fullmatch(part.strip(" \t"))
        if match is None:
            continue
        key, value = match.groups()
        if TOKEN_RE.fullmatch(key) is None or _BAGGAGE_VALUE_RE.fullmatch(value) is None:
            continue
        out.setdefault(key, unquote_plus(value, errors="replace"))
    return out


def format_baggage(items: Iterable[tuple[str, str]]) -> str:
    """A ``baggage`` header from ``(key, value)`` pairs: values percent-encoded (UTF-8, ``+``
    as ``%2B``).

    Keys must be RFC 7230 tokens (checked by the caller). A member that would take the header
    past 64 members or 8,192 bytes is left out whole, never truncated.
    """
    members: list[str] = []
    size = 0
    for key, value in items:
        if _needs_no_quoting(value) is None:
            value = quote(value, safe=_BAGGAGE_SAFE)
        member = f"{key}={value}"
        extra = len(member) + (1 if members else 0)
        if len(members) >= BAGGAGE_MAX_MEMBERS:
            break
        if size + extra > BAGGAGE_MAX_BYTES:
            continue
        members.append(member)
        size += extra
    return ",".join(members)


# Callers tend to send the same baggage again (per tenant, per user): its parsed, frozen
# form is remembered by the raw header. Bounded; a stream of distinct headers only churns it.
_parsed_baggage: dict[bytes, FrozenMap] = {}
_PARSED_BAGGAGE_MAX = 512


def incoming_metadata(
    headers: Iterable[tuple[bytes, bytes]], trace_id: str | None
) -> dict[str, Any]:
    """What a trusted caller's ``baggage`` and ``tracestate`` add to a request's
    ``audit_metadata``: ``{"baggage": {key: decoded value}}`` and, only when the request has a
    valid ``traceparent`` (``trace_id``), ``{"tracestate": "k=v,..."}``; empty when neither.

    Used by ``ContextMiddleware(trust_incoming_baggage=True)``. Repeated headers are combined,
    as RFC 7230 allows.
    """
    baggage: list[bytes] = []
    tracestate: list[bytes] = []
    for name, value in headers:
        if name == b"baggage":
            baggage.append(value)
        elif name == b"tracestate":
            tracestate.append(value)
    extra: dict[str, Any] = {}
    if baggage:
        raw = baggage[0] if len(baggage) == 1 else b",".join(baggage)
        members = _parsed_baggage.get(raw)
        if members is None:
            members = remember(
                _parsed_baggage, raw, freeze_mapping(parse_baggage(raw)), _PARSED_BAGGAGE_MAX
            )
        if members:
            extra["baggage"] = members
    if tracestate and trace_id is not None:
        state = parse_tracestate(b",".join(tracestate))
        if state is not None:
            extra["tracestate"] = state
    return extra
