"""W3C ``tracestate`` and ``baggage`` headers: strict parsing, safe formatting.

Parsing never raises: an invalid header (or, for baggage, an invalid member) is ignored, so a
bad header can never turn a request into a 500. Raw header values are never logged.

* ``tracestate`` (W3C Trace Context §3.3): up to 32 ``key=value`` members with unique keys; the
  whole header is ignored when any member is invalid. It is only meaningful next to a valid
  ``traceparent``.
* ``baggage`` (W3C Baggage): ``key=value`` members with optional ``;property`` parts (dropped
  here), values percent-decoded as UTF-8 (invalid UTF-8 becomes U+FFFD). Invalid members are
  skipped; a header longer than 8,192 bytes is ignored; at most 64 members are kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote

from ._memo import remember
from .context import UserExecutionContext, evolve
from .frozen import FrozenMap, freeze_mapping
from .ids import parse_traceparent

__all__ = [
    "BAGGAGE_MAX_BYTES",
    "BAGGAGE_MAX_MEMBERS",
    "TRACESTATE_MAX_MEMBERS",
    "apply_incoming",
    "format_baggage",
    "parse_baggage",
    "parse_tracestate",
]

BAGGAGE_MAX_MEMBERS = 64
BAGGAGE_MAX_BYTES = 8192
TRACESTATE_MAX_MEMBERS = 32

# RFC 7230 token: the baggage key.
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAGGAGE_VALUE_RE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
_BAGGAGE_MEMBER_RE = re.compile(r"([^=;\s]+)[ \t]*=[ \t]*([^;]*?)[ \t]*(?:;.*)?")
# Every baggage-octet but "%", which must itself be encoded.
_BAGGAGE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\%')
_needs_no_quoting = re.compile(r"[\x21\x23\x24\x26-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*").fullmatch

_TS_KEY_RE = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}"
    r"|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
)
_TS_VALUE_RE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_TS_MAX_BYTES = 8192


def _text(raw: str | bytes) -> str | None:
    if isinstance(raw, bytes):
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    return raw if raw.isascii() else None


def parse_tracestate(raw: str | bytes | None) -> str | None:
    """The normalized ``tracestate`` (``k=v,k=v``), or None when absent, empty or invalid."""
    if raw is None or len(raw) > _TS_MAX_BYTES:
        return None
    text = _text(raw)
    if text is None:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for part in text.split(","):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or _TS_KEY_RE.fullmatch(key) is None or key in keys:
            return None
        if _TS_VALUE_RE.fullmatch(value) is None:
            return None
        keys.add(key)
        members.append(f"{key}={value}")
    if not members or len(members) > TRACESTATE_MAX_MEMBERS:
        return None
    return ",".join(members)


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
        out.setdefault(key, unquote(value, errors="replace"))
    return out


def format_baggage(items: Iterable[tuple[str, str]]) -> str:
    """A ``baggage`` header from ``(key, value)`` pairs: values percent-encoded (UTF-8).

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


def apply_incoming(
    ctx: UserExecutionContext, headers: Iterable[tuple[bytes, bytes]]
) -> UserExecutionContext:
    """``ctx`` with the trusted caller's ``baggage`` and ``tracestate`` in ``audit_metadata``.

    Used by ``ContextMiddleware(trust_incoming_baggage=True)``. Baggage goes to
    ``audit_metadata["baggage"]`` (a mapping of decoded values); ``tracestate`` goes to
    ``audit_metadata["tracestate"]`` only when a valid ``traceparent`` came with it (and the
    context therefore has its ``trace_id``). Repeated headers are combined, as RFC 7230 allows.
    """
    baggage: list[bytes] = []
    tracestate: list[bytes] = []
    traceparent: bytes | None = None
    for name, value in headers:
        if name == b"baggage":
            baggage.append(value)
        elif name == b"tracestate":
            tracestate.append(value)
        elif name == b"traceparent":
            traceparent = value
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
    if tracestate and ctx.trace_id is not None and parse_traceparent(traceparent) is not None:
        state = parse_tracestate(b",".join(tracestate))
        if state is not None:
            extra["tracestate"] = state
    if not extra:
        return ctx
    # The values were parsed and validated above, and "baggage"/"tracestate" are not
    # reserved keys: freeze them and copy the context without re-validating all of it.
    metadata = freeze_mapping(ctx.audit_metadata).merged(extra)
    return evolve(ctx, audit_metadata=metadata)
