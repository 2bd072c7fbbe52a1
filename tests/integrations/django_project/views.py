"""Views of the Django test project: sync and async, plain and decorated."""

from __future__ import annotations

import asyncio
import threading

from django.http import HttpRequest, JsonResponse

from ctxvars_mw import (
    ServiceUnavailableError,
    child_context,
    get_context,
    requires_permission,
    requires_role,
    requires_tier,
)


def _summary() -> dict[str, object]:
    ctx = get_context()
    return {
        "user": ctx.user_id,
        "authenticated": ctx.is_authenticated,
        "tier": ctx.tier.value,
        "request_id": ctx.request_id,
    }


async def whoami(request: HttpRequest) -> JsonResponse:
    """Async view: the context survives an await."""
    await asyncio.sleep(0)
    return JsonResponse({**_summary(), "thread": threading.current_thread().name})


def whoami_sync(request: HttpRequest) -> JsonResponse:
    """Sync view, run by Django in a worker thread."""
    return JsonResponse({**_summary(), "thread": threading.current_thread().name})


@requires_tier("business")
async def reports(request: HttpRequest) -> JsonResponse:
    """Async view for business tier and above."""
    return JsonResponse(_summary())


@requires_role("admin")
def admin_panel(request: HttpRequest) -> JsonResponse:
    """Sync view for admins."""
    return JsonResponse(_summary())


@requires_permission("threads:write")
def write_thread(request: HttpRequest) -> JsonResponse:
    """Sync view that derives a child context for a sub-operation."""
    with child_context("thread.write") as child:
        return JsonResponse({"depth": child.operation_depth, "parent": child.parent_request_id})


def unavailable(request: HttpRequest) -> JsonResponse:
    """A view whose backing service is down."""
    raise ServiceUnavailableError(retry_after=9)


def crash(request: HttpRequest) -> JsonResponse:
    """A view with a bug: Django's own 500 answers it."""
    raise RuntimeError("boom")
