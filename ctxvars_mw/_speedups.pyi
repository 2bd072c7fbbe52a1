from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import ModuleType
from typing import Any

class Exchange:
    """One request's send wrapper (sets the id headers) and state."""

    @property
    def started(self) -> bool: ...
    @property
    def id_headers(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def authorization(self) -> list[bytes] | None: ...
    @property
    def ctx(self) -> list[Any] | None: ...
    @property
    def stack(self) -> list[Callable[[], Any]] | None: ...
    def __call__(self, message: dict[str, Any], /) -> Awaitable[None]: ...
    def enter(
        self, identity: Any, permissions: frozenset[str], features: frozenset[str], /
    ) -> None: ...
    def finish(self) -> None: ...

class Accelerator:
    def __init__(
        self,
        *,
        rid_in: bytes | None,
        cid_in: bytes | None,
        rid: bytes,
        cid: bytes,
        names: frozenset[bytes],
        features: frozenset[str],
        no_names: frozenset[str],
        build: Callable[..., Any],
        accept_id: Callable[..., str | None],
        with_ids: Callable[..., list[tuple[bytes, bytes]]],
        generate_id: Callable[[], str],
        now: Callable[[], float],
        rules_var: ContextVar[Any],
        ids_module: ModuleType,
        current: ContextVar[Any],
        closed: Callable[[], None],
        authenticate: bool,
        id_chars: bytes,
        id_max: int,
    ) -> None: ...
    def start(
        self, scope: dict[str, Any], send: Callable[[dict[str, Any]], Awaitable[None]], /
    ) -> Exchange | None: ...
