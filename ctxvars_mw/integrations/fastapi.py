"""FastAPI glue: the current context as a dependency, permission checks as dependencies.

::

    from fastapi import FastAPI
    from ctxvars_mw.integrations.fastapi import CurrentContext, require_tier, setup

    app = FastAPI()
    setup(app, authenticator=JWTAuthenticator(...))   # middleware + exception handlers

    @app.get("/reports", dependencies=[require_tier("business")])
    async def reports(ctx: CurrentContext) -> dict[str, str]:
        return {"user": ctx.user_id}

Every dependency here declares the bearer security scheme (:data:`bearer_scheme`, an
``HTTPBearer(auto_error=False)``), so the OpenAPI schema and ``/docs`` show it. They do not
verify the token themselves: :class:`~ctxvars_mw.ContextMiddleware` already did, and they
read the context it made current. The middleware may be added with ``app.add_middleware``
(or :func:`setup`) or wrap the app (``ContextMiddleware(app, ...)``); in the latter case call
:func:`install_exception_handlers` so that our 401/403 errors are not answered as 500s.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Security
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from ..context import UserExecutionContext
from ..current import get_context
from ..errors import ConfigurationError
from ..middleware import ContextMiddleware
from ..permissions import (
    depends_authenticated,
    depends_feature,
    depends_permission,
    depends_role,
    depends_tier,
)
from ..ratelimit.guards import depends_quota, depends_rate_limit
from ..tier import Tier
from .starlette import install_exception_handlers

__all__ = [
    "AuthenticatedContext",
    "CurrentContext",
    "ErrorBody",
    "bearer_scheme",
    "current_context",
    "depends_authenticated",
    "depends_feature",
    "depends_permission",
    "depends_role",
    "depends_tier",
    "document_error_responses",
    "install_exception_handlers",
    "require_authenticated",
    "require_feature",
    "require_permission",
    "require_quota",
    "require_rate_limit",
    "require_role",
    "require_tier",
    "setup",
]

#: The bearer security scheme every dependency here declares (for OpenAPI; never rejects).
bearer_scheme = HTTPBearer(
    auto_error=False,
    bearerFormat="JWT",
    description="A bearer token, verified by ctxvars_mw's ContextMiddleware.",
)

_Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]
_Check = Callable[[], Coroutine[Any, Any, UserExecutionContext]]


async def current_context(_credentials: _Credentials) -> UserExecutionContext:
    """The request's context (anonymous when no credentials were sent).

    Raises :class:`~ctxvars_mw.ContextNotSetError` when ContextMiddleware is not installed.
    """
    return get_context()


#: ``ctx: CurrentContext`` — the request's context, anonymous or not.
CurrentContext = Annotated[UserExecutionContext, Depends(current_context)]


class ErrorBody(BaseModel):
    """The JSON body of ctxvars_mw's 401 and 403 answers (RFC 6750 error codes)."""

    error: str
    error_description: str
    required: list[str] | None = None


_DESCRIPTIONS = {
    401: "No valid credentials (`authentication_required` or `invalid_token`).",
    403: "Authenticated, but without what the endpoint requires (`insufficient_scope`, "
    "with `required`).",
    429: "The caller's tier allows no more for now (`rate_limited` or `quota_exceeded`); "
    "`Retry-After` says when to try again, `RateLimit-Policy` and `RateLimit` what is left.",
}


def _secured(check: _Check, *statuses: int) -> Any:
    """``Security(...)`` running ``check`` behind the bearer scheme; it can answer
    ``statuses`` (see :func:`document_error_responses`)."""

    async def dependency(_credentials: _Credentials) -> UserExecutionContext:
        return await check()

    dependency.ctxvars_responses = statuses  # type: ignore[attr-defined]
    return Security(dependency)


def require_authenticated() -> Any:
    """A dependency: the context if authenticated, else 401."""
    return _secured(depends_authenticated(), 401)


def require_tier(tier: Tier | str) -> Any:
    """A dependency: the context if its tier is ``tier`` or above (401 anonymous, 403 lower)."""
    return _secured(depends_tier(tier), 401, 403)


def require_role(*roles: str, any_: bool = False) -> Any:
    """A dependency: the context if it holds every role (``any_=True``: one), else 401/403."""
    return _secured(depends_role(*roles, any_=any_), 401, 403)


def require_permission(*permissions: str, any_: bool = False) -> Any:
    """A dependency: the context if it holds the permissions (wildcards count), else 401/403."""
    return _secured(depends_permission(*permissions, any_=any_), 401, 403)


def require_feature(*features: str, any_: bool = False) -> Any:
    """A dependency: the context if its tier grants the features, else 401/403."""
    return _secured(depends_feature(*features, any_=any_), 401, 403)


def require_quota(name: str, amount: int = 1) -> Any:
    """A dependency: spend ``amount`` of the caller's quota ``name``, then the context; 429
    when the quota is used up (see :func:`ctxvars_mw.consume`)."""
    return _secured(depends_quota(name, amount), 429)


def require_rate_limit(table: Mapping[Any, Any], *, name: str) -> Any:
    """A dependency: count the call against a rate limit of its own (tier → rates, counted
    per caller under ``name``, see :func:`ctxvars_mw.rate_limit`), then the context; 429
    past it."""
    return _secured(depends_rate_limit(table, name=name), 429)


#: ``ctx: AuthenticatedContext`` — the request's context; 401 for anonymous callers.
AuthenticatedContext = Annotated[UserExecutionContext, require_authenticated()]


def document_error_responses(app: FastAPI, *, metered: bool = False) -> None:
    """Make ``app``'s OpenAPI schema show the 401/403/429 answers of our dependencies.

    Every operation that depends (directly, or through another dependency) on one of the
    ``require_*`` dependencies or :data:`AuthenticatedContext` gets its 401 (and, for the
    checks that can refuse an authenticated caller, 403) response with the
    :class:`ErrorBody` model, so ``/docs`` shows what each endpoint can answer. Responses an
    operation declares itself are kept. With ``metered`` (the middleware meters every
    request), every operation gets the 429 too. :func:`setup` calls this.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None  # FastAPI builds the schema once, then caches it
        schema = generate()
        if fresh:
            _add_error_responses(app, schema, {429} if metered else set())
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_responses(app: FastAPI, schema: dict[str, Any], everywhere: set[int]) -> None:
    """Add the error responses (and the ErrorBody schema) to ``schema``, in place."""
    reference = {"$ref": "#/components/schemas/ErrorBody"}
    used = False
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        statuses = _statuses(route.dependant) | everywhere
        for method in route.methods or ():
            operation = schema.get("paths", {}).get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses):
                if str(status) not in responses:
                    used = True
                    responses[str(status)] = {
                        "description": _DESCRIPTIONS[status],
                        "content": {"application/json": {"schema": reference}},
                    }
    if used:
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.setdefault(
            "ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        )


def _statuses(dependant: Dependant) -> set[int]:
    """The error statuses our dependencies in ``dependant``'s tree can answer."""
    found = set(getattr(dependant.call, "ctxvars_responses", ()))
    for sub in dependant.dependencies:
        found |= _statuses(sub)
    return found


def setup(app: FastAPI, *, add_middleware: bool = True, **middleware_options: Any) -> None:
    """Install our exception handlers on ``app``, document our 401/403/429 answers in its
    OpenAPI schema (:func:`document_error_responses`) and (by default) add ContextMiddleware.

    ``middleware_options`` are :class:`~ctxvars_mw.ContextMiddleware`'s keyword options;
    they are checked now (bad option → :class:`~ctxvars_mw.ConfigurationError`), not at the
    first request. With ``add_middleware=False`` only the handlers are installed — for apps
    that are wrapped instead: ``app = ContextMiddleware(fastapi_app, ...)``.
    """
    install_exception_handlers(app)
    if add_middleware:
        checked = ContextMiddleware(app, **middleware_options)  # validates the options eagerly
        document_error_responses(app, metered=checked.limiter is not None)
        app.add_middleware(ContextMiddleware, **middleware_options)
        return
    if middleware_options:
        raise ConfigurationError("middleware options need add_middleware=True")
    document_error_responses(app)
