"""Framework tests: Django is configured here, once, with the test project's settings."""

from __future__ import annotations

from .django_project import configure

configure()
