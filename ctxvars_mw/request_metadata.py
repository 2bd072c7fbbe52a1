"""What a request's context records about the request: client address, user agent, method, path.

``ContextMiddleware(request_metadata=...)`` names the fields recorded (all four by default,
``()`` for none); each is bounded and sanitised before anyone reads it from the context, so
it is safe in a log line:

* ``client_ip`` — the client's address, canonical (``2001:db8::1``), or None: the peer's, or
  the one trusted proxies forwarded (:mod:`ctxvars_mw.proxies`).
* ``user_agent`` — the ``User-Agent`` header, decoded as UTF-8 (undecodable bytes replaced),
  cut to :data:`MAX_USER_AGENT_LENGTH` characters. None when absent or empty.
* ``method`` — the HTTP method (None on a websocket), at most :data:`MAX_METHOD_LENGTH`.
* ``path`` — ``scope["path"]``, never the query string, at most :data:`MAX_PATH_LENGTH`.

In all three texts every control or other non-printable character (a newline, an escape, a
bidirectional override) is replaced by U+FFFD. Per request, the middleware only takes what
the fields are made of (:meth:`MetadataReader.capture`); the context has them cleaned
(:meth:`MetadataReader.clean`) the first time one of them is read. A field that is not
recorded is never read from the request.
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
from .proxies import TrustedProxies, canonical_ip, header_values
from .types import Scope

__all__ = [
    "MAX_METHOD_LENGTH",
    "MAX_PATH_LENGTH",
    "MAX_USER_AGENT_LENGTH",
    "REQUEST_METADATA_FIELDS",
    "Captured",
    "MetadataReader",
    "check_metadata_names",
    "clean_text",
]

Metadata = tuple[str | None, str | None, str | None, str | None]
#: What :meth:`MetadataReader.capture` takes of a request (see there).
Captured = tuple[Any, ...]
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
        #: The request headers :meth:`capture` needs from ``read_headers``.
        self.wanted = frozenset(wanted)

    def capture(self, scope: Scope, found: dict[bytes, bytes]) -> Captured:
        """What :meth:`clean` makes the request's fields of, taken as the request came: this
        reader, then the peer, the raw ``User-Agent``, the method, the path and the forwarded
        header's values (None for what is not recorded). ``found`` holds the request's
        :attr:`wanted` headers.

        A request's context keeps this and has it cleaned when one of its fields is first
        read (see ``ctxvars_mw.context``): a request whose metadata nobody reads pays for
        this tuple only."""
        forwarded: Any = None
        proxies = self.proxies
        if proxies is not None:
            forwarded = found.get(proxies.header)
            if forwarded is REPEATED:  # every line, read from the request's own list
                forwarded = header_values(scope["headers"], proxies.header)
        return (
            self,
            scope.get("client") if self.client_ip else None,
            found.get(_USER_AGENT) if self.user_agent else None,
            scope.get("method") if self.method and scope["type"] == "http" else None,
            scope.get("path") if self.path else None,
            forwarded,
        )

    def clean(self, captured: Captured) -> Metadata:
        """``(client_ip, user_agent, method, path)``, bounded and sanitised (see the module
        docstring), from what :meth:`capture` took of a request."""
        _, peer, raw_agent, method, path, forwarded = captured
        user_agent = None
        try:
            host = peer[0] if peer else None
        except (TypeError, KeyError, IndexError):  # not a [host, port] pair
            host = None
        client_ip = canonical_ip(host)  # None for anything but an address
        # A header value that is not bytes is not an ASGI one: as if it were absent.
        if type(forwarded) is bytes:  # one header line (a list: every line of a repeated one)
            forwarded = [forwarded]
        if type(forwarded) is list and self.proxies is not None and self.proxies.trusts(client_ip):
            client_ip = self.proxies.client(client_ip, forwarded)
        if type(raw_agent) is bytes and raw_agent is not REPEATED:  # two of them say nothing
            try:
                user_agent = _user_agents[raw_agent]
            except KeyError:
                user_agent = remember(
                    _user_agents, raw_agent, _user_agent(raw_agent), _USER_AGENTS_MAX
                )
        if method is not None and (type(method) is not str or method not in _METHODS):
            method = clean_text(method, MAX_METHOD_LENGTH)
        if path is not None and (
            type(path) is not str or len(path) > MAX_PATH_LENGTH or not path.isprintable()
        ):
            path = clean_text(path, MAX_PATH_LENGTH)
        elif not path:
            path = None
        return client_ip, user_agent, method, path
