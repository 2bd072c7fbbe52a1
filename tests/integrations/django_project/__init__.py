"""A minimal Django project for the integration tests, configured in-process by ``configure()``."""

from __future__ import annotations


def configure() -> None:
    """Configure Django with this project's settings (once per process) and set it up."""
    import django
    from django.conf import settings

    from . import settings as project_settings

    if not settings.configured:
        settings.configure(
            **{
                name: getattr(project_settings, name)
                for name in dir(project_settings)
                if name.isupper()
            }
        )
    django.setup(set_prefix=False)
