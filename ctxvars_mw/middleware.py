"""ContextMiddleware: builds the request's UserExecutionContext, makes it current, resets it."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Iterable
from datetime import UTC, datetime
from hashlib import sha256 as _sha256
from time import time as _time
from typing import TYPE_CHECKING, Any

from . import ids as _ids
from ._memo import remember
from .auth.base import Authenticator, Connection, Identity
from .auth.jwt import JWTAuthenticator
from .auth.sessions import SessionStore
from .context import ANONYMOUS_USER_ID, UserExecutionContext, request_context
from .current import _HEADERS, _current, _get_raw, _Pending, resolved
from .errors import (
    AuthenticationError,
    AuthenticationRequiredError,
    ConfigurationError,
    HTTPError,
    InvalidRequestError,
    InvalidTokenError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from .frozen import EMPTY
from .ids import (
    HEADER_ID_CHARS,
    HEADER_ID_MAX,
    HEADER_ID_RE,
    IdRules,
    check_id_header_names,
    generate_id,
    generate_ids,
    get_id_rules,
    is_valid_id,
    parse_traceparent,
)
from .policy import Policy
from .resources import Cleanup, _closed, run_cleanups
from .responses import send_error
from .tier import Tier
from .types import ASGIApp, Message, Receive, Scope, Send
from .w3c import apply_incoming

__all__ = ["ContextMiddleware"]

logger = logging.getLogger("ctxvars_mw")
# RFC 6750 b64token: one or more of these, then any number of "=" (checked with a C-speed
# bytes.translate rather than a regex: ~0.2 µs instead of ~1.4 µs for a 340-byte JWT).
_TOKEN_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
_header_id_match = HEADER_ID_RE.fullmatch
_TRACEPARENT_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}").fullmatch
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_SESSION_FAILURE = ("closed", "open")
_NO_NAMES: frozenset[str] = frozenset()
_RESOLVED_MAX = 4096
_UTC = UTC
_from_timestamp = datetime.fromtimestamp
_JSON_500 = b'{"error":"server_error","error_description":"Internal server error."}'

# The optional C accelerator (ctxvars_mw/_speedups.c) runs the http path's steps (header
# scan, ids, pending context, id response headers, reset) the way the Python below does,
# about twice as fast in all; credentials are still checked here. Without a compiler at
# install time, or with CTXVARS_MW_NO_EXTENSIONS set, everything runs here in Python, with
# the same result.
if TYPE_CHECKING:
    from ._speedups import Exchange as _Exchange
_Accelerator: Any
try:
    from ._speedups import Accelerator as _Accelerator
except ImportError:  # pragma: no cover - depends on the build
    _Accelerator = None
if os.environ.get("CTXVARS_MW_NO_EXTENSIONS"):  # pragma: no cover - depends on the environment
    _Accelerator = None


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
    ``audit_metadata``; off by default because callers are untrusted).
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
    ) -> None:
        if not callable(app):
            raise ConfigurationError("app must be an ASGI application")
        if authenticator is not None and not callable(getattr(authenticator, "authenticate", None)):
            raise ConfigurationError("authenticator must have an async authenticate(conn) method")
        if policy is not None and not isinstance(policy, Policy):
            raise ConfigurationError("policy must be a Policy")
        if not isinstance(require_authentication, bool):
            raise ConfigurationError("require_authentication must be a bool")
        if require_authentication and authenticator is None:
            raise ConfigurationError("require_authentication=True needs an authenticator")
        if session_store is not None and not callable(getattr(session_store, "touch", None)):
            raise ConfigurationError("session_store must be a SessionStore")
        if session_failure not in _SESSION_FAILURE:
            raise ConfigurationError("session_failure must be 'closed' or 'open'")
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 1:
            raise ConfigurationError("retry_after must be a positive int (seconds)")
        if websocket_token_query_param is not None and (
            not isinstance(websocket_token_query_param, str) or not websocket_token_query_param
        ):
            raise ConfigurationError("websocket_token_query_param must be a non-empty string")
        self.app = app
        self.authenticator = authenticator
        self.policy = policy or Policy.default()
        self.require_authentication = require_authentication
        self.session_store = session_store
        self.session_failure = session_failure
        self.retry_after = retry_after
        self._exact_exempt, self._prefix_exempt = _exempt(exempt_paths)
        rid, cid = check_id_header_names(request_id_header, correlation_id_header)
        self._rid = rid.lower().encode("ascii")
        self._cid = cid.lower().encode("ascii")
        self._query_param = websocket_token_query_param
        if not isinstance(trust_incoming_baggage, bool):
            raise ConfigurationError("trust_incoming_baggage must be a bool")
        self._trust_baggage = trust_incoming_baggage
        if not isinstance(trust_incoming_ids, bool):
            raise ConfigurationError("trust_incoming_ids must be a bool")
        # The names the header scan looks for: None equals no header name, so untrusted ids
        # are never read (the response headers still use self._rid / self._cid).
        self._rid_in = self._rid if trust_incoming_ids else None
        self._cid_in = self._cid if trust_incoming_ids else None
        self._id_names = frozenset({self._rid, self._cid})
        self._wanted = frozenset(
            {self._rid_in, self._cid_in, b"traceparent"}
            | (
                {b"authorization", b"sec-websocket-protocol"}
                if authenticator is not None
                else set()
            )
        )
        self._anonymous_features = self.policy.features_for_tier(Tier.FREE)
        # The JWT fast path applies to JWTAuthenticator's own authenticate() only: a subclass
        # that overrides it is called like any other authenticator.
        self._jwt = (
            authenticator
            if isinstance(authenticator, JWTAuthenticator)
            and type(authenticator).authenticate is JWTAuthenticator.authenticate
            else None
        )
        self._resolved: dict[int, tuple[Identity, IdRules, frozenset[str], frozenset[str]]] = {}
        # The C path takes http requests when no baggage is trusted (see _speedups.c; None:
        # Python only): the anonymous ones start to finish; with an authenticator, the
        # caller is still found here, in Python, between its start() and enter().
        self._start = (
            _Accelerator(
                rid_in=self._rid_in, cid_in=self._cid_in, rid=self._rid, cid=self._cid,
                names=self._id_names, features=self._anonymous_features, no_names=_NO_NAMES,
                build=_request_context, accept_id=_accept_id, with_ids=_with_ids,
                generate_id=generate_id, now=_time, rules_var=_ids._rules_var,
                ids_module=_ids, current=_current, closed=_closed,
                authenticate=authenticator is not None, id_chars=HEADER_ID_CHARS,
                id_max=HEADER_ID_MAX,
            ).start
            if _Accelerator is not None and not trust_incoming_baggage
            else None
        )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http":
            if scope_type != "websocket":
                await self.app(scope, receive, send)
                return
        elif self._start is not None:
            exchange = self._start(scope, send)
            if exchange is not None:  # the C path took it (None: it needs the one below)
                if exchange.authorization is not None and not await self._enter_caller(
                    scope, receive, send, exchange
                ):
                    return  # refused (401/403/503 sent)
                try:
                    await self.app(scope, receive, exchange)
                except (AuthenticationError, PermissionDeniedError) as exc:
                    if exchange.started:
                        raise
                    await _reject(scope, receive, send, exc, exchange.id_headers, None, False)
                except Exception:
                    if exchange.started:
                        raise
                    await _send_500(send, exchange.id_headers)
                    raise
                finally:
                    cleanups = exchange.stack
                    try:
                        if cleanups:
                            await run_cleanups(cleanups)
                    finally:
                        exchange.finish()
                return

        rid_in = self._rid_in
        cid_in = self._cid_in
        raw_rid = raw_cid = raw_trace = None
        auth_headers: list[bytes] | None = [] if self.authenticator is not None else None
        protocols: bytes | None = None
        wanted = self._wanted  # one set lookup rules out the headers we do not read
        headers = scope["headers"]
        for name, value in headers:
            if name not in wanted:
                continue
            if name == rid_in:
                raw_rid = value if raw_rid is None else b""
            elif name == cid_in:
                raw_cid = value if raw_cid is None else b""
            elif name == b"traceparent":
                raw_trace = value if raw_trace is None else b""  # repeated: ambiguous, ignored
            elif auth_headers is not None:
                if name == b"authorization":
                    auth_headers.append(value)
                elif name == b"sec-websocket-protocol":
                    protocols = value

        # A ContextMiddleware nested in this same request (see ctxvars_mw.current) finds the
        # outer one's frame current, with this request's very header list.
        outer = _get_raw()
        if type(outer) is not list or outer[_HEADERS] is not headers:
            outer = None
        if outer is None:
            # Thread and run ids are drawn, and the traceparent parsed, when the context is
            # built; the request id is needed now, for the response headers.
            request_id = correlation_id = None
            rid_value = cid_value = None  # the header values: the raw bytes when accepted
            if raw_rid is not None or raw_cid is not None:
                rules = get_id_rules()
                # Real ids are longer than any placeholder: only the header pattern is
                # checked for them (the rules' short-id check needs the decoded value).
                safe = rules._safe_length
                chars = HEADER_ID_CHARS
                if raw_rid is not None:
                    if safe <= len(raw_rid) <= HEADER_ID_MAX and not raw_rid.translate(None, chars):
                        request_id = rid_value = raw_rid  # decoded by the builder
                    else:
                        request_id = _accept_id(raw_rid, "request", rules)
                if raw_cid is not None:
                    if safe <= len(raw_cid) <= HEADER_ID_MAX and not raw_cid.translate(None, chars):
                        correlation_id = cid_value = raw_cid
                    else:
                        correlation_id = _accept_id(raw_cid, "correlation", rules)
            if request_id is None:
                request_id = generate_id()
            if correlation_id is None:
                correlation_id, cid_value = request_id, rid_value
            trace: bytes | str | None = raw_trace
            thread_id = run_id = None
        else:
            # An outer ContextMiddleware handles this request already (a mounted sub-app with
            # its own middleware): one request, one set of ids, whatever each authenticates.
            outer_ctx = resolved(outer)
            assert outer_ctx is not None
            request_id, correlation_id = outer_ctx.request_id, outer_ctx.correlation_id
            trace, thread_id, run_id = outer_ctx.trace_id, outer_ctx.thread_id, outer_ctx.run_id
            rid_value = cid_value = None
        ws_id = request_id if scope_type == "websocket" else None
        if rid_value is None:
            rid_value = request_id.encode("ascii")
        if cid_value is None:
            cid_value = rid_value if correlation_id is request_id else correlation_id.encode()
        id_headers = [(self._rid, rid_value), (self._cid, cid_value)]

        subprotocol_token = False
        identity: Identity | None = None
        args: tuple[Any, ...]
        if auth_headers is not None:
            try:
                digest = None
                if scope_type == "http":
                    identity, digest = self._cached(auth_headers)
                if identity is None:
                    identity, subprotocol_token = await self._identify(
                        scope, auth_headers, protocols, digest
                    )
                if identity is not None:
                    permissions, features = self._resolve(identity)
                    if identity.session_id is not None and self.session_store is not None:
                        await self._check_session(identity.session_id, identity.user_id)
                    args = (
                        identity, permissions, features, request_id, correlation_id, trace,
                        thread_id, run_id, ws_id, _time(),
                    )  # fmt: skip
            except HTTPError as exc:
                await _reject(scope, receive, send, exc, id_headers, bool(auth_headers), True)
                return
        if identity is None:  # anonymous: FREE, no roles, the free tier's features
            args = (
                None, _NO_NAMES, self._anonymous_features, request_id, correlation_id, trace,
                thread_id, run_id, ws_id, _time(),
            )  # fmt: skip
        # The request's frame (see ctxvars_mw.current): its pending context and its cleanups.
        stack: list[Cleanup] = []
        if self._trust_baggage:
            built = apply_incoming(_request_context(*args), headers)
            ctx: _Pending = [built, None, None, stack, headers]
        else:
            ctx = [None, _request_context, args, stack, headers]

        started = False
        id_names = self._id_names
        # Plain functions handing back send's awaitable: no coroutine of our own per message
        # (ASGI only asks that send(message) be awaitable).
        if scope_type == "http":

            def send_with_ids(message: Message) -> Awaitable[None]:
                nonlocal started
                if not started and message["type"] == "http.response.start":
                    started = True
                    headers = list(message.get("headers", ()))
                    for name, _ in headers:  # _with_ids(), inlined for the usual case
                        if name in id_names or not name.islower():
                            headers = _without_ids(headers, id_names)
                            break
                    headers += id_headers
                    message["headers"] = headers
                return send(message)

        else:

            def send_with_ids(message: Message) -> Awaitable[None]:
                nonlocal started
                kind = message["type"]
                if kind == "websocket.accept":
                    started = True
                    if subprotocol_token and message.get("subprotocol") is None:
                        message["subprotocol"] = "bearer"
                    message["headers"] = _with_ids(message.get("headers", ()), id_headers, id_names)
                elif kind == "websocket.http.response.start":  # the app's denial response
                    started = True
                    message["headers"] = _with_ids(message.get("headers", ()), id_headers, id_names)
                elif kind == "websocket.close":
                    started = True
                return send(message)

        ctx_token = _current.set(ctx)
        try:
            await self.app(scope, receive, send_with_ids)
        except (AuthenticationError, PermissionDeniedError) as exc:
            if started:
                raise
            await _reject(scope, receive, send, exc, id_headers, None, False)
        except Exception:
            if started or scope_type != "http":
                raise
            await _send_500(send, id_headers)
            raise
        finally:
            try:
                if stack:
                    await run_cleanups(stack)
            finally:
                _current.reset(ctx_token)
                stack.append(_closed)

    # -- authentication ---------------------------------------------------------------------

    async def _enter_caller(
        self, scope: Scope, receive: Receive, send: Send, exchange: _Exchange
    ) -> bool:
        """The C path with an authenticator: find the caller, as the Python path does, and
        enter the request as them; False when the request was refused (the answer sent)."""
        auth = exchange.authorization
        assert auth is not None
        try:
            identity, digest = self._cached(auth)
            if identity is None:
                identity, _ = await self._identify(scope, auth, None, digest)
            if identity is None:
                exchange.enter(None, _NO_NAMES, self._anonymous_features)
                return True
            permissions, features = self._resolve(identity)
            if identity.session_id is not None and self.session_store is not None:
                await self._check_session(identity.session_id, identity.user_id)
        except HTTPError as exc:
            await _reject(scope, receive, send, exc, exchange.id_headers, bool(auth), True)
            return False
        exchange.enter(identity, permissions, features)
        return True

    def _cached(self, auth_headers: list[bytes]) -> tuple[Identity | None, bytes | None]:
        """The usual http request: one Authorization header, a bearer token. A token whose
        digest the verified-token cache holds passed every check when it was verified (the
        same bytes), so a hit needs nothing more; a miss takes the full path with the digest
        (of the token it will find). Returns the cached identity (or None) and the digest."""
        jwt = self._jwt
        if jwt is not None and len(auth_headers) == 1 and auth_headers[0][:7].lower() == b"bearer ":
            digest = _sha256(auth_headers[0][7:].strip(b" ")).digest()
            return jwt._cache.get(digest), digest
        return None, None

    def _find_token(
        self, scope: Scope, auth_headers: list[bytes], protocols: bytes | None
    ) -> tuple[str | None, bool]:
        """The bearer token and whether it came through the websocket subprotocol."""
        found: list[bytes] = []
        if len(auth_headers) > 1:
            raise InvalidRequestError("The Authorization header was sent more than once.")
        if auth_headers:
            value = auth_headers[0]
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer":
                found.append(credentials.strip(b" "))
        from_subprotocol = False
        if scope["type"] == "websocket":
            if protocols is not None:
                parts = [p.strip() for p in protocols.split(b",")]
                if len(parts) >= 2 and parts[0].lower() == b"bearer":
                    found.append(parts[1])
                    from_subprotocol = True
            if self._query_param is not None:
                query = Connection(scope).query_params.get(self._query_param)
                if query is not None:
                    # parse_qsl percent-decodes as UTF-8: a value may hold any character,
                    # so encode it back as UTF-8 (latin-1 raised, i.e. a 500).
                    found.append(query.encode("utf-8"))
        if len(found) > 1:
            raise InvalidRequestError("The access token was sent in more than one way.")
        if not found:
            return None, False
        body = found[0].rstrip(b"=")
        if not body or body.translate(None, _TOKEN_CHARS):
            raise InvalidTokenError("The access token is malformed.")
        return found[0].decode("ascii"), from_subprotocol

    async def _identify(
        self,
        scope: Scope,
        auth_headers: list[bytes],
        protocols: bytes | None,
        digest: bytes | None,
    ) -> tuple[Identity | None, bool]:
        """Find the token and authenticate it: the caller's identity (None: no credentials)
        and whether the token came through the websocket subprotocol. ``digest``, when given,
        is the token's, computed by the caller."""
        token, from_subprotocol = self._find_token(scope, auth_headers, protocols)
        jwt = self._jwt
        if jwt is not None and token is not None:
            # JWTAuthenticator as is: no Connection and no call through authenticate(); a
            # miss is verified with the digest already computed.
            digest, identity = jwt._lookup(token, digest)
            if identity is None:
                identity = await self._verify_jwt(jwt, token, digest)
            return identity, from_subprotocol
        return await self._authenticate(scope, token), from_subprotocol

    async def _authenticate(self, scope: Scope, token: str | None) -> Identity | None:
        assert self.authenticator is not None
        try:
            identity = await self.authenticator.authenticate(Connection(scope, token))
        except HTTPError:
            raise
        except Exception as exc:
            raise _unverifiable(exc) from None
        if identity is None:
            if self.require_authentication and not self._is_exempt(scope.get("path", "")):
                raise AuthenticationRequiredError()
            return None
        if not isinstance(identity, Identity):
            logger.error("authenticator returned %s, not an Identity", type(identity).__name__)
            raise InvalidTokenError("The credentials could not be verified.")
        return identity

    @staticmethod
    async def _verify_jwt(jwt: JWTAuthenticator, token: str, digest: bytes) -> Identity:
        """A token the JWT cache does not hold, verified as ``authenticate()`` would."""
        try:
            return await jwt._verify_uncached(token, digest)
        except HTTPError:
            raise
        except Exception as exc:
            raise _unverifiable(exc) from None

    def _resolve(self, identity: Identity) -> tuple[frozenset[str], frozenset[str]]:
        """Validate ``identity``'s ids and resolve its permissions and features, once.

        Authenticators with a verified-token cache hand back the same Identity object on
        every hit, so the result is memoised by object identity (the entry holds the
        Identity, so its id cannot be reused while it is cached) and by the id rules that
        accepted its ids (rules made current later are applied again).
        """
        rules = get_id_rules()
        hit = self._resolved.get(id(identity))
        if hit is not None and hit[0] is identity and hit[1] is rules:
            return hit[2], hit[3]
        if not isinstance(identity.user_id, str) or not is_valid_id(identity.user_id, rules):
            raise InvalidTokenError("The token's subject is not a valid user id.")
        if identity.session_id is not None and not is_valid_id(identity.session_id, rules):
            raise InvalidTokenError("The token's session id is malformed.")
        permissions, features = self.policy.resolve(identity.roles, identity.tier or Tier.FREE)
        if identity.permissions or identity.scopes:
            permissions = permissions | identity.permissions | identity.scopes
        remember(
            self._resolved, id(identity), (identity, rules, permissions, features), _RESOLVED_MAX
        )
        return permissions, features

    async def _check_session(self, session_id: str, user_id: str) -> None:
        assert self.session_store is not None
        try:
            session = await self.session_store.touch(session_id)
        except Exception as exc:
            # A store that wraps its backend's error (ServiceUnavailableError from redis)
            # is logged with the underlying cause's type, which says what went wrong.
            cause = type(exc.__cause__ or exc).__name__
            if self.session_failure == "open":
                logger.warning("session store unavailable (%s); failing open as configured", cause)
                return
            logger.error("session store unavailable (%s); refusing authenticated requests", cause)
            raise ServiceUnavailableError(
                "The session service is temporarily unavailable.", retry_after=self.retry_after
            ) from None
        if session is None:
            raise InvalidTokenError("The session has expired or was revoked.")
        if session.user_id != user_id:
            raise InvalidTokenError("The session does not belong to this token's subject.")

    def _is_exempt(self, path: str) -> bool:
        return path in self._exact_exempt or (
            bool(self._prefix_exempt) and path.startswith(self._prefix_exempt)
        )


def _unverifiable(exc: Exception) -> InvalidTokenError:
    """Fail closed on an authenticator's unexpected error; log its type, never its text."""
    logger.error("authenticator raised %s; the request is refused", type(exc).__name__)
    return InvalidTokenError("The credentials could not be verified.")


def _accept_id(raw: bytes, kind: str, rules: IdRules) -> str | None:
    """The incoming id if it is well-formed and not a placeholder; never logs the value."""
    # The header pattern already rules out whitespace, control characters and overlong
    # values, so of is_valid_id's checks only the placeholder rules are left (and one-off
    # request ids stay out of its memo, which they would only churn).
    if raw and _header_id_match(raw) is not None:
        value = raw.decode("ascii")
        if not rules.is_placeholder(value):
            return value
    logger.debug("replaced an invalid incoming %s id header with a generated id", kind)
    return None


def _request_context(
    identity: Identity | None,
    permissions: frozenset[str],
    features: frozenset[str],
    request_id: str | bytes,
    correlation_id: str | bytes,
    trace: bytes | str | None,
    thread_id: str | None,
    run_id: str | None,
    ws_id: str | bytes | None,
    created: float,
) -> UserExecutionContext:
    """Build a request's pending context (see ``ctxvars_mw.current``) from what the middleware
    decided: the caller's identity (None: anonymous), resolved permissions and features, the
    accepted ids (an id taken from its header as is comes as its bytes: checked, decoded
    only here), the raw ``traceparent`` (or an outer middleware's trace id), and the
    request's start time. Thread and run ids not given are drawn here."""
    if isinstance(request_id, bytes):
        same = correlation_id is request_id
        request_id = request_id.decode("ascii")
        if same:
            correlation_id = request_id
    if isinstance(correlation_id, bytes):
        correlation_id = correlation_id.decode("ascii")
    if isinstance(ws_id, bytes):  # a websocket's id is its request id
        ws_id = request_id
    if thread_id is None or run_id is None:
        thread_id, run_id, _ = generate_ids()
    trace_id = _trace_id(trace) if isinstance(trace, bytes) else trace
    created_at = _from_timestamp(created, _UTC)
    if identity is None:
        return request_context(
            ANONYMOUS_USER_ID, thread_id, run_id, request_id, correlation_id, trace_id, ws_id,
            None, Tier.FREE, _NO_NAMES, _NO_NAMES, features, EMPTY, None, False, created_at,
        )  # fmt: skip
    return request_context(
        identity.user_id, thread_id, run_id, request_id, correlation_id, trace_id, ws_id,
        identity.session_id, identity.tier or Tier.FREE, identity.roles, permissions, features,
        identity.claims or EMPTY, identity.auth_method, True, created_at,
    )  # fmt: skip


def _trace_id(raw: bytes) -> str | None:
    """The trace id of a valid W3C ``traceparent``: the usual version-00 form is matched on
    the raw bytes; anything else goes through :func:`parse_traceparent` (same verdicts)."""
    match = _TRACEPARENT_00(raw)
    if match is None:
        parsed = parse_traceparent(raw)
        return None if parsed is None else parsed[0]
    trace, parent = match.groups()
    if trace == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace.decode("ascii")


def _with_ids(
    headers: Iterable[tuple[bytes, bytes]],
    id_headers: list[tuple[bytes, bytes]],
    names: frozenset[bytes],
) -> list[tuple[bytes, bytes]]:
    """A new list: ``headers`` with ours set (any value the app set for our ``names``, the
    lowercase names of ``id_headers``, is dropped). The http send wrapper inlines this.

    ASGI asks for lowercase response header names; an app that sends another case is still
    caught, at the price of a ``lower()`` for its non-lowercase names only.
    """
    out = list(headers)
    for name, _ in out:
        if name in names or not name.islower():
            out = _without_ids(out, names)
            break
    out += id_headers
    return out


def _without_ids(
    headers: list[tuple[bytes, bytes]], names: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """``headers`` without any of ``names`` (lowercase), in whatever case the app sent them."""
    return [(k, v) for k, v in headers if k.lower() not in names]


async def _reject(
    scope: Scope,
    receive: Receive,
    send: Send,
    exc: HTTPError,
    id_headers: list[tuple[bytes, bytes]],
    bearer: bool | None,
    before_app: bool,
) -> None:
    if before_app and scope["type"] == "websocket":
        # The app never ran: take the handshake's connect message before refusing it.
        message = await receive()
        if message["type"] != "websocket.connect":
            return
    logger.info("request refused: %s %s", exc.status_code, exc.error)
    await send_error(scope, receive, send, exc, id_headers, bearer=bearer)


async def _send_500(send: Send, id_headers: list[tuple[bytes, bytes]]) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_JSON_500)).encode("ascii")),
        *id_headers,
    ]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": _JSON_500})


def _exempt(paths: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    if isinstance(paths, str):
        raise ConfigurationError("exempt_paths must be a collection of paths, not one string")
    exact: set[str] = set()
    prefixes: list[str] = []
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError("exempt_paths entries must be paths starting with '/'")
        if path.endswith("*"):
            prefixes.append(path[:-1])
        else:
            exact.add(path)
    return frozenset(exact), tuple(prefixes)
