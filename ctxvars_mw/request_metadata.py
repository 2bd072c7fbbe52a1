"""What a request's context records about the request: client address, user agent, method, path.

``ContextMiddleware(request_metadata=...)`` names the fields recorded (all four by default,
``()`` for none); each is bounded and sanitised before it reaches the context, so it is safe
in a log line:

* ``client_ip`` — the client's address, canonical (``2001:db8::1``), or None: the peer's, or
  the one trusted proxies forwarded (:mod:`ctxvars_mw.proxies`).
* ``user_agent`` — the ``User-Agent`` header, decoded as UTF-8 (undecodable bytes replaced),
  cut to :data:`MAX_USER_AGENT_LENGTH` characters. None when absent or empty.
* ``method`` — the HTTP method (None on a websocket), at most :data:`MAX_METHOD_LENGTH`.
* ``path`` — ``scope["path"]``, never the query string, at most :data:`MAX_PATH_LENGTH`.

In all three texts every control or other non-printable character (a newline, an escape, a
bidirectional override) is replaced by U+FFFD. A field that is not recorded costs nothing per
request: its header is not even looked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._memo import remember
from .auth.admission import REPEATED
from .context import (
    MAX_METHOD_LENGTH,
    MAX_PATH_LENGTH,
    MAX_USER_AGENT_LENGTH,
    REQUEST_METADATA_FIELDS,
)
from .errors import ConfigurationError
from .proxies import TrustedProxies, _canonical, canonical_ip, header_values
from .types import Scope

__all__ = [
    "MAX_METHOD_LENGTH",
    "MAX_PATH_LENGTH",
    "MAX_USER_AGENT_LENGTH",
    "NO_METADATA",
    "REQUEST_METADATA_FIELDS",
    "MetadataReader",
    "check_metadata_names",
    "clean_text",
]

#: ``(client_ip, user_agent, method, path)`` of a request that records none of them.
NO_METADATA: tuple[None, None, None, None] = (None, None, None, None)

Metadata = tuple[str | None, str | None, str | None, str | None]
_REPLACEMENT = "\ufffd"
# The registered methods: recorded as they come, without a check.
_METHODS = frozenset(
    ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
)
_USER_AGENT = b"user-agent"

# User-Agent headers seen before, by their raw bytes: a handful of browsers and clients make
# most requests. Bounded; cleared when full.
_user_agents: dict[bytes, str | None] = {}
_USER_AGENTS_MAX = 1024


def check_metadata_names(option: str, names: object) -> tuple[str, ...]:
    """``names``, a collection of :data:`REQUEST_METADATA_FIELDS`, in their order; a single
    string or an unknown name raises :class:`ConfigurationError` naming ``option``."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ConfigurationError(
            f"{option} must be a collection of field names, not one value "
            f"(any of: {', '.join(REQUEST_METADATA_FIELDS)})"
        )
    chosen = set()
    for name in names:
        if name not in REQUEST_METADATA_FIELDS:
            raise ConfigurationError(
                f"{option}: unknown field {name!r} (any of: {', '.join(REQUEST_METADATA_FIELDS)})"
            )
        chosen.add(name)
    return tuple(name for name in REQUEST_METADATA_FIELDS if name in chosen)


def clean_text(value: object, limit: int) -> str | None:
    """``value`` cut to ``limit`` characters, each non-printable one replaced by U+FFFD;
    None for an empty value or one that is not a string."""
    if type(value) is not str or not value:
        return None
    if len(value) <= limit and value.isprintable():
        return value
    value = value[:limit]
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else _REPLACEMENT for c in value)


def _user_agent(raw: bytes) -> str | None:
    """The ``User-Agent`` header's value as :func:`clean_text` leaves it."""
    if raw.isascii():
        return clean_text(raw[:MAX_USER_AGENT_LENGTH].decode("ascii"), MAX_USER_AGENT_LENGTH)
    text = raw[: MAX_USER_AGENT_LENGTH * 4].decode("utf-8", "replace")
    return clean_text(text, MAX_USER_AGENT_LENGTH)


class MetadataReader:
    """Reads the chosen fields of a request (see the module docstring); built once from the
    options, by :class:`~ctxvars_mw.middleware.Settings`."""

    __slots__ = ("client_ip", "method", "path", "proxies", "user_agent", "wanted")

    def __init__(self, names: Iterable[str], proxies: TrustedProxies) -> None:
        chosen = frozenset(names)
        self.client_ip = "client_ip" in chosen
        self.user_agent = "user_agent" in chosen
        self.method = "method" in chosen
        self.path = "path" in chosen
        #: The trusted proxies, or None when there are none (or ``client_ip`` is off).
        self.proxies = proxies if proxies and self.client_ip else None
        wanted = set()
        if self.user_agent:
            wanted.add(_USER_AGENT)
        if self.proxies is not None:
            wanted.add(self.proxies.header)
        #: The request headers :meth:`read` needs from ``read_headers``.
        self.wanted = frozenset(wanted)

    def read(self, scope: Scope, found: dict[bytes, bytes]) -> Metadata:
        """``(client_ip, user_agent, method, path)`` of the request (None for a field not
        recorded); ``found`` holds the request's :attr:`wanted` headers."""
        # Each field's common case is written out here (a remembered peer and user agent, a
        # short printable method and path): this runs for every request.
        client_ip = user_agent = method = path = None
        if self.client_ip:
            peer: Any = scope.get("client")
            if peer:
                try:
                    client_ip = _canonical[peer[0]]
                except (KeyError, TypeError):
                    client_ip = canonical_ip(peer[0])
            if self.proxies is not None:
                client_ip = self.forwarded_client(scope, found, client_ip)
        if self.user_agent:
            raw = found.get(_USER_AGENT)
            if raw is not None and raw is not REPEATED:  # two of them say nothing
                try:
                    user_agent = _user_agents[raw]
                except KeyError:
                    user_agent = remember(_user_agents, raw, _user_agent(raw), _USER_AGENTS_MAX)
        if self.method and scope["type"] == "http":
            method = scope.get("method")
            if method not in _METHODS:
                method = clean_text(method, MAX_METHOD_LENGTH)
        if self.path:
            path = scope.get("path")
            if type(path) is not str or len(path) > MAX_PATH_LENGTH or not path.isprintable():
                path = clean_text(path, MAX_PATH_LENGTH)
            elif not path:
                path = None
        return client_ip, user_agent, method, path

    def forwarded_client(
        self, scope: Scope, found: dict[bytes, bytes], peer: str | None
    ) -> str | None:
        """The client the forwarded header names when the ``peer`` is a trusted proxy (see
        :mod:`ctxvars_mw.proxies`); else the peer."""
        proxies: Any = self.proxies
        if not proxies.trusts(peer):
            return peer
        raw = found.get(proxies.header)
        if raw is None:
            return peer
        values = header_values(scope["headers"], proxies.header) if raw is REPEATED else [raw]
        return proxies.client(peer, values)  # type: ignore[no-any-return]
