"""ASGI scopes as a server builds them, and one request run by hand, for the tests that
drive an app without a client."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ctxvars_mw.types import Message

#: The peer address of every hand-made scope.
PEER = ("127.0.0.1", 50000)


def http_scope(
    path: str = "/",
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    query: bytes = b"",
    **changes: Any,
) -> dict[str, Any]:
    """A complete ASGI http ``GET`` scope for ``path`` with ``headers`` (a list is used as
    it is: headers appended to it later are the scope's); ``changes`` replace or add keys
    (``client=None``, ``method="POST"``)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "query_string": query,
        "headers": headers if isinstance(headers, list) else list(headers),
        "client": PEER,
        "server": ("127.0.0.1", 8000),
        "state": {},
        **changes,
    }


async def receive_empty_body() -> Message:
    """The ``receive`` of a request without a body."""
    return {"type": "http.request", "body": b"", "more_body": False}


async def call(app: Any, scope: dict[str, Any]) -> list[Message]:
    """Run one request through ``app`` in this task; the messages it sent."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive_empty_body, send)
    return sent
