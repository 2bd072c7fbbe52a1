"""URLs of the Django test project."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("whoami", views.whoami),
    path("whoami-sync", views.whoami_sync),
    path("reports", views.reports),
    path("admin-panel", views.admin_panel),
    path("threads", views.write_thread),
    path("unavailable", views.unavailable),
    path("crash", views.crash),
]
