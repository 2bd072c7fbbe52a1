"""Views of the Django example: sync and async, each reading the request's context."""

from __future__ import annotations

import asyncio

from django.http import HttpRequest, JsonResponse

from ctxvars_mw import child_context, get_context, requires_feature, requires_role, requires_tier


def _summary() -> dict[str, object]:
    ctx = get_context()
    return {
        "user_id": ctx.user_id,
        "authenticated": ctx.is_authenticated,
        "tier": ctx.tier.value,
        "roles": sorted(ctx.roles),
        "request_id": ctx.request_id,
    }


async def whoami(request: HttpRequest) -> JsonResponse:
    """Anyone (async view): who the middleware says you are."""
    await asyncio.sleep(0)
    return JsonResponse(_summary())


def whoami_sync(request: HttpRequest) -> JsonResponse:
    """Anyone (sync view, run by Django in a worker thread): the same context."""
    return JsonResponse(_summary())


@requires_tier("business")
async def reports(request: HttpRequest) -> JsonResponse:
    """Business tier and above (async view)."""
    with child_context("reports.build") as step:
        return JsonResponse({"report": "quarterly", "depth": step.operation_depth})


@requires_role("admin")
def admin_users(request: HttpRequest) -> JsonResponse:
    """Role admin (sync view)."""
    return JsonResponse({"users": 5})


@requires_feature("audit_export")
def audit_export(request: HttpRequest) -> JsonResponse:
    """Feature audit_export: enterprise tier and above (sync view)."""
    return JsonResponse({"audit": get_context().audit_trail()})
