"""An ASGI app for logging tests, run under uvicorn with a ``--log-config`` dictConfig file.

Importing it installs the chained record factory, so uvicorn's own access-log records (made
inside the request, where the context is current) carry the ids as well as our records do.
"""

from __future__ import annotations

import logging

from ctxvars_mw import ContextMiddleware
from ctxvars_mw.logging import install_record_factory
from ctxvars_mw.types import Receive, Scope, Send
from tests.integrations.helpers import TokenTableAuthenticator

install_record_factory()
logger = logging.getLogger("thirdparty.client")


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    logger.warning("handled %s", scope["path"])
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


app = ContextMiddleware(_app, authenticator=TokenTableAuthenticator())
