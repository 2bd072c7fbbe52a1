"""What authenticators see (:class:`Connection`) and return (:class:`Identity`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl

from ..frozen import EMPTY, freeze_mapping
from ..tier import Tier
from ..types import Scope

__all__ = ["Authenticator", "Connection", "Headers", "Identity"]


class Headers(Mapping[str, str]):
    """Read-only, case-insensitive request headers (values decoded as latin-1)."""

    __slots__ = ("_map", "_raw")

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self._raw = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]
        self._map: dict[str, str] = {}
        for key, value in self._raw:
            self._map.setdefault(key, value)

    def __getitem__(self, key: str) -> str:
        return self._map[key.lower()]

    def get(self, key: str, default: Any = None) -> Any:
        return self._map.get(key.lower(), default)

    def getlist(self, key: str) -> list[str]:
        """Every value of header ``key``, in order."""
        key = key.lower()
        return [v for k, v in self._raw if k == key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"Headers({sorted(self._map)!r})"  # names only: values may be credentials


class Connection:
    """A light, read-only view of an ASGI ``http`` or ``websocket`` scope.

    ``token`` is the bearer token the middleware found (``Authorization: Bearer``, the
    websocket ``bearer`` subprotocol, or the opt-in query parameter), or None.
    """

    __slots__ = ("_headers", "_query", "scope", "token")

    def __init__(self, scope: Scope, token: str | None = None) -> None:
        self.scope = scope
        self.token = token
        self._headers: Headers | None = None
        self._query: dict[str, str] | None = None

    @property
    def type(self) -> str:
        """``"http"`` or ``"websocket"``."""
        return str(self.scope["type"])

    @property
    def path(self) -> str:
        """The request path."""
        return str(self.scope.get("path", ""))

    @property
    def headers(self) -> Headers:
        """The request headers, case-insensitive."""
        if self._headers is None:
            self._headers = Headers(self.scope.get("headers", ()))
        return self._headers

    @property
    def query_params(self) -> Mapping[str, str]:
        """The query string's parameters (first value of each)."""
        if self._query is None:
            raw = self.scope.get("query_string", b"")
            query: dict[str, str] = {}
            for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
                query.setdefault(key, value)
            self._query = query
        return self._query

    @property
    def client(self) -> tuple[str, int] | None:
        """``(host, port)`` of the client, when the server gives it."""
        client = self.scope.get("client")
        return None if client is None else (str(client[0]), int(client[1]))


def _frozenset(value: Iterable[str]) -> frozenset[str]:
    if isinstance(value, (str, bytes)):
        raise TypeError("expected a collection of strings, not a single string")
    items = frozenset(value)
    if not all(isinstance(v, str) and v for v in items):
        raise TypeError("expected non-empty strings")
    return items


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an authenticator says the caller is; the middleware builds the context from it.

    ``scopes`` are the OAuth scopes granted to the token, kept apart from ``permissions``;
    ``client_id`` is the OAuth client it was issued to (None when the token does not say).
    """

    user_id: str
    tier: Tier | None = None
    roles: frozenset[str] = frozenset()
    permissions: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    session_id: str | None = None
    claims: Mapping[str, Any] = field(default=EMPTY)
    auth_method: str | None = None
    expires_at: float | None = None
    #: The OAuth client the token was issued to (``client_id``, or ``azp``): for a client
    #: credentials token, the calling service.
    client_id: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.tier is not None and not isinstance(self.tier, Tier):
            set_(self, "tier", Tier.parse(self.tier))
        for name in ("roles", "permissions", "scopes"):
            value = getattr(self, name)
            if not isinstance(value, frozenset):
                set_(self, name, _frozenset(value))
        set_(self, "claims", freeze_mapping(self.claims))
        if self.client_id is not None and (
            not isinstance(self.client_id, str) or not self.client_id
        ):
            raise TypeError("client_id must be a non-empty string or None")


@runtime_checkable
class Authenticator(Protocol):
    """Turns a connection's credentials into an :class:`Identity`.

    Return None when the connection carries no credentials this authenticator understands;
    raise :class:`~ctxvars_mw.AuthenticationError` (or a subclass) for bad ones.
    """

    async def authenticate(self, conn: Connection) -> Identity | None:
        """Authenticate ``conn``."""
        ...
