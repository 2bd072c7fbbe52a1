"""The errors of ctxvars_mw: one rooted tree.

::

    CtxvarsError
    ├── ConfigurationError (ValueError)          a bad option, caught at construction
    ├── InvalidContextError (ValueError)         a context that fails validation
    │   └── MaxDepthExceededError                a child past the maximum depth
    ├── ContextNotSetError (LookupError)         get_context() outside a request
    └── HTTPError                                the base of every error that is an HTTP answer
        ├── AuthenticationError              401     credentials are missing or bad
        │   ├── AuthenticationRequiredError  401     no credentials where they are required
        │   └── InvalidTokenError            401     a token that does not verify
        │       └── ExpiredTokenError        401     a token (or envelope) past its expiry
        ├── PermissionDeniedError            403     authenticated, but not allowed
        │   └── PermissionEscalationError    403     a child asked for more than its parent holds
        ├── InvalidRequestError              400     credentials sent more than one way
        ├── RateLimitedError                 429     the caller's request rate is used up
        │   └── QuotaExceededError           429     a quota is used up for its period
        └── ServiceUnavailableError          503     a backing store (e.g. Redis) is unreachable

Every :class:`HTTPError` carries ``status_code``, an OAuth ``error`` code (RFC 6750) and a
``description`` that is safe to show a client: never a token, never a raw header value. Catch
``HTTPError`` to answer all of them in one handler.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "AuthenticationError",
    "AuthenticationRequiredError",
    "ConfigurationError",
    "ContextNotSetError",
    "CtxvarsError",
    "ExpiredTokenError",
    "HTTPError",
    "InvalidContextError",
    "InvalidRequestError",
    "InvalidTokenError",
    "MaxDepthExceededError",
    "PermissionDeniedError",
    "PermissionEscalationError",
    "QuotaExceededError",
    "RateLimitedError",
    "ServiceUnavailableError",
]


class CtxvarsError(Exception):
    """The root of every error ctxvars_mw raises."""


class ConfigurationError(CtxvarsError, ValueError):
    """An option or policy is invalid; raised at construction, never at request time."""


class InvalidContextError(CtxvarsError, ValueError):
    """A UserExecutionContext failed validation."""


class MaxDepthExceededError(InvalidContextError):
    """A child context would be deeper than the maximum operation depth."""


class ContextNotSetError(CtxvarsError, LookupError):
    """No UserExecutionContext is current (outside a request or ``use_context`` block)."""


class HTTPError(CtxvarsError):
    """The base of the errors that are an HTTP answer: ``status_code``, ``error`` (the OAuth
    error code) and ``description`` (safe to show the client)."""

    status_code: int = 500
    error: str = "server_error"
    default_description: str = "An error occurred."

    def __init__(self, description: str | None = None) -> None:
        self.description = description or self.default_description
        super().__init__(self.description)


class AuthenticationError(HTTPError):
    """Credentials are missing or invalid (HTTP 401)."""

    status_code = 401
    error = "invalid_token"
    default_description = "The access token is invalid."


class AuthenticationRequiredError(AuthenticationError):
    """No credentials were sent where they are required (HTTP 401)."""

    error = "authentication_required"
    default_description = "Authentication is required."


class InvalidTokenError(AuthenticationError):
    """A token is malformed, unverifiable or refused (HTTP 401)."""


class ExpiredTokenError(InvalidTokenError):
    """A token or signed envelope has expired (HTTP 401)."""

    default_description = "The access token has expired."


class PermissionDeniedError(HTTPError):
    """The caller is authenticated but lacks what is required (HTTP 403)."""

    status_code = 403
    error = "insufficient_scope"
    default_description = "The request requires higher privileges."

    def __init__(self, description: str | None = None, *, required: Iterable[str] = ()) -> None:
        self.required: tuple[str, ...] = tuple(required)
        super().__init__(description)


class PermissionEscalationError(PermissionDeniedError):
    """A child context asked for permissions its parent does not hold."""


class InvalidRequestError(HTTPError):
    """The request is malformed, e.g. credentials sent more than one way (HTTP 400)."""

    status_code = 400
    error = "invalid_request"
    default_description = "The request is malformed."


class RateLimitedError(HTTPError):
    """The caller's tier allows no more requests for now (HTTP 429): ``retry_after`` seconds
    until one would pass, and ``headers``, the IETF ``RateLimit-Policy`` and ``RateLimit``
    fields the answer carries."""

    status_code = 429
    error = "rate_limited"
    default_description = "Too many requests; retry later."

    def __init__(
        self,
        description: str | None = None,
        *,
        retry_after: int = 1,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.retry_after = retry_after
        self.headers: tuple[tuple[bytes, bytes], ...] = tuple(headers)
        super().__init__(description)


class QuotaExceededError(RateLimitedError):
    """A quota of the caller's tier is used up until its period ends (HTTP 429)."""

    error = "quota_exceeded"
    default_description = "The quota is used up for this period."


class ServiceUnavailableError(HTTPError):
    """A backing service needed to authenticate is unreachable (HTTP 503)."""

    status_code = 503
    error = "temporarily_unavailable"
    default_description = "The service is temporarily unavailable."

    def __init__(self, description: str | None = None, *, retry_after: int = 5) -> None:
        self.retry_after = retry_after
        super().__init__(description)
