"""ASGI entry point of the Django example: Django wrapped in ContextMiddleware.

Run it:  CTXVARS_MW_DEMO_SECRET=<32+ chars> uvicorn examples.django_app.asgi:application
Tokens:  ``ctxvars_mw.testing.mint_token(secret, user_id=..., tier="business", roles=["user"],
         issuer=ISSUER, audience=AUDIENCE)``.
"""

from __future__ import annotations

import os
import secrets

from django.core.asgi import get_asgi_application

from ctxvars_mw import ContextMiddleware, JWTAuthenticator

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")

ISSUER = "https://auth.ctxvars-demo.invalid/"
AUDIENCE = "ctxvars-demo-api"


def build_application(secret: str) -> ContextMiddleware:
    """Django's ASGI application, outermost-wrapped, authenticating HS256 JWTs."""
    authenticator = JWTAuthenticator(
        key=secret, algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE
    )
    return ContextMiddleware(get_asgi_application(), authenticator=authenticator)


application = build_application(
    os.environ.get("CTXVARS_MW_DEMO_SECRET") or secrets.token_urlsafe(32)
)
