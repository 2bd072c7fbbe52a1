"""Request and correlation ids: generation, header validation, placeholder rules, W3C traceparent.

Id rules are an immutable :class:`IdRules` value. The current rules come from
:func:`use_id_rules` (a context manager, task-local) or :func:`set_id_rules` (process-wide);
they are never read from an environment variable.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from ._memo import remember
from .errors import ConfigurationError

__all__ = [
    "IdRules",
    "check_id_header_names",
    "generate_id",
    "generate_ids",
    "get_id_rules",
    "is_valid_id",
    "parse_traceparent",
    "set_id_rules",
    "use_id_rules",
]

_EXACT_PLACEHOLDERS = [
    "registry",
    "placeholder",
    "default",
    "temp",
    "none",
    "null",
    "undefined",
    "0",
    "1",
    "xxx",
    "yyy",
    "example",
    "test",
    "demo",
    "sample",
    "template",
    "mock",
    "fake",
    "dummy",
    "anonymous",
]
_PLACEHOLDER_PREFIXES = [
    "placeholder_",
    "registry_",
    "temp_",
    "example_",
    "demo_",
    "sample_",
    "template_",
    "mock_",
    "fake_",
    "default_",
    "test_",
]
_PREFIX_EXCEPTIONS = [
    "default_user",
    "default_admin",
    "default_system",
    "default_account",
    "default_service",
    "default_client",
    "default_guest",
]

#: Ids shorter than this are checked against the placeholder prefixes.
SHORT_ID_LENGTH = 20


@dataclass(frozen=True, slots=True)
class IdRules:
    """Which ids are refused as placeholders.

    ``exact`` values are compared case-insensitively; ``prefixes`` apply to ids shorter than
    20 characters, except the ids listed in ``allowed``.
    """

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    allowed: frozenset[str]
    # Ids at least this long can be neither an exact placeholder nor a short prefixed one.
    _safe_length: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built directly (not through allowing/forbidding), the items may be any iterable in
        # any case: store them lowercased, as the comparisons expect.
        for name in ("exact", "prefixes", "allowed"):
            items = getattr(self, name)
            if isinstance(items, Iterable) and not isinstance(items, str):
                items = list(items)
                if all(isinstance(i, str) and i for i in items):
                    lowered = [i.lower() for i in items]
                    value = tuple(lowered) if name == "prefixes" else frozenset(lowered)
                    object.__setattr__(self, name, value)
                    continue
            raise ConfigurationError(f"IdRules.{name} must be a collection of non-empty strings")
        longest = max((len(e) for e in self.exact), default=0)
        object.__setattr__(self, "_safe_length", max(SHORT_ID_LENGTH, longest + 1))

    @classmethod
    def default(cls) -> IdRules:
        """The default rules: common placeholder values and short ``test_``-like ids."""
        return _DEFAULT_RULES

    def allowing(self, *items: str) -> IdRules:
        """Return rules that accept ``items`` (an item ending in ``_`` is a prefix)."""
        prefixes, exact = _split(items)
        return IdRules(
            exact=self.exact - exact,
            prefixes=tuple(p for p in self.prefixes if p not in prefixes),
            allowed=self.allowed | exact,
        )

    def forbidding(self, *items: str) -> IdRules:
        """Return rules that also refuse ``items`` (an item ending in ``_`` is a prefix)."""
        prefixes, exact = _split(items)
        return IdRules(
            exact=self.exact | exact,
            prefixes=self.prefixes + tuple(sorted(prefixes - set(self.prefixes))),
            allowed=self.allowed - exact,
        )

    def is_placeholder(self, value: str) -> bool:
        """True when ``value`` is a placeholder these rules refuse."""
        if len(value) >= self._safe_length:  # lower() never shortens a string
            return False
        low = value.lower()
        if low in self.exact:
            return True
        return (
            len(value) < SHORT_ID_LENGTH
            and low.startswith(self.prefixes)
            and low not in self.allowed
        )


def _split(items: tuple[str, ...]) -> tuple[set[str], frozenset[str]]:
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigurationError("id rule items must be non-empty strings")
    prefixes = {i.lower() for i in items if i.endswith("_")}
    exact = frozenset(i.lower() for i in items if not i.endswith("_"))
    return prefixes, exact


_DEFAULT_RULES = IdRules(
    exact=frozenset(_EXACT_PLACEHOLDERS),
    prefixes=tuple(_PLACEHOLDER_PREFIXES),
    allowed=frozenset(_PREFIX_EXCEPTIONS),
)
_global_rules = _DEFAULT_RULES
_rules_var: ContextVar[IdRules | None] = ContextVar("ctxvars_mw.id_rules", default=None)


def get_id_rules() -> IdRules:
    """The id rules in force here: the innermost ``use_id_rules``, else the process-wide ones."""
    rules = _rules_var.get()
    return _global_rules if rules is None else rules


def set_id_rules(rules: IdRules) -> None:
    """Make ``rules`` the process-wide id rules."""
    global _global_rules
    if not isinstance(rules, IdRules):
        raise TypeError("set_id_rules() takes an IdRules value")
    _global_rules = rules


@contextmanager
def use_id_rules(rules: IdRules) -> Iterator[IdRules]:
    """Make ``rules`` current for the block (task-local), restoring the previous rules after."""
    if not isinstance(rules, IdRules):
        raise TypeError("use_id_rules() takes an IdRules value")
    token = _rules_var.set(rules)
    try:
        yield rules
    finally:
        _rules_var.reset(token)


# Request, thread and run ids are identifiers, not secrets: they come from a PRNG seeded by
# the OS (and reseeded after fork), which is ~5x cheaper than a system call per id. Anything
# that must be unguessable (session ids) uses the ``secrets`` module instead.
_rng = random.Random(os.urandom(32))  # noqa: S311 - identifiers, not secrets
_getrandbits = _rng.getrandbits


def random_hex(nbytes: int) -> str:
    """``2 * nbytes`` random lowercase hex characters (the PRNG above, without the Python
    frame of ``Random.randbytes``)."""
    return _getrandbits(nbytes * 8).to_bytes(nbytes, "little").hex()


# Ids are drawn in batches: one draw of random bits for 64 ids (or id triples), cut apart
# in C, then handed out by ``list.pop()``. Per call that is a fifth fewer instructions for
# generate_ids() and a third fewer for generate_id() than a draw each time. pop() is atomic,
# so two threads never get the same id; a forked child empties the pools, or it would hand
# out the ids its parent will.
_POOL_SIZE = 64
_id_pool: list[str] = []
_id_triples: list[tuple[str, str, str]] = []
_pop_id = _id_pool.pop
_pop_triple = _id_triples.pop


def _after_fork_in_child() -> None:
    _rng.seed(os.urandom(32))
    _id_pool.clear()
    _id_triples.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _draw_ids(count: int) -> list[str]:
    """``count`` new ids from one draw: hex() puts a space after every 12 bytes, split() cuts
    there (no Python-level slicing)."""
    return _getrandbits(96 * count).to_bytes(12 * count, "little").hex(" ", 12).split()


def generate_id() -> str:
    """A new random id: 24 lowercase hex characters (96 bits)."""
    try:
        return _pop_id()
    except IndexError:
        ids = _draw_ids(_POOL_SIZE)
        new_id = ids.pop()  # not taken from the pool: another thread may empty it first
        _id_pool.extend(ids)
        return new_id


def generate_ids() -> tuple[str, str, str]:
    """Three random ids of 24 lowercase hex characters (96 bits each)."""
    try:
        return _pop_triple()
    except IndexError:
        ids = iter(_draw_ids(3 * _POOL_SIZE))
        triples = list(zip(ids, ids, ids, strict=True))
        new_ids = triples.pop()
        _id_triples.extend(triples)
        return new_ids


def is_valid_id(value: str, rules: IdRules | None = None) -> bool:
    """True when ``value`` is a well-formed, non-placeholder id under ``rules``."""
    if not isinstance(value, str):
        return False
    if rules is None:
        rules = get_id_rules()
    if _validated.get(value) is rules:
        return True
    if (
        not value
        or len(value) > MAX_ID_LENGTH
        or value.strip() != value
        or not value.isprintable()
        or rules.is_placeholder(value)
    ):
        return False
    remember(_validated, value, rules, _VALIDATED_MAX)
    return True


#: The longest id accepted anywhere.
MAX_ID_LENGTH = 256
# Ids already validated, with the rules that accepted them (a hit costs one dict lookup).
_validated: dict[str, IdRules] = {}
_VALIDATED_MAX = 4096


#: What an incoming request or correlation id header may look like.
HEADER_ID_RE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# The same rule as data, for ``not raw.translate(None, HEADER_ID_CHARS)`` with a length check
# (a third cheaper than the regex, for the middleware's hot path).
HEADER_ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
HEADER_ID_MAX = 128

_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
# Headers with a meaning of their own that an id may not be read from or written to.
_RESERVED_HEADERS = frozenset(
    ["authorization", "traceparent", "tracestate", "baggage", "sec-websocket-protocol"]
)


def check_id_header_names(
    request_id_header: object, correlation_id_header: object
) -> tuple[str, str]:
    """The two id header names, checked (ConfigurationError): tokens of at most 64 letters,
    digits and dashes, not a header with another meaning, and not the same name twice."""
    names = []
    for option, value in (
        ("request_id_header", request_id_header),
        ("correlation_id_header", correlation_id_header),
    ):
        if not isinstance(value, str) or not _HEADER_NAME_RE.fullmatch(value):
            raise ConfigurationError(f"{option} must be a header name")
        if value.lower() in _RESERVED_HEADERS:
            raise ConfigurationError(f"{option} may not be a header with another meaning")
        names.append(value)
    if names[0].lower() == names[1].lower():
        raise ConfigurationError("request_id_header and correlation_id_header must differ")
    return names[0], names[1]


_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def parse_traceparent(value: str | bytes | None) -> tuple[str, str, str] | None:
    """Return ``(trace_id, parent_id, flags)`` of a valid W3C traceparent, else None.

    Version ``ff`` and all-zero ids are invalid; version ``00`` allows no trailing data.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(value) > 512:
        return None
    match = _TRACEPARENT_RE.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if version == "00" and rest:
        return None
    return trace_id, parent_id, flags
