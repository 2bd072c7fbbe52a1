"""A metered app for the multi-process tests: every process shares one Redis.

    RATELIMIT_APP_SECRET=<secret> RATELIMIT_APP_REDIS=redis://... RATELIMIT_APP_PREFIX=<prefix> \\
        RATELIMIT_APP_FREE_RATE=25/hour uvicorn tests.apps.ratelimit_app:app

Callers send an HS256 JWT (``sub``, ``tier``) signed with the secret. The free tier has the
rate given (per hour, so that no request is admitted back during a test), business 1000/hour.
"""

from __future__ import annotations

import os
from typing import Any

from ctxvars_mw import ContextMiddleware, JWTAuthenticator, Policy, RedisLimitStore, get_context

POLICY = Policy.from_mapping(
    {
        **Policy.default().to_mapping(),
        "tier_limits": {
            "free": {"rate": os.environ["RATELIMIT_APP_FREE_RATE"]},
            "business": {"rate": "1000/hour"},
        },
    }
)


async def whoami(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer with the caller's user id."""
    body = get_context().user_id.encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


app = ContextMiddleware(
    whoami,
    authenticator=JWTAuthenticator(key=os.environ["RATELIMIT_APP_SECRET"], algorithms=["HS256"]),
    policy=POLICY,
    limit_store=RedisLimitStore(
        os.environ["RATELIMIT_APP_REDIS"], prefix=os.environ["RATELIMIT_APP_PREFIX"], timeout=2.0
    ),
)
