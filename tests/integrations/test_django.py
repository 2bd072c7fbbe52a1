"""ctxvars_mw.integrations.django: Django's ASGI app wrapped, sync/async views, ErrorMiddleware."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import httpx
import pytest
from django.test import RequestFactory

from ctxvars_mw import ContextMiddleware, InvalidRequestError, PermissionDeniedError
from ctxvars_mw.integrations.django import ErrorMiddleware
from ctxvars_mw.responses import error_body

from .helpers import ALICE, BOB, TokenTableAuthenticator, bearer

pytestmark = pytest.mark.integration

ALICE_TOKEN = "tok-alice-business-user"  # business tier, role user
BOB_TOKEN = "tok-bob-free-readonly"  # free tier, role readonly


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A client on ``ContextMiddleware(get_asgi_application())`` of the test project."""
    from django.core.asgi import get_asgi_application

    application = ContextMiddleware(get_asgi_application(), authenticator=TokenTableAuthenticator())
    transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def test_async_view_sees_the_request_context(http: httpx.AsyncClient) -> None:
    """An async view reads the authenticated context, after an await, in the event loop."""
    response = await http.get("/whoami", headers=bearer(ALICE_TOKEN))
    body = response.json()
    assert body["user"] == ALICE
    assert body["tier"] == "business"
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["thread"] == threading.current_thread().name


async def test_sync_view_sees_the_request_context_in_a_worker_thread(
    http: httpx.AsyncClient,
) -> None:
    """A sync view, run by Django in a worker thread, reads the same request's context."""
    response = await http.get("/whoami-sync", headers=bearer(BOB_TOKEN))
    body = response.json()
    assert body["user"] == BOB
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["thread"] != threading.current_thread().name


async def test_anonymous_request_gets_the_anonymous_context(http: httpx.AsyncClient) -> None:
    """Without a token the view sees the anonymous, unauthenticated context."""
    body = (await http.get("/whoami-sync")).json()
    assert body["user"] == "anonymous"
    assert body["authenticated"] is False


@pytest.mark.parametrize(
    ("path", "alice", "bob", "anonymous"),
    [("/reports", 200, 403, 401), ("/admin-panel", 403, 403, 401), ("/threads", 200, 403, 401)],
)
async def test_decorated_views_answer_200_403_401(
    http: httpx.AsyncClient, path: str, alice: int, bob: int, anonymous: int
) -> None:
    """Decorated sync and async views give JSON 401/403 exactly as the middleware would."""
    assert (await http.get(path, headers=bearer(ALICE_TOKEN))).status_code == alice
    denied = await http.get(path, headers=bearer(BOB_TOKEN))
    assert denied.status_code == bob
    assert denied.headers["content-type"] == "application/json"
    assert denied.json()["error"] == "insufficient_scope"
    assert denied.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    assert "x-request-id" in denied.headers
    missing = await http.get(path)
    assert missing.status_code == anonymous
    assert missing.json()["error"] == "authentication_required"
    assert missing.headers["www-authenticate"] == "Bearer"


async def test_child_context_in_a_sync_view(http: httpx.AsyncClient) -> None:
    """A child derived in a sync view is one level deeper and points at the request."""
    response = await http.get("/threads", headers=bearer(ALICE_TOKEN))
    assert response.json() == {"depth": 1, "parent": response.headers["x-request-id"]}


async def test_service_unavailable_is_503_with_retry_after(http: httpx.AsyncClient) -> None:
    """ServiceUnavailableError from a view is a JSON 503 with Retry-After."""
    response = await http.get("/unavailable")
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert response.headers["retry-after"] == "9"


async def test_other_exceptions_stay_djangos_500_with_id_headers(http: httpx.AsyncClient) -> None:
    """ErrorMiddleware leaves foreign errors to Django; the 500 still carries our ids."""
    response = await http.get("/crash", headers={"X-Request-ID": "req-0123456789abcdef"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-0123456789abcdef"
    assert b"boom" not in response.content


async def test_invalid_token_is_refused_before_django_runs(http: httpx.AsyncClient) -> None:
    """An unknown token never reaches a view: the middleware answers 401."""
    response = await http.get("/whoami", headers=bearer("tok-nobody"))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


def test_error_middleware_works_in_a_sync_stack() -> None:
    """In a WSGI-style stack ErrorMiddleware stays sync and answers our errors as JSON."""
    middleware = ErrorMiddleware(lambda request: None)
    request = RequestFactory().get("/x", HTTP_AUTHORIZATION="Bearer abc.def.ghi")
    response = middleware.process_exception(request, PermissionDeniedError(required=["a:b"]))
    assert response is not None
    assert response.status_code == 403
    assert response["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'
    assert middleware.process_exception(request, ValueError("x")) is None
    bad = middleware.process_exception(request, InvalidRequestError())
    assert bad.status_code == 400
    assert bad.content == b'{"error":"invalid_request","error_description":"%s"}' % (
        error_body(InvalidRequestError())["error_description"].encode()
    )


async def test_error_middleware_is_async_in_an_async_stack() -> None:
    """Given an async get_response, ErrorMiddleware is a coroutine function (no thread hop)."""
    from asgiref.sync import iscoroutinefunction

    async def get_response(request: object) -> str:
        return "response"

    middleware = ErrorMiddleware(get_response)
    assert iscoroutinefunction(middleware)
    assert await middleware(RequestFactory().get("/")) == "response"
    assert ErrorMiddleware.sync_capable
    assert ErrorMiddleware.async_capable


def test_error_middleware_in_djangos_sync_wsgi_stack() -> None:
    """Through Django's own (WSGI) test client, with no context, a decorated view is a JSON 401."""
    from django.test import Client

    response = Client().get("/admin-panel", HTTP_AUTHORIZATION="Bearer abc.def.ghi")
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"] == "authentication_required"
    assert response["WWW-Authenticate"] == "Bearer"
