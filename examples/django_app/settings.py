"""Settings of the Django example: no database needed; our ErrorMiddleware answers 401/403."""

from __future__ import annotations

import os
import secrets

# Django's own signing key (sessions, CSRF): not the JWT secret, which lives in asgi.py.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50)
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    # Turns PermissionDeniedError / AuthenticationError raised by views into the same JSON
    # 401/403 responses ContextMiddleware sends (Django would otherwise answer 500).
    "ctxvars_mw.integrations.django.ErrorMiddleware",
]
DATABASES: dict[str, object] = {}
USE_TZ = True
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"ctx": {"()": "ctxvars_mw.logging.ContextLogFilter"}},
    "formatters": {
        "ctx": {"format": "%(levelname)s %(request_id)s %(user_id)s %(name)s: %(message)s"}
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "filters": ["ctx"], "formatter": "ctx"}
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
}
