"""The apps compared: one bare Starlette app, and the same app behind each middleware.

Every variant wraps a fresh copy of the same two-route Starlette app, outermost, so the
difference between a variant and ``bare`` is exactly what its middleware costs. The module
attributes ``bare``, ``ctxvars`` and ``correlation`` are what uvicorn serves in ``wrk_bench``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette_context import plugins
from starlette_context.middleware import RawContextMiddleware

from ctxvars_mw import ContextMiddleware, get_context_or_none
from ctxvars_mw.types import ASGIApp, Receive, Scope, Send

from . import tokens

_floor_var: ContextVar[Any] = ContextVar("bench.floor", default=None)


async def hello(request: Request) -> Response:
    """The benchmarked endpoint: what a trivial JSON-less handler costs."""
    return PlainTextResponse("ok")


async def whoami(request: Request) -> Response:
    """Used once per variant before timing, to check the context really was built."""
    ctx = get_context_or_none()
    return PlainTextResponse("-" if ctx is None else f"{ctx.user_id} {ctx.tier.value}")


async def hello_reads(request: Request) -> Response:
    """``hello`` that also reads the current context (which builds it, with ctxvars_mw)."""
    ctx = get_context_or_none()
    return PlainTextResponse("ok" if ctx is None or ctx.user_id else "")


def bare_app() -> Starlette:
    """The plain Starlette app every variant wraps."""
    return Starlette(routes=[Route("/", hello), Route("/whoami", whoami)])


def reading_app() -> Starlette:
    """The same app whose ``/`` endpoint reads the context: ctxvars_mw builds its context
    object on first use, so this is what a request that uses it costs."""
    return Starlette(routes=[Route("/", hello_reads), Route("/whoami", whoami)])


class FloorMiddleware:
    """The least a context middleware can do: set one ContextVar, call the app, reset it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" and scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        token = _floor_var.set(scope)
        try:
            await self.app(scope, receive, send)
        finally:
            _floor_var.reset(token)


class PyJWTFloorMiddleware(FloorMiddleware):
    """The floor plus PyJWT's own ``jwt.decode`` of the bearer token: what verifying a token
    costs inside a request path, for comparison with ctxvars_mw's uncached rows."""

    def __init__(self, app: ASGIApp, alg: str) -> None:
        super().__init__(app)
        self.decode = tokens.pyjwt_decoder(alg)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        claims = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                claims = self.decode(value[7:].decode("ascii"))
        token = _floor_var.set(claims)
        try:
            await self.app(scope, receive, send)
        finally:
            _floor_var.reset(token)


@dataclass(frozen=True)
class Variant:
    """One app to time: its name, how to build it, and the tokens its requests carry."""

    name: str
    label: str
    build: Callable[[], Any]
    token_alg: str = "HS256"
    fresh_tokens: bool = False
    #: Request headers of this variant's requests only, besides the common ones.
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _ctxvars_jwt(
    alg: str, cache_size: int | None, app: Callable[[], Any] = bare_app
) -> Callable[[], Any]:
    def build() -> Any:
        auth = tokens.jwt_authenticator(alg, cache_size=cache_size)
        return ContextMiddleware(app(), authenticator=auth)

    return build


def _starlette_context() -> Any:
    chosen = (plugins.RequestIdPlugin(), plugins.CorrelationIdPlugin())
    return RawContextMiddleware(bare_app(), plugins=chosen)


def variants(uncached: str) -> list[Variant]:
    """Every in-process variant, ``bare`` first. ``uncached`` is how uncached JWT rows defeat
    the token cache: ``"cache_size=0"`` or ``"fresh"`` (a new token per request)."""
    out = [
        Variant("bare", "bare Starlette", bare_app),
        Variant("floor", "floor: pure ASGI, one ContextVar", lambda: FloorMiddleware(bare_app())),
        Variant("ctxvars", "ctxvars_mw anonymous", lambda: ContextMiddleware(bare_app())),
        Variant(
            "ctxvars_read",
            "ctxvars_mw anonymous, endpoint reads the context",
            lambda: ContextMiddleware(reading_app()),
        ),
        Variant(
            "ctxvars_read_no_metadata",
            "ctxvars_mw anonymous, endpoint reads, request_metadata=()",
            lambda: ContextMiddleware(reading_app(), request_metadata=()),
        ),
        Variant(
            "ctxvars_read_no_ids",
            "ctxvars_mw anonymous, endpoint reads, the client sends no ids (generated)",
            # The id headers are read under names the requests do not carry.
            lambda: ContextMiddleware(
                reading_app(), request_id_header="X-Edge-ID", correlation_id_header="X-Edge-Flow"
            ),
        ),
        Variant(
            "ctxvars_read_proxied",
            "ctxvars_mw anonymous, endpoint reads, behind a trusted proxy (X-Forwarded-For)",
            lambda: ContextMiddleware(reading_app(), trusted_proxies=["127.0.0.1", "10.0.0.0/8"]),
            headers=((b"x-forwarded-for", b"203.0.113.7, 10.1.2.3"),),
        ),
        Variant("correlation", "asgi-correlation-id", lambda: CorrelationIdMiddleware(bare_app())),
        Variant("starlette_context", "starlette-context (2 plugins)", _starlette_context),
    ]
    if tokens.jwt_authenticator("HS256") is None:
        return out
    out += [
        Variant("pyjwt_hs256", "floor + PyJWT decode HS256",
                lambda: PyJWTFloorMiddleware(bare_app(), "HS256"), "HS256"),
        Variant("pyjwt_rs256", "floor + PyJWT decode RS256",
                lambda: PyJWTFloorMiddleware(bare_app(), "RS256"), "RS256"),
    ]  # fmt: skip
    fresh = uncached == "fresh"
    zero = None if fresh else 0
    out += [
        Variant("jwt_cached", "ctxvars_mw JWT HS256, cached", _ctxvars_jwt("HS256", None)),
        Variant("jwt_cached_read", "ctxvars_mw JWT HS256, cached, endpoint reads the context",
                _ctxvars_jwt("HS256", None, reading_app)),
        Variant("jwt_hs256", "ctxvars_mw JWT HS256, uncached", _ctxvars_jwt("HS256", zero),
                "HS256", fresh),
        Variant("jwt_rs256", "ctxvars_mw JWT RS256, uncached", _ctxvars_jwt("RS256", zero),
                "RS256", fresh),
    ]  # fmt: skip
    return out


# What uvicorn serves in the out-of-process benchmark (``bench.apps:bare`` etc.).
bare = bare_app()
floor = FloorMiddleware(bare_app())
ctxvars = ContextMiddleware(bare_app())
correlation = CorrelationIdMiddleware(bare_app())


def _jwt_app() -> Any:
    auth = tokens.jwt_authenticator("HS256")
    return None if auth is None else ContextMiddleware(bare_app(), authenticator=auth)


ctxvars_jwt = _jwt_app()
