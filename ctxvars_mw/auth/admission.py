"""Who the caller is, and whether they may enter: ContextMiddleware's one authentication step.

:meth:`Admission.admit` runs these rules in order, each a small method; before it, on an HTTP
request, :meth:`Admission.admit_known` answers a bearer token the authenticator verified before
(steps 2 and 3 with nothing to await) and leaves everything else to ``admit``:

1. **The token** (:meth:`~Admission.credentials`): ``Authorization: Bearer``, on a websocket
   also the ``bearer`` subprotocol and the opt-in query parameter. Credentials sent more than
   one way, or two ``Authorization`` headers, are a 400; a token outside RFC 6750's characters
   a 401.
2. **The identity**: first the authenticator's public ``cached(token)`` when it has one (a
   token it verified before: no coroutine, no I/O), else its ``authenticate(conn)``. None means no
   credentials: anonymous, or a 401 where authentication is required and the path is not
   exempt. An authenticator that raises anything but our HTTP errors is a 401 (fail closed),
   logged by error type only.
3. **The caller** (:meth:`~Admission.caller`): a validated context holding the identity's user,
   session, tier, roles and claims, with the policy's permissions and features — the template
   every request by that caller is derived from. Authenticators with a verified-token cache
   hand back the same :class:`Identity` on every hit, so it is built once per identity (and per
   id rules in force).
4. **The session** (:meth:`~Admission.check_session`): when a session store is configured and
   the token names a session, it must be active and belong to the token's subject. An
   unreachable store is a 503 (or, with ``session_failure="open"``, lets the token through),
   logged once when the outage starts and once when it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from .._memo import remember
from ..context import CallerTemplate, UserExecutionContext, caller_template
from ..errors import (
    AuthenticationRequiredError,
    HTTPError,
    InvalidContextError,
    InvalidRequestError,
    InvalidTokenError,
    ServiceUnavailableError,
)
from ..ids import IdRules, get_id_rules, is_valid_id
from ..policy import Policy
from ..tier import Tier
from ..types import Scope
from .base import Authenticator, Connection, Identity
from .sessions import SessionStore

__all__ = ["REPEATED", "Admission"]

logger = logging.getLogger("ctxvars_mw")

#: What the middleware passes for a header that was sent more than once.
REPEATED = b"\x00repeated"
# RFC 6750 b64token: one or more of these, then any number of "=".
_TOKEN_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
_TOKEN_TABLE = bytes(c if c in _TOKEN_CHARS else c ^ 1 for c in range(256))  # see _check_token
_CALLERS_MAX = 4096
#: What :meth:`Admission.admit_known` answers for a bearer token its authenticator's cache
#: does not hold.
NOT_CACHED: Any = object()


def _cache_of(authenticator: Authenticator | None) -> Callable[[bytes], Identity | None] | None:
    """The authenticator's public ``cached(token)``: the identity of a token it verified
    before, answered without awaiting ``authenticate``; here a function of the token's ASCII
    bytes (handed over as they are when the class defining ``cached`` says it takes them, with
    ``cached_takes_bytes = True``, else decoded). None when it has none, or when a subclass
    overrides ``authenticate`` below the class that defines ``cached`` (the override must see
    every request)."""
    cached = getattr(authenticator, "cached", None)
    if cached is None or not callable(cached):
        return None
    mro = type(authenticator).__mro__
    owner = next((c for c in mro if "cached" in vars(c)), None)
    verifier = next((c for c in mro if "authenticate" in vars(c)), None)
    if owner is None or verifier is None or not issubclass(owner, verifier):
        return None
    if vars(owner).get("cached_takes_bytes") is True:
        return cached  # type: ignore[no-any-return]
    return lambda raw: cached(raw.decode("ascii"))


def _refuse(what: str, exc: Exception) -> NoReturn:
    """Fail closed on an authenticator that raised something other than our HTTP errors: a
    401, logged by the exception's type only (its text may hold the credentials)."""
    logger.error("%s %s; the request is refused", what, type(exc).__name__)
    raise InvalidTokenError("The credentials could not be verified.") from None


def _check_token(raw: bytes) -> None:
    """Refuse a token outside RFC 6750's characters (``translate`` hands back the very same
    object only when no byte is outside them)."""
    body = raw.rstrip(b"=")
    if not body or body.translate(_TOKEN_TABLE) is not body:
        raise InvalidTokenError("The access token is malformed.")


def _bearer(authorization: bytes) -> bytes | None:
    """The credentials of an ``Authorization: Bearer`` header (spaces around them dropped);
    None for another scheme, and so for :data:`REPEATED`."""
    scheme, _, credentials = authorization.partition(b" ")
    return credentials.strip(b" ") if scheme.lower() == b"bearer" else None


def _token_text(raw: bytes) -> str:
    """The token as text; a non-ASCII one is malformed."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidTokenError("The access token is malformed.") from None


class Admission:
    """The caller of a request and whether they may enter (see the module docstring).

    ``anonymous`` is the context template of callers without credentials: user
    ``"anonymous"``, tier FREE and the free tier's features.
    """

    def __init__(
        self,
        authenticator: Authenticator | None,
        *,
        policy: Policy,
        require_authentication: bool,
        exempt_paths: Iterable[str],
        session_store: SessionStore | None,
        session_failure: str,
        retry_after: int,
        query_param: str | None,
    ) -> None:
        self.authenticator = authenticator
        self.policy = policy
        self.require_authentication = require_authentication
        self.session_store = session_store
        self.fail_open = session_failure == "open"
        self.retry_after = retry_after
        self.query_param = query_param
        exact = {p for p in exempt_paths if not p.endswith("*")}
        self.exempt_exact = frozenset(exact)
        self.exempt_prefixes = tuple(p[:-1] for p in exempt_paths if p.endswith("*"))
        self.anonymous = caller_template(
            UserExecutionContext.anonymous(features=policy.features_for_tier(Tier.FREE))
        )
        #: The authenticator's ``cached(token)`` (see :func:`_cache_of`), or None.
        self.cached = _cache_of(authenticator)
        # A cached token admits with nothing to await unless a session store is to be asked.
        self._known_first = self.cached is not None and session_store is None
        self._callers: dict[int, tuple[Identity, IdRules, CallerTemplate]] = {}
        self._outage = 0  # requests refused (or let through) since the store stopped answering

    def admit_known(self, scope: Scope, authorization: bytes | None) -> CallerTemplate | None:
        """The caller of an HTTP request whose bearer token the authenticator verified before
        (its ``cached(token)``), found without awaiting anything; :data:`NOT_CACHED` when the
        cache was asked and does not hold the token (``admit(..., cache_asked=True)`` then
        verifies it without asking again); None when :meth:`admit` is to decide: no bearer
        token, a websocket (its other token sources), a repeated header or a non-ASCII token
        (refused there), or a session store to ask. Raises what ``cached``
        refuses (a token over its size limit, an authenticator cache that fails)."""
        if not self._known_first or authorization is None or scope["type"] != "http":
            return None
        raw = _bearer(authorization)
        if raw is None or not raw.isascii():
            return None
        identity = self.known(raw)
        return NOT_CACHED if identity is None else self.caller(identity)

    async def admit(
        self, scope: Scope, authorization: bytes | None, *, cache_asked: bool = False
    ) -> tuple[CallerTemplate, str | None]:
        """The caller's context template, and the websocket subprotocol to accept with (the
        ``bearer`` marker exactly as the client offered it, when the token came that way).
        Raises the HTTP error that refuses the request. Only for an admission with an
        authenticator: without one every caller is :attr:`anonymous`, and ContextMiddleware
        does not call this. ``cache_asked``: :meth:`admit_known` found the token not cached
        (the cache is not asked twice)."""
        raw, subprotocol = self.credentials(scope, authorization)
        identity = None
        if raw is None:
            token = None
        else:
            token = _token_text(raw)
            if self.cached is not None and not cache_asked:
                identity = self.known(raw)
        if identity is None:
            if raw is not None:
                _check_token(raw)
            identity = await self.identify(scope, token)
            if identity is None:
                return self.anonymous, None
        caller = self.caller(identity)
        if identity.session_id is not None and self.session_store is not None:
            await self.check_session(identity.session_id, identity.user_id)
        return caller, subprotocol

    def credentials(
        self, scope: Scope, authorization: bytes | None
    ) -> tuple[bytes | None, str | None]:
        """The bearer token as sent, and the subprotocol marker it came with (websockets)."""
        if authorization is REPEATED:
            raise InvalidRequestError("The Authorization header was sent more than once.")
        bearer = None if authorization is None else _bearer(authorization)
        if scope["type"] != "websocket":
            return bearer, None
        found = [] if bearer is None else [bearer]
        subprotocol = None
        offered = list(scope.get("subprotocols") or ())
        for i, name in enumerate(offered[:-1]):
            if isinstance(name, str) and name.lower() == "bearer":
                subprotocol = name
                found.append(str(offered[i + 1]).encode("utf-8"))
        if self.query_param is not None:
            value = Connection(scope).query_params.get(self.query_param)
            if value is not None:
                found.append(value.encode("utf-8"))
        if len(found) > 1:
            raise InvalidRequestError("The access token was sent in more than one way.")
        return (found[0], subprotocol) if found else (None, None)

    def known(self, raw: bytes) -> Identity | None:
        """The authenticator's cached identity of the ASCII token ``raw`` (its public
        ``cached(token)``, see :func:`_cache_of`), or None; one that raises anything but our
        HTTP errors refuses the token."""
        assert self.cached is not None
        try:
            identity = self.cached(raw)
        except HTTPError:
            raise
        except Exception as exc:
            _refuse("authenticator cache raised", exc)
        return identity if identity is None or isinstance(identity, Identity) else None

    async def identify(self, scope: Scope, token: str | None) -> Identity | None:
        """The authenticator's verdict on ``token``: an Identity, or None (no credentials)."""
        assert self.authenticator is not None
        try:
            identity = await self.authenticator.authenticate(Connection(scope, token))
        except HTTPError:
            raise
        except Exception as exc:
            _refuse("authenticator raised", exc)
        if identity is None:
            if self.require_authentication and not self.is_exempt(scope.get("path", "")):
                raise AuthenticationRequiredError()
            return None
        if not isinstance(identity, Identity):
            logger.error("authenticator returned %s, not an Identity", type(identity).__name__)
            raise InvalidTokenError("The credentials could not be verified.")
        return identity

    def caller(self, identity: Identity) -> CallerTemplate:
        """The context template of ``identity``'s caller (validated, policy resolved)."""
        rules = get_id_rules()
        hit = self._callers.get(id(identity))
        if hit is not None and hit[0] is identity and hit[1] is rules:
            return hit[2]
        if not isinstance(identity.user_id, str) or not is_valid_id(identity.user_id, rules):
            raise InvalidTokenError("The token's subject is not a valid user id.")
        if identity.session_id is not None and not is_valid_id(identity.session_id, rules):
            raise InvalidTokenError("The token's session id is malformed.")
        tier = identity.tier or Tier.FREE
        permissions, features = self.policy.resolve(identity.roles, tier)
        if identity.permissions or identity.scopes:
            permissions = permissions | identity.permissions | identity.scopes
        try:
            caller = caller_template(
                UserExecutionContext(
                    user_id=identity.user_id,
                    session_id=identity.session_id,
                    tier=tier,
                    roles=identity.roles,
                    permissions=permissions,
                    features=features,
                    scopes=identity.scopes,
                    claims=identity.claims,
                    auth_method=identity.auth_method,
                    client_id=identity.client_id,
                )
            )
        except InvalidContextError:
            logger.info("an authenticated identity does not make a valid context; refused")
            raise InvalidTokenError("The credentials could not be verified.") from None
        # The entry holds the Identity, so its id() cannot be reused while it is remembered.
        remember(self._callers, id(identity), (identity, rules, caller), _CALLERS_MAX)
        return caller

    async def check_session(self, session_id: str, user_id: str) -> None:
        """Refuse the request unless ``session_id`` is active and ``user_id``'s."""
        assert self.session_store is not None
        try:
            session = await self.session_store.touch(session_id)
        except Exception as exc:
            self._store_failed(exc)
            if self.fail_open:
                return
            raise ServiceUnavailableError(
                "The session service is temporarily unavailable.", retry_after=self.retry_after
            ) from None
        if self._outage:
            logger.warning(
                "session store answers again; %d request(s) met the outage", self._outage
            )
            self._outage = 0
        if session is None:
            raise InvalidTokenError("The session has expired or was revoked.")
        if session.user_id != user_id:
            raise InvalidTokenError("The session does not belong to this token's subject.")

    def _store_failed(self, exc: Exception) -> None:
        """Count a request that met an unreachable store; log the outage's start once, with
        the underlying cause's type (a store wraps its backend's error), never its text."""
        if not self._outage:
            cause = type(exc.__cause__ or exc).__name__
            if self.fail_open:
                logger.warning("session store unavailable (%s); failing open as configured", cause)
            else:
                logger.error(
                    "session store unavailable (%s); refusing authenticated requests", cause
                )
        self._outage += 1

    def is_exempt(self, path: str) -> bool:
        """True when ``path`` is exempt from ``require_authentication``."""
        return path in self.exempt_exact or (
            bool(self.exempt_prefixes) and path.startswith(self.exempt_prefixes)
        )
