"""ContextMiddleware: builds the request's UserExecutionContext, makes it current, resets it.

A request goes through five steps, each owned by one module:

1. **Exchange** — the request headers are read once (:func:`read_headers`); the incoming ids
   are accepted or replaced (:func:`ctxvars_mw.ids.accept_header_id`); the ``traceparent``
   goes to the context as it came, which reads its trace id and flags
   (:func:`ctxvars_mw.w3c.trace_of`) when they are first asked for; a :class:`Responder` owns
   the request's ``send``.
   What the context's client, user agent, method and path are made of is taken
   (:class:`ctxvars_mw.request_metadata.MetadataReader`); the context cleans it when one of
   them is first read.
2. **Admission** — who the caller is and whether they may enter
   (:class:`ctxvars_mw.auth.admission.Admission`), then, when the policy declares limits,
   whether their tier's request rate allows this request
   (:class:`ctxvars_mw.ratelimit.limiter.Limiter`); a refusal is answered here, before the app.
3. **Enter** — the request's context, derived from the caller's
   (:func:`ctxvars_mw.context.request_context`), is made current with its cleanup list
   (:func:`ctxvars_mw.resources.open_scope`).
4. **App** — the wrapped app runs; the responder sets the id headers on the response, and turns
   a 401/403 error raised before the response started into its JSON answer.
5. **Finish** — the request's cleanups run and the context is reset, in the same frame.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .auth.admission import NOT_CACHED, REPEATED, Admission
from .auth.base import Authenticator
from .auth.sessions import SessionStore
from .context import UserExecutionContext, evolve, request_context
from .current import open_frame, request_context_for, reset_frame
from .errors import (
    AuthenticationError,
    ConfigurationError,
    HTTPError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    ServiceUnavailableError,
)
from .frozen import freeze_mapping
from .ids import accept_header_id, check_id_header_names, generate_id, get_id_rules
from .policy import Policy
from .proxies import TrustedProxies
from .ratelimit.guards import reset_limiter, set_limiter
from .ratelimit.limiter import Limiter
from .ratelimit.store import LimitStore
from .request_metadata import REQUEST_METADATA_FIELDS, MetadataReader, check_metadata_names
from .resources import Cleanup, close_scope, run_cleanups
from .responses import send_error
from .types import ASGIApp, Message, Receive, Scope, Send
from .w3c import incoming_metadata

__all__ = ["ContextMiddleware", "Responder", "Settings", "read_headers"]

logger = logging.getLogger("ctxvars_mw")
_JSON_500 = b'{"error":"server_error","error_description":"Internal server error."}'
_SESSION_FAILURE = ("closed", "open")
#: What the app may raise before its response starts and have answered as JSON.
_ANSWERED = (AuthenticationError, PermissionDeniedError, RateLimitedError, ServiceUnavailableError)


@dataclass(frozen=True, slots=True)
class Settings:
    """ContextMiddleware's options, checked once (a bad one raises :class:`ConfigurationError`
    naming it) and turned into what the request path reads."""

    request_id_header: bytes  # lowercase, as ASGI gives header names
    correlation_id_header: bytes
    id_names: tuple[bytes, bytes]  # both, for the responder
    #: The id header names as configured (``X-Request-ID``), by their lowercase bytes: for
    #: log lines and error descriptions.
    spelled: dict[bytes, str]
    #: Incoming request and correlation ids are read (False: always generated).
    trust_incoming_ids: bool
    #: The request headers the exchange reads (the id headers only when incoming ids are
    #: trusted, the credentials only with an authenticator, the user agent only when it is
    #: recorded, the forwarded header only when a proxy is trusted).
    wanted: frozenset[bytes]
    trust_incoming_baggage: bool
    #: Incoming ids must also pass this (None: the header rule and the id rules only).
    id_validator: Callable[[str], bool] | None = None
    #: Makes the ids of requests that bring none (or a refused one).
    id_generator: Callable[[], str] = generate_id
    #: A refused incoming id is a 400 instead of being replaced.
    reject_invalid_ids: bool = False
    #: The request's own id headers show the ids in use (for the app, and the apps it calls).
    update_request_headers: bool = True
    #: Reads the request metadata the context records (None: it records none).
    metadata: MetadataReader | None = None

    @classmethod
    def from_options(
        cls,
        *,
        authenticate: bool,
        request_id_header: object,
        correlation_id_header: object,
        trust_incoming_ids: object,
        trust_incoming_baggage: object,
        id_validator: object = None,
        id_generator: object = None,
        reject_invalid_ids: object = False,
        update_request_headers: object = True,
        request_metadata: object = REQUEST_METADATA_FIELDS,
        trusted_proxies: object = (),
        forwarded_header: object = "X-Forwarded-For",
    ) -> Settings:
        """The settings for these options."""
        _check_bool("trust_incoming_ids", trust_incoming_ids)
        _check_bool("trust_incoming_baggage", trust_incoming_baggage)
        _check_bool("reject_invalid_ids", reject_invalid_ids)
        _check_bool("update_request_headers", update_request_headers)
        if id_validator is not None and not callable(id_validator):
            raise ConfigurationError("id_validator must be a callable taking the id")
        names = check_id_header_names(request_id_header, correlation_id_header)
        rid, cid = (name.lower().encode("ascii") for name in names)
        wanted = {b"traceparent"}
        if trust_incoming_ids:
            wanted |= {rid, cid}
        if authenticate:
            wanted.add(b"authorization")
        fields = check_metadata_names("request_metadata", request_metadata)
        proxies = TrustedProxies(trusted_proxies, forwarded_header)  # type: ignore[arg-type]
        metadata = MetadataReader(fields, proxies) if fields else None
        if metadata is not None:
            wanted |= metadata.wanted
        return cls(
            rid,
            cid,
            (rid, cid),
            {rid: names[0], cid: names[1]},
            bool(trust_incoming_ids),
            frozenset(wanted),
            bool(trust_incoming_baggage),
            id_validator,
            _check_generator(id_generator, id_validator),
            bool(reject_invalid_ids),
            bool(update_request_headers),
            metadata,
        )


class ContextMiddleware:
    """Pure-ASGI middleware: one immutable :class:`UserExecutionContext` per request.

    For ``http`` and ``websocket`` scopes it validates the incoming request/correlation ids
    (generating them when absent or invalid), reads the W3C ``traceparent``, authenticates
    the caller (anonymous without an ``authenticator``), makes the context current for the
    whole app call (streaming bodies and background tasks included), sets the id headers on
    every response, and resets the context in the same frame. Other scopes pass through.

    Options (keyword-only, checked here; a bad one raises :class:`ConfigurationError`):
    ``authenticator``, ``policy`` (default ``Policy.default()``), ``require_authentication``
    and ``exempt_paths`` (exact paths, or prefixes ending in ``*``), ``session_store``,
    ``session_failure`` (``"closed"``: 503 with ``Retry-After: retry_after`` while the store is
    unreachable; ``"open"``: let the token through), ``request_id_header`` and
    ``correlation_id_header`` (the names read and set), ``trust_incoming_ids`` (False on an
    edge service: incoming request/correlation ids are ignored and always generated),
    ``websocket_token_query_param`` (opt-in token query parameter on websocket handshakes),
    ``trust_incoming_baggage`` (keep validated W3C ``baggage``/``tracestate`` from callers in
    ``audit_metadata``; off by default because callers are untrusted), ``id_validator`` (an
    extra rule incoming ids must pass, e.g. UUIDs only), ``id_generator`` (makes the ids of
    requests that bring none), ``reject_invalid_ids`` (answer a refused incoming id with a
    400 instead of replacing it), ``update_request_headers`` (on: the request's own id
    headers show the ids in use, so the app and what it forwards see them),
    ``request_metadata`` (the request fields the context records, of ``client_ip``,
    ``user_agent``, ``method`` and ``path``: all by default, ``()`` for none; see
    :mod:`ctxvars_mw.request_metadata`), ``trusted_proxies`` (addresses and networks of the
    proxies whose ``forwarded_header`` names the client, ``"*"`` for every peer; none by
    default: forwarded headers are ignored) and ``forwarded_header`` (``"X-Forwarded-For"``
    or ``"Forwarded"``: the one header those proxies write; see :mod:`ctxvars_mw.proxies`).

    Metering, when the policy declares ``tier_limits`` (or ``route_limits`` are given): every
    request is counted against its caller's tier's rates after admission, before the app; a
    refusal is a 429 with ``Retry-After``, and every answer carries the RateLimit headers
    (see :mod:`ctxvars_mw.ratelimit`). ``limit_store`` keeps the counts (default in memory;
    a :class:`~ctxvars_mw.RedisLimitStore` for many processes), ``limit_failure``
    (``"closed"``: 503 with ``Retry-After: retry_after`` while the store is unreachable;
    ``"open"``: let requests through unmetered), ``limit_key`` (``"user"`` or
    ``"session"``: who a caller's count belongs to) and ``route_limits`` (path → tier →
    rates, replacing the tier's rates on those paths).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator | None = None,
        policy: Policy | None = None,
        require_authentication: bool = False,
        exempt_paths: Iterable[str] = (),
        session_store: SessionStore | None = None,
        session_failure: str = "closed",
        retry_after: int = 5,
        request_id_header: str = "X-Request-ID",
        correlation_id_header: str = "X-Correlation-ID",
        websocket_token_query_param: str | None = None,
        trust_incoming_baggage: bool = False,
        trust_incoming_ids: bool = True,
        id_validator: Callable[[str], bool] | None = None,
        id_generator: Callable[[], str] | None = None,
        reject_invalid_ids: bool = False,
        update_request_headers: bool = True,
        request_metadata: Iterable[str] = REQUEST_METADATA_FIELDS,
        trusted_proxies: Iterable[str] = (),
        forwarded_header: str = "X-Forwarded-For",
        limit_store: LimitStore | None = None,
        limit_failure: str = "closed",
        limit_key: str = "user",
        route_limits: Mapping[str, Mapping[Any, Any]] | None = None,
    ) -> None:
        if not callable(app):
            raise ConfigurationError("app must be an ASGI application")
        self.app = app
        self.settings = Settings.from_options(
            authenticate=authenticator is not None,
            request_id_header=request_id_header,
            correlation_id_header=correlation_id_header,
            trust_incoming_ids=trust_incoming_ids,
            trust_incoming_baggage=trust_incoming_baggage,
            id_validator=id_validator,
            id_generator=id_generator,
            reject_invalid_ids=reject_invalid_ids,
            update_request_headers=update_request_headers,
            request_metadata=request_metadata,
            trusted_proxies=trusted_proxies,
            forwarded_header=forwarded_header,
        )
        self.admission = Admission(
            _check_authenticator(authenticator),
            policy=_check_policy(policy),
            require_authentication=_check_required(require_authentication, authenticator),
            exempt_paths=_check_exempt_paths(exempt_paths),
            session_store=_check_session_store(session_store),
            session_failure=_check_session_failure(session_failure),
            retry_after=_check_retry_after(retry_after),
            query_param=_check_query_param(websocket_token_query_param),
        )
        self.limiter = _limiter(
            self.admission.policy, limit_store, limit_failure, retry_after, limit_key, route_limits
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        incoming = scope["headers"]
        found = read_headers(incoming, self.settings.wanted)
        outer = request_context_for(incoming)  # a ContextMiddleware around this one
        if outer is None:
            request_id, correlation_id, id_headers, refusal = self.request_ids(scope, found)
            # The context reads its raw traceparent when its trace is first asked for.
            trace: bytes | str | None = found.get(b"traceparent")
            if type(trace) is not bytes:  # only an ASGI header value, bytes, is parsed
                trace = None
            flags = 0
        else:  # the request's ids and trace are those the outer middleware set
            request_id, correlation_id = outer.request_id, outer.correlation_id
            trace, flags = outer.trace_id, outer.trace_flags
            id_headers, refusal = self.id_headers(request_id, correlation_id), None
        headers = scope["headers"]  # with the ids in use (update_request_headers)
        responder = Responder(send, self.settings.id_names, id_headers)
        ws_id = request_id if kind == "websocket" else None
        caller, admission = self.admission.anonymous, self.admission
        if admission.authenticator is not None and refusal is None:
            authorization = found.get(b"authorization")
            try:
                known = admission.admit_known(scope, authorization)  # a cached token: no await
                if known is None or known is NOT_CACHED:
                    caller, responder.subprotocol = await admission.admit(
                        scope, authorization, cache_asked=known is NOT_CACHED
                    )
                else:
                    caller = known
            except HTTPError as exc:  # answered below, in the anonymous context of the request
                refusal = exc
        reader = self.settings.metadata
        metadata = None if reader is None else reader.capture(scope, found)
        ctx = request_context(
            caller, request_id, correlation_id, trace, ws_id, outer, flags, metadata
        )
        limiter = self.limiter
        if limiter is not None and refusal is None and outer is None:
            check = limiter.check_request(scope, ctx)
            if check is not None:
                try:
                    responder.id_headers += await check
                except HTTPError as exc:  # 429, or 503 from a store that is down (closed)
                    refusal = exc
        if refusal is not None:
            await responder.refuse_at_door(scope, receive, refusal, ctx)
            scope["headers"] = incoming
            return
        if self.settings.trust_incoming_baggage:
            ctx = with_incoming_baggage(ctx, headers)
        cleanups: list[Cleanup] = []
        token = open_frame(ctx, cleanups, headers)
        metering = None if limiter is None else set_limiter((limiter, scope))
        try:
            await self.app(
                scope, receive, responder.send_http if kind == "http" else responder.send_websocket
            )
        except _ANSWERED as exc:
            if responder.started:
                raise
            await responder.refuse(scope, receive, exc)
        except Exception:
            if responder.started or kind != "http":
                raise
            await responder.server_error()
            raise
        finally:
            scope["headers"] = incoming  # the scope leaves as it came
            if metering is not None:
                reset_limiter(metering)
            try:
                if cleanups:
                    await run_cleanups(cleanups)
            finally:
                close_scope(token, cleanups)

    def request_ids(
        self, scope: Scope, found: dict[bytes, bytes]
    ) -> tuple[str, str, list[tuple[bytes, bytes]], HTTPError | None]:
        """The request's id and correlation id, the response headers that carry them, and
        the refusal of an invalid incoming id (``reject_invalid_ids``; else None).

        The accepted incoming ids (the response repeats the very bytes that came in), else
        ids generated when absent or refused (the correlation id defaults to the request id).
        With ``update_request_headers``, ids that did not come in as they are used replace
        the request's own id headers.
        """
        settings = self.settings
        if settings.trust_incoming_ids:
            raw_rid = found.get(settings.request_id_header)
            raw_cid = found.get(settings.correlation_id_header)
        else:  # an edge service: the ids are always generated
            raw_rid = raw_cid = None
        request_id = correlation_id = None
        if raw_rid is not None or raw_cid is not None:
            rules = get_id_rules()
            request_id = accept_header_id(raw_rid, rules, settings.id_validator)
            correlation_id = accept_header_id(raw_cid, rules, settings.id_validator)
            if request_id is not None and correlation_id is not None:  # both in use as they came
                names = settings.id_names
                # Typed Any: both raw values are bytes here (accept_header_id refuses None).
                id_headers: Any = [(names[0], raw_rid), (names[1], raw_cid)]
                return request_id, correlation_id, id_headers, None
        return self.settle_ids(scope, raw_rid, request_id, raw_cid, correlation_id)

    def id_headers(self, request_id: str, correlation_id: str) -> list[tuple[bytes, bytes]]:
        """The response headers that carry these ids."""
        names = self.settings.id_names
        return [(names[0], request_id.encode()), (names[1], correlation_id.encode())]

    def settle_ids(
        self,
        scope: Scope,
        raw_rid: bytes | None,
        request_id: str | None,
        raw_cid: bytes | None,
        correlation_id: str | None,
    ) -> tuple[str, str, list[tuple[bytes, bytes]], HTTPError | None]:
        """The ids of a request that did not bring both ids acceptable: absent ones
        generated (the correlation id defaults to the request id), refused ones replaced with
        a WARNING naming the header, or refused with a 400 (``reject_invalid_ids``); the
        response headers that carry them, and the refusal (else None).

        With ``update_request_headers`` the request's own id headers show the ids in use: the
        absent ones are added; a refused one (or, with ``trust_incoming_ids=False``, any
        incoming one) is taken out first."""
        settings = self.settings
        rid_refused = raw_rid is not None and request_id is None
        cid_refused = raw_cid is not None and correlation_id is None
        # Each id's header: the bytes that came in when it was accepted, else the id encoded
        # (once: a correlation id that defaults to the request id shares its bytes).
        if request_id is None:
            request_id = settings.id_generator()
            rid_header = (settings.request_id_header, request_id.encode("ascii"))
        else:
            rid_header = (settings.request_id_header, raw_rid)  # type: ignore[assignment]
        if correlation_id is None:
            correlation_id = request_id
            cid_header = (settings.correlation_id_header, rid_header[1])
        else:
            cid_header = (settings.correlation_id_header, raw_cid)  # type: ignore[assignment]
        id_headers = [rid_header, cid_header]
        refusal = None
        refused = rid_refused or cid_refused
        if refused:  # name the header, as configured
            names = [
                settings.spelled[name]
                for name, was_refused in (
                    (settings.request_id_header, rid_refused),
                    (settings.correlation_id_header, cid_refused),
                )
                if was_refused
            ]
            if settings.reject_invalid_ids:
                refusal = InvalidRequestError(
                    f"The {' and '.join(names)} header is not a valid id."
                )
            else:
                for name in names:
                    _replaced(name, request_id)
        if settings.update_request_headers:
            headers = scope["headers"]
            if refused or not settings.trust_incoming_ids:
                scope["headers"] = _without_id_headers(headers, settings.id_names) + id_headers
            elif raw_rid is None and raw_cid is None:
                scope["headers"] = [*headers, rid_header, cid_header]
            else:  # one of them came in, and is kept where it was
                scope["headers"] = [*headers, rid_header if raw_rid is None else cid_header]
        return request_id, correlation_id, id_headers, refusal


def _without_id_headers(
    headers: Iterable[tuple[bytes, bytes]], names: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    """A new request header list: ``headers`` without the id headers."""
    return [(name, value) for name, value in headers if name not in names]


def _replaced(header: str, new_id: str) -> None:
    """Log that an incoming id header was refused: its name and the id used instead, never
    the value the client sent."""
    logger.warning("replaced an invalid incoming %s header with the id %s", header, new_id)


def read_headers(
    headers: Iterable[tuple[bytes, bytes]], wanted: frozenset[bytes]
) -> dict[bytes, bytes]:
    """The request headers by name, the ``wanted`` ones at least; a wanted header sent more
    than once has the value :data:`~ctxvars_mw.auth.admission.REPEATED` (an id or
    ``traceparent`` that is ambiguous is refused, two ``Authorization`` headers are a 400).

    The common case, a header list without a repeated name, is one ``dict()`` of the list;
    only a list with a repeat is walked to mark the wanted ones."""
    if type(headers) is list:
        every = dict(headers)
        if len(every) == len(headers):
            return every
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in wanted:
            found[name] = REPEATED if name in found else value
    return found


def with_incoming_baggage(
    ctx: UserExecutionContext, headers: Iterable[tuple[bytes, bytes]]
) -> UserExecutionContext:
    """``ctx`` with a trusted caller's ``baggage`` and ``tracestate`` in ``audit_metadata``
    (see :func:`ctxvars_mw.w3c.incoming_metadata`)."""
    extra = incoming_metadata(headers, ctx.trace_id)
    if not extra:
        return ctx
    # Parsed and validated by w3c, and not reserved keys: no need to re-check the context.
    return evolve(ctx, audit_metadata=freeze_mapping(ctx.audit_metadata).merged(extra))


class Responder:
    """One request's ``send``: sets the id headers on the response (with a metered request's
    RateLimit headers, which the middleware adds to ``id_headers``, and the accepted bearer
    subprotocol on a websocket), and answers the request with an error while it can."""

    __slots__ = ("_send", "id_headers", "id_names", "started", "subprotocol")

    def __init__(
        self, send: Send, id_names: tuple[bytes, bytes], id_headers: list[tuple[bytes, bytes]]
    ) -> None:
        self._send = send
        self.id_names = id_names  # the id headers' names, lowercase
        self.id_headers = id_headers  # what the response carries: ids, then RateLimit fields
        self.started = False  # a response (or the websocket's accept or close) was sent
        self.subprotocol: str | None = None

    def send_http(self, message: Message) -> Awaitable[None]:
        # A plain function handing back send's awaitable: no coroutine of our own per message
        # (ASGI only asks that send(message) be awaitable).
        if not self.started and message["type"] == "http.response.start":
            self.started = True
            message["headers"] = self.with_ids(message.get("headers", ()))
        return self._send(message)

    def send_websocket(self, message: Message) -> Awaitable[None]:
        kind = message["type"]
        if kind == "websocket.accept":
            self.started = True
            if self.subprotocol is not None and message.get("subprotocol") is None:
                message["subprotocol"] = self.subprotocol
            message["headers"] = self.with_ids(message.get("headers", ()))
        elif kind == "websocket.http.response.start":  # the app's denial response
            self.started = True
            message["headers"] = self.with_ids(message.get("headers", ()))
        elif kind == "websocket.close":
            self.started = True
        return self._send(message)

    def with_ids(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """A new list: ``headers`` with our id headers set, whatever the app set for them.

        ASGI asks for lowercase response header names; an app that sends another case is still
        caught, at the price of a ``lower()`` for its non-lowercase names only.
        """
        if type(headers) is not list:  # any iterable: it is read twice below
            headers = list(headers)
        names = self.id_names
        for name, _ in headers:
            if name in names or not name.islower():
                return [(k, v) for k, v in headers if k.lower() not in names] + self.id_headers
        return headers + self.id_headers

    async def refuse_at_door(
        self, scope: Scope, receive: Receive, exc: HTTPError, ctx: UserExecutionContext
    ) -> None:
        """Refuse a request admission turned away, inside its (anonymous) context so that the
        refusal's log line carries the request's ids."""
        if scope["type"] == "websocket":
            # The app never ran: take the handshake's connect message before refusing it.
            message = await receive()
            if message["type"] != "websocket.connect":
                return
        token = open_frame(ctx, [], scope["headers"])
        try:
            await self.refuse(scope, receive, exc)
        finally:
            reset_frame(token)

    async def refuse(self, scope: Scope, receive: Receive, exc: HTTPError) -> None:
        """Answer with ``exc``'s JSON error (or refuse the websocket handshake)."""
        logger.info("request refused: %s %s", exc.status_code, exc.error)
        await send_error(scope, receive, self._send, exc, self.id_headers)

    async def server_error(self) -> None:
        """Answer 500 (the app raised before it started the response)."""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_JSON_500)).encode("ascii")),
            *self.id_headers,
        ]
        await self._send({"type": "http.response.start", "status": 500, "headers": headers})
        await self._send({"type": "http.response.body", "body": _JSON_500})


# -- option checks: each raises ConfigurationError naming its option ----------------------


def _check_generator(generator: object, validator: object) -> Callable[[], str]:
    """The id generator, tried once: what it makes must pass the header rule for ids (and
    the ``id_validator``), or every request would carry a broken id."""
    if generator is None:
        return generate_id
    if not callable(generator):
        raise ConfigurationError("id_generator must be a callable returning a new id")
    sample = generator()
    check: Any = validator
    if not (isinstance(sample, str) and sample.isascii()) or (
        accept_header_id(sample.encode("ascii"), get_id_rules(), check) is None
    ):
        raise ConfigurationError("id_generator must return ids of [A-Za-z0-9._:-]{1,128}")
    return generator


def _check_bool(option: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{option} must be a bool")
    return value


def _check_authenticator(value: Authenticator | None) -> Authenticator | None:
    if value is not None and not callable(getattr(value, "authenticate", None)):
        raise ConfigurationError("authenticator must have an async authenticate(conn) method")
    return value


def _check_policy(value: Policy | None) -> Policy:
    if value is not None and not isinstance(value, Policy):
        raise ConfigurationError("policy must be a Policy")
    return value or Policy.default()


def _check_required(value: object, authenticator: Authenticator | None) -> bool:
    _check_bool("require_authentication", value)
    if value and authenticator is None:
        raise ConfigurationError("require_authentication=True needs an authenticator")
    return bool(value)


def _check_exempt_paths(paths: object) -> tuple[str, ...]:
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Iterable):
        raise ConfigurationError("exempt_paths must be a collection of paths, not one value")
    checked = tuple(paths)
    for path in checked:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError("exempt_paths entries must be paths starting with '/'")
    return checked


def _check_session_store(value: SessionStore | None) -> SessionStore | None:
    if value is not None and not callable(getattr(value, "touch", None)):
        raise ConfigurationError("session_store must be a SessionStore")
    return value


def _check_session_failure(value: object) -> str:
    if value not in _SESSION_FAILURE:
        raise ConfigurationError("session_failure must be 'closed' or 'open'")
    return str(value)


def _check_retry_after(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError("retry_after must be a positive int (seconds)")
    return value


def _limiter(
    policy: Policy,
    store: LimitStore | None,
    failure: str,
    retry_after: int,
    key: str,
    route_limits: Mapping[str, Mapping[Any, Any]] | None,
) -> Limiter | None:
    """The middleware's limiter: None (no work per request) unless the policy declares
    limits or ``route_limits`` are given."""
    if not policy.has_limits and route_limits is None:
        if store is not None:
            raise ConfigurationError(
                "limit_store needs a policy with tier_limits (or route_limits)"
            )
        return None
    return Limiter(
        policy,
        store=store,
        failure=failure,
        retry_after=retry_after,
        key=key,
        route_limits=route_limits,
    )


def _check_query_param(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigurationError("websocket_token_query_param must be a non-empty string")
    return value
