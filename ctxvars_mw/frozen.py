"""Deep-frozen, hashable JSON-like values for context metadata.

``freeze`` copies a JSON-like value (dicts with string keys, lists, tuples, sets, str, int,
float, bool, None) into an immutable one: dicts become :class:`FrozenMap`, lists and tuples
become tuples, sets become sorted tuples. ``thaw`` turns it back into plain JSON data.
Frozen values serialize as they are: ``json.dumps(fm)`` works on any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

__all__ = ["EMPTY", "FrozenMap", "freeze", "freeze_mapping", "thaw"]

_SCALARS = (str, int, float, bool, type(None))
_SCALAR_TYPES = frozenset(_SCALARS)


class FrozenMap(dict[str, Any]):
    """An immutable, hashable mapping; its values are deep-frozen.

    A ``dict`` subclass whose every mutator raises ``TypeError`` (an ``AttributeError`` too):
    being a real dict is what lets ``json.dumps`` (its C encoder serializes dict and tuple
    subclasses as objects and arrays), FastAPI's ``jsonable_encoder`` and any code that
    checks ``isinstance(x, dict)`` take a context's claims and metadata as they are.
    ``dict(fm)`` or ``fm.copy()`` gives a plain, mutable dict (its nested values stay
    frozen; :func:`thaw` gives plain data).
    """

    __slots__ = ("_hash",)

    _hash: int | None

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        if _initialized(self):
            _immutable()
        dict.update(self, {} if data is None else _freeze_items(data))
        object.__setattr__(self, "_hash", None)

    @classmethod
    def _trusted(cls, data: dict[str, Any]) -> FrozenMap:
        """A map of an already-frozen dict's items."""
        new = dict.__new__(cls)
        dict.update(new, data)
        object.__setattr__(new, "_hash", None)
        return new

    def __eq__(self, other: object) -> bool:
        if isinstance(other, dict):
            return dict.__eq__(self, other)
        if isinstance(other, Mapping):
            return dict.__eq__(self, dict(other))
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:  # type: ignore[override]
        h = self._hash
        if h is None:
            h = hash(frozenset(self.items()))
            object.__setattr__(self, "_hash", h)
        return h

    def __repr__(self) -> str:
        return f"FrozenMap({dict.__repr__(self)})"

    def __setitem__(self, key: str, value: Any) -> NoReturn:
        _immutable()

    def __delitem__(self, key: str) -> NoReturn:
        _immutable()

    def __ior__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        _immutable()

    def clear(self) -> NoReturn:
        _immutable()

    def pop(self, *args: Any) -> NoReturn:
        _immutable()

    def popitem(self) -> NoReturn:
        _immutable()

    def setdefault(self, *args: Any) -> NoReturn:
        _immutable()

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        _immutable()

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("FrozenMap is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("FrozenMap is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (thaw(self),))

    def __copy__(self) -> FrozenMap:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenMap:
        return self

    def merged(self, extra: Mapping[str, Any] | None) -> FrozenMap:
        """A new map with ``extra`` (frozen) laid over this one."""
        if not extra:
            return self
        data = dict(self)
        data.update(extra if isinstance(extra, FrozenMap) else _freeze_items(extra))
        return FrozenMap._trusted(data)


def _initialized(fm: FrozenMap) -> bool:
    try:
        fm._hash  # noqa: B018 - set once, by the constructor
    except AttributeError:
        return False
    return True


class _ImmutableError(TypeError, AttributeError):
    """A write to a FrozenMap: a TypeError as for any read-only container, and an
    AttributeError for the mutating dict methods a read-only mapping does not have."""


def _immutable() -> NoReturn:
    raise _ImmutableError("FrozenMap is immutable")


def _reject(value: object, path: str) -> NoReturn:
    raise TypeError(
        f"{path or 'value'} has type {type(value).__name__}; context metadata must be "
        "JSON-like (dict with str keys, list, tuple, set, str, int, float, bool, None)"
    )


def _freeze_items(data: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    scalar = _SCALAR_TYPES
    for key, value in data.items():
        if type(key) is not str and not isinstance(key, str):
            raise TypeError(f"{path or 'mapping'} has a key that is not a string")
        out[key] = (
            value if type(value) in scalar else freeze(value, f"{path}.{key}" if path else key)
        )
    return out


def freeze(value: Any, path: str = "") -> Any:
    """Return a deep-frozen copy of a JSON-like value (TypeError for anything else)."""
    # Exact types first: FrozenMap is a Mapping, and isinstance() against an ABC is slow.
    kind = type(value)
    if kind in _SCALAR_TYPES or kind is FrozenMap:
        return value
    if kind is dict:
        return FrozenMap._trusted(_freeze_items(value, path))
    if kind is list or kind is tuple:
        scalar = _SCALAR_TYPES
        return tuple([v if type(v) in scalar else freeze(v, path) for v in value])
    if isinstance(value, _SCALARS):  # subclasses: str enums, IntEnum, ...
        return value
    if isinstance(value, FrozenMap):
        return value
    if isinstance(value, Mapping):
        return FrozenMap._trusted(_freeze_items(value, path))
    if isinstance(value, (list, tuple)):
        return tuple([freeze(v, path) for v in value])
    if isinstance(value, (set, frozenset)):
        # Sets become sorted tuples so that they serialize (and round-trip) as JSON lists.
        return tuple(sorted((freeze(v, path) for v in value), key=repr))
    _reject(value, path)


EMPTY = FrozenMap._trusted({})


def freeze_mapping(value: Mapping[str, Any] | None) -> FrozenMap:
    """Freeze a mapping (None or empty → the shared empty map); TypeError if not a mapping."""
    kind = type(value)
    if kind is dict:  # the common cases (parsed JSON; a context's own maps), no ABC checks
        return FrozenMap._trusted(_freeze_items(value)) if value else EMPTY
    if kind is FrozenMap:
        return value  # type: ignore[return-value]
    if not value:
        if value is None or isinstance(value, Mapping):
            return EMPTY
        _reject(value, "")
    if isinstance(value, FrozenMap):
        return value
    if not isinstance(value, Mapping):
        _reject(value, "")
    return FrozenMap._trusted(_freeze_items(value))


def thaw(value: Any) -> Any:
    """Turn a frozen value back into plain JSON data (dicts and lists)."""
    if isinstance(value, FrozenMap):
        return {k: thaw(v) for k, v in dict.items(value)}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value
