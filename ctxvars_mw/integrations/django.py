"""Django glue: wrap the ASGI application, and answer our errors from views as JSON.

Put the middleware around Django's ASGI application, outermost::

    # asgi.py
    application = ContextMiddleware(get_asgi_application(), authenticator=...)

Sync and async views then see the request's context (``get_context()``): Django runs async
views in a task and sync views through ``sync_to_async``, both of which copy the context.

Django turns every exception a view raises into a response of its own (a 500 for ours), so
the middleware never sees them. Add :class:`ErrorMiddleware` to ``MIDDLEWARE`` and the
``requires_*`` decorators give the same 401/403 JSON responses (and 400/503) as the middleware.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from ..errors import (
    AuthenticationError,
    HTTPError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    ServiceUnavailableError,
)
from ..responses import error_body, error_headers, has_bearer_token

__all__ = ["ErrorMiddleware", "error_response"]

_HANDLED = (
    AuthenticationError,
    PermissionDeniedError,
    InvalidRequestError,
    RateLimitedError,
    ServiceUnavailableError,
)

GetResponse = Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]


def error_response(request: HttpRequest, exc: HTTPError) -> HttpResponse:
    """The JSON response :class:`~ctxvars_mw.ContextMiddleware` would send for ``exc``."""
    authorization = request.headers.get("Authorization")
    scope = (
        {"headers": [(b"authorization", authorization.encode("latin-1"))]} if authorization else {}
    )
    response = HttpResponse(
        json.dumps(error_body(exc), separators=(",", ":")).encode("utf-8"),
        status=exc.status_code,
        content_type="application/json",
    )
    for name, value in error_headers(exc, bearer=has_bearer_token(scope)):
        response[name.decode("latin-1")] = value.decode("latin-1")
    return response


class ErrorMiddleware:
    """Django middleware: our HTTP-facing errors raised by views become JSON responses.

    ``AuthenticationError`` → 401, ``PermissionDeniedError`` → 403, ``InvalidRequestError`` →
    400, ``RateLimitedError`` → 429, ``ServiceUnavailableError`` → 503 — the same bodies and
    headers as the ASGI middleware. Other exceptions are left to Django. Works in sync and
    async stacks.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self._async:
            return self.__acall__(request)
        return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        """The async path: pass the request on without a thread hop."""
        response = self.get_response(request)
        assert not isinstance(response, HttpResponseBase)
        return await response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """Answer our errors; return None (let Django handle it) for anything else."""
        if isinstance(exception, _HANDLED):
            return error_response(request, exception)
        return None
