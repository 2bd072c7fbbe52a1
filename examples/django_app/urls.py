"""URLs of the Django example."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("whoami", views.whoami),
    path("whoami-sync", views.whoami_sync),
    path("reports", views.reports),
    path("admin/users", views.admin_users),
    path("audit/export", views.audit_export),
]
