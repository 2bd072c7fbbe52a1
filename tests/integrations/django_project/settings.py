"""Settings of the Django test project: no database, no contrib apps, our ErrorMiddleware."""

from __future__ import annotations

import secrets

SECRET_KEY = secrets.token_urlsafe(50)
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.integrations.django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["ctxvars_mw.integrations.django.ErrorMiddleware"]
DATABASES: dict[str, object] = {}
USE_TZ = True
LOGGING_CONFIG = None
