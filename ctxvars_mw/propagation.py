"""Carry the context to other services: outgoing headers, httpx transports, signed envelopes.

``outgoing_headers()`` gives the headers a downstream call should carry:

* ``X-Request-ID`` / ``X-Correlation-ID`` — the context's ``request_id`` and ``correlation_id``
  (other names with ``request_id_header=``/``correlation_id_header=``, as for the middleware).
* ``traceparent`` — version ``00``, the context's ``trace_id`` and ``trace_flags`` (those
  that came in: sampled and random trace id), and a **new parent id per call**. A context
  without a trace id (no valid traceparent came in) uses one derived from its
  ``correlation_id`` (the first 128 bits of its BLAKE2b hash), so every call made for one
  correlated request shares one trace; its flags are ``00``: nothing was recorded, and a trace
  id derived from an id a caller may choose is not claimed to be random. With
  :mod:`ctxvars_mw.integrations.otel` installed and a span active, the span's trace id, span
  id and flags are used instead.
* ``tracestate`` — forwarded when a trusted caller sent one with the context's trace.
* ``baggage`` — only the allow-listed keys (:data:`DEFAULT_BAGGAGE_KEYS`: just ``tier``),
  percent-encoded, within 64 members and 8,192 bytes. Baggage reaches every host the client
  calls, third parties included, so personal data (``user_id``) is opt-in and ``session_id``
  and claims can never be listed. A key that is not a context field is taken from trusted
  incoming baggage (``audit_metadata["baggage"]``), so allow-listing ``"tenant"`` forwards it.
  The request's metadata (``client_ip``, ``user_agent``, ``method``, ``path``) is never sent:
  it describes the request this service received, not the call it makes, and a downstream
  service learns its client's address from its own trusted proxies.

``ContextTransport`` / ``AsyncContextTransport`` add these headers to every request an httpx
client sends; a header the caller set explicitly on the request is never overridden. The
user's bearer token is never forwarded: the context does not hold raw tokens, and only a
transport built with ``bearer_token=`` sends an ``Authorization`` header.

``dumps`` / ``loads`` (from :mod:`ctxvars_mw.envelope`) sign a context for a queue or service hop.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx

from .context import REQUEST_METADATA_FIELDS, UserExecutionContext
from .current import get_context_or_none
from .envelope import dumps, loads
from .errors import ConfigurationError
from .ids import check_id_header_names, random_hex
from .w3c import TOKEN_RE, format_baggage, format_traceparent

__all__ = [
    "DEFAULT_BAGGAGE_KEYS",
    "AsyncContextTransport",
    "ContextTransport",
    "dumps",
    "loads",
    "outgoing_headers",
    "set_span_source",
]

#: Baggage keys forwarded by default: the tier only (no personal data).
DEFAULT_BAGGAGE_KEYS: tuple[str, ...] = ("tier",)
_FIELD_KEYS = {
    "user_id": lambda c: c.user_id,
    "thread_id": lambda c: c.thread_id,
    "run_id": lambda c: c.run_id,
    "tier": lambda c: c.tier.value,
    "operation": lambda c: c.operation,
    "auth_method": lambda c: c.auth_method,
}
_NEVER_FORWARDED = frozenset(
    ["session_id", "claims", "db_session", "authorization", "token", *REQUEST_METADATA_FIELDS]
)
_ZERO_SPAN = "0" * 16
_UNSET = object()

#: Set by ``ctxvars_mw.integrations.otel.install()``: the active span's
#: ``(trace_id, span_id, flags, tracestate)``, or None when no span is recording.
SpanSource = Callable[[], "tuple[str, str, str, str | None] | None"]
_span_source: SpanSource | None = None


def set_span_source(source: SpanSource | None) -> None:
    """Install (or, with None, remove) the function that reports the active span's ids."""
    global _span_source
    _span_source = source


def _plan_for(keys: Iterable[str]) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    if isinstance(keys, str):
        raise ConfigurationError("baggage_keys must be a collection of keys, not one string")
    return _baggage_plan(tuple(keys))


@functools.lru_cache(maxsize=64)
def _baggage_plan(keys: tuple[str, ...]) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    plan: list[tuple[str, Callable[[Any], Any] | None]] = []
    for key in keys:
        if not isinstance(key, str) or TOKEN_RE.fullmatch(key) is None:
            raise ConfigurationError("baggage keys must be RFC 7230 tokens")
        if key.lower() in _NEVER_FORWARDED:
            raise ConfigurationError(f"{key!r} is never forwarded as baggage")
        plan.append((key, _FIELD_KEYS.get(key)))
    return tuple(plan)


def _baggage(ctx: UserExecutionContext, plan: tuple[tuple[str, Any], ...]) -> str:
    trusted: Any = _UNSET
    items: list[tuple[str, str]] = []
    for key, getter in plan:
        if getter is not None:
            value = getter(ctx)
        else:
            if trusted is _UNSET:  # looked up once, and only when a key needs it
                trusted = ctx.audit_metadata.get("baggage")
                if not isinstance(trusted, Mapping):
                    trusted = None
            value = None if trusted is None else trusted.get(key)
        if isinstance(value, str):
            items.append((key, value))
    return format_baggage(items) if items else ""


def _trace_id(ctx: UserExecutionContext) -> str:
    if ctx.trace_id is not None:
        return ctx.trace_id
    derived = hashlib.blake2b(ctx.correlation_id.encode(), digest_size=16).hexdigest()
    return derived if derived != "0" * 32 else "1".zfill(32)


def _span_id() -> str:
    span = random_hex(8)
    return span if span != _ZERO_SPAN else "1".zfill(16)


_ID_HEADERS = ("X-Request-ID", "X-Correlation-ID")


def _headers(
    ctx: UserExecutionContext,
    plan: tuple[tuple[str, Any], ...],
    id_headers: tuple[str, str] = _ID_HEADERS,
) -> dict[str, str]:
    headers = {id_headers[0]: ctx.request_id, id_headers[1]: ctx.correlation_id}
    span = _span_source() if _span_source is not None else None
    if span is not None:
        trace_id, span_id, flags, state = span
        headers["traceparent"] = f"00-{trace_id}-{span_id}-{flags}"
    else:
        headers["traceparent"] = format_traceparent(_trace_id(ctx), _span_id(), ctx.trace_flags)
        state = ctx.audit_metadata.get("tracestate") if ctx.trace_id is not None else None
    if isinstance(state, str) and state:
        headers["tracestate"] = state
    if plan:
        baggage = _baggage(ctx, plan)
        if baggage:
            headers["baggage"] = baggage
    return headers


def outgoing_headers(
    ctx: UserExecutionContext | None = None,
    *,
    baggage_keys: Iterable[str] = DEFAULT_BAGGAGE_KEYS,
    request_id_header: str = "X-Request-ID",
    correlation_id_header: str = "X-Correlation-ID",
) -> dict[str, str]:
    """The headers a downstream call made for ``ctx`` should carry (the current context when
    None; ``{}`` outside one). See the module docstring for each header; the id header names
    are those the downstream ``ContextMiddleware`` was configured to read."""
    names = _id_names(request_id_header, correlation_id_header)
    if ctx is None:
        ctx = get_context_or_none()
        if ctx is None:
            return {}
    return _headers(ctx, _plan_for(baggage_keys), names)


def _id_names(request_id_header: str, correlation_id_header: str) -> tuple[str, str]:
    if request_id_header == "X-Request-ID" and correlation_id_header == "X-Correlation-ID":
        return _ID_HEADERS
    return check_id_header_names(request_id_header, correlation_id_header)


BearerToken = str | Callable[[], "str | None"] | None


class _HeaderAdder:
    """What both transports share: options checked once, headers added per request."""

    def __init__(
        self, baggage_keys: Iterable[str], bearer_token: BearerToken, id_headers: tuple[str, str]
    ) -> None:
        self._plan = _plan_for(baggage_keys)
        self._id_headers = _id_names(*id_headers)
        if isinstance(bearer_token, str):
            _check_token(bearer_token)
        elif bearer_token is not None and not callable(bearer_token):
            raise ConfigurationError("bearer_token must be a str, a callable or None")
        self._bearer = bearer_token

    def _add_headers(self, request: httpx.Request) -> None:
        headers = request.headers
        ctx = get_context_or_none()
        if ctx is not None:
            for name, value in _headers(ctx, self._plan, self._id_headers).items():
                if name not in headers:
                    headers[name] = value
        bearer = self._bearer
        if bearer is not None and "authorization" not in headers:
            token = bearer if isinstance(bearer, str) else bearer()
            if token is not None:
                headers["Authorization"] = "Bearer " + _check_token(token)


def _check_token(token: object) -> str:
    if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable():
        raise ConfigurationError("bearer_token must be a non-empty printable ASCII string")
    if " " in token:
        raise ConfigurationError("bearer_token must not contain spaces")
    return token


class ContextTransport(_HeaderAdder, httpx.BaseTransport):
    """An httpx transport that adds :func:`outgoing_headers` to every request.

    ``wrapped`` is the transport that sends (default: a new ``httpx.HTTPTransport()``). Headers
    the request already has are kept. ``baggage_keys`` is the baggage allow-list.
    ``bearer_token`` (opt-in) is a token, or a callable returning the token to send for this
    request, as ``Authorization: Bearer …`` when the request has no ``Authorization`` header.
    ``request_id_header``/``correlation_id_header`` name the id headers, as the downstream
    ``ContextMiddleware`` reads them.
    """

    def __init__(
        self,
        wrapped: httpx.BaseTransport | None = None,
        *,
        baggage_keys: Iterable[str] = DEFAULT_BAGGAGE_KEYS,
        bearer_token: BearerToken = None,
        request_id_header: str = "X-Request-ID",
        correlation_id_header: str = "X-Correlation-ID",
    ) -> None:
        if wrapped is not None and not isinstance(wrapped, httpx.BaseTransport):
            raise ConfigurationError("wrapped must be an httpx.BaseTransport")
        super().__init__(baggage_keys, bearer_token, (request_id_header, correlation_id_header))
        self.wrapped = wrapped if wrapped is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Add the context's headers, then send through the wrapped transport."""
        self._add_headers(request)
        return self.wrapped.handle_request(request)

    def close(self) -> None:
        """Close the wrapped transport."""
        self.wrapped.close()


class AsyncContextTransport(_HeaderAdder, httpx.AsyncBaseTransport):
    """The async twin of :class:`ContextTransport` (default: ``httpx.AsyncHTTPTransport()``)."""

    def __init__(
        self,
        wrapped: httpx.AsyncBaseTransport | None = None,
        *,
        baggage_keys: Iterable[str] = DEFAULT_BAGGAGE_KEYS,
        bearer_token: BearerToken = None,
        request_id_header: str = "X-Request-ID",
        correlation_id_header: str = "X-Correlation-ID",
    ) -> None:
        if wrapped is not None and not isinstance(wrapped, httpx.AsyncBaseTransport):
            raise ConfigurationError("wrapped must be an httpx.AsyncBaseTransport")
        super().__init__(baggage_keys, bearer_token, (request_id_header, correlation_id_header))
        self.wrapped = wrapped if wrapped is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Add the context's headers, then send through the wrapped transport."""
        self._add_headers(request)
        return await self.wrapped.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.wrapped.aclose()
