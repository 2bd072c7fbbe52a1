"""Every id rule: generated ids, incoming header ids, and the placeholder rules for all ids.

Id rules are an immutable :class:`IdRules` value. The current rules come from
:func:`use_id_rules` (a context manager, task-local) or :func:`set_id_rules` (process-wide);
they are never read from an environment variable.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from ._memo import remember
from .errors import ConfigurationError

__all__ = [
    "IdRules",
    "accept_header_id",
    "check_id_header_names",
    "generate_id",
    "generate_id_pair",
    "generate_ids",
    "get_id_rules",
    "is_valid_id",
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
    "-",
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
        """True when ``value`` is a placeholder these rules refuse.

        A value with characters beyond ASCII is compared in its folded form (see
        :func:`fold_confusables`), so ``anonymous`` spelled with a Cyrillic ``a`` or in
        fullwidth letters is the placeholder it reads as.
        """
        if value.isascii():
            if len(value) >= self._safe_length:  # lower() never shortens a string
                return False
            low = value.lower()
        else:
            low = fold_confusables(value)
        if low in self.exact:
            return True
        return (
            len(value) < SHORT_ID_LENGTH
            and low.startswith(self.prefixes)
            and low not in self.allowed
        )


# Letters of other scripts that read as a Latin letter (after NFKC and casefold). Not the
# whole Unicode confusables table: the letters that spell placeholder and reserved names.
_CONFUSABLES = str.maketrans(
    # Cyrillic, Greek and Armenian letters (as escapes: they look like the Latin ones) ...
    "\u0430\u0432\u0435\u0451\u043a\u043c\u043d\u043e\u0440\u0441\u0442\u0443"
    "\u0445\u0456\u0457\u0458\u0455\u0501\u051b\u051d\u04bb\u04cf\u0261\u0131"
    "\u03b1\u03b2\u03b5\u03b9\u03ba\u03bd\u03bf\u03c1\u03c4\u03c5\u03c7\u03c9"
    "\u0578\u057d\u0585\u0581",
    # ... and the Latin letters they read as.
    "abeekmhopctyxiijsdqwhlgiabeikvoptuxwnuog",
)


def fold_confusables(value: str) -> str:
    """``value`` as the placeholder rules compare it: NFKC-normalised (fullwidth and styled
    letters become plain ones), case-folded, and letters of other scripts that read as Latin
    ones replaced by them."""
    return unicodedata.normalize("NFKC", value).casefold().translate(_CONFUSABLES)


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
# Set only by use_id_rules; unset, the process-wide rules apply.
_rules_var: ContextVar[IdRules] = ContextVar("ctxvars_mw.id_rules")


def get_id_rules() -> IdRules:
    """The id rules in force here: the innermost ``use_id_rules``, else the process-wide ones."""
    return _rules_var.get(_global_rules)


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


# Ids are drawn from the OS's random source in batches: one ``os.urandom`` call for 128 ids,
# cut apart in C (``hex()`` puts a space after every 12 bytes, ``split(" ")`` cuts there), then
# handed out by ``list.pop()``, which is atomic, so two threads never get the same id. A forked
# child empties the pool, or it would hand out the ids its parent will.
_POOL_SIZE = 128
_id_pool: list[str] = []
#: A new random id from the pool, without a function call of its own: raises IndexError when
#: the pool is empty, and :func:`generate_id` then refills it. For the per-request path;
#: anything else calls :func:`generate_id`.
pop_id = _id_pool.pop


def _draw(count: int) -> list[str]:
    return os.urandom(12 * count).hex(" ", 12).split(" ")


os.register_at_fork(after_in_child=_id_pool.clear)


def generate_id() -> str:
    """A new random id: 24 lowercase hex characters (96 bits from ``os.urandom``)."""
    try:
        return pop_id()
    except IndexError:
        ids = _draw(_POOL_SIZE)
        new_id = ids.pop()  # not taken from the pool: another thread may empty it first
        _id_pool.extend(ids)
        return new_id


def generate_id_pair() -> tuple[str, str]:
    """Two new random ids (a new request's thread and run id)."""
    try:
        return pop_id(), pop_id()
    except IndexError:  # the pool ran out: generate_id refills it
        return generate_id(), generate_id()


def generate_ids() -> tuple[str, str, str]:
    """Three new random ids (thread, run and request id of a new context)."""
    try:
        return pop_id(), pop_id(), pop_id()
    except IndexError:  # the pool ran out: generate_id refills it
        return generate_id(), generate_id(), generate_id()


def random_hex(nbytes: int) -> str:
    """``2 * nbytes`` random lowercase hex characters (a W3C span id, say)."""
    return os.urandom(nbytes).hex()


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
HEADER_ID_MAX = 128
# The same rule as data: a table that maps those characters to themselves and every other
# byte to another one. ``raw.translate(_HEADER_ID_TABLE) is raw`` when nothing was changed
# (bytes.translate hands back its own object then): the cheapest whole-value check there is.
_HEADER_ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
_HEADER_ID_TABLE = bytes(c if c in _HEADER_ID_CHARS else c ^ 1 for c in range(256))


def accept_header_id(
    raw: bytes | None, rules: IdRules, validator: Callable[[str], bool] | None = None
) -> str | None:
    """The id an incoming ``X-Request-ID``-like header carries, when it is acceptable.

    Acceptable: 1 to 128 of ``[A-Za-z0-9._:-]``, not a placeholder under ``rules``, and, when
    a ``validator`` is given (e.g. UUIDs only), one it accepts. Anything else (absent,
    repeated, too long, odd characters, a placeholder) is None: the caller generates an id
    instead, or refuses the request. The value is never logged, and never echoed.
    """
    if not raw or len(raw) > HEADER_ID_MAX or raw.translate(_HEADER_ID_TABLE) is not raw:
        return None
    value = raw.decode()  # ASCII, checked above
    if len(value) < rules._safe_length and rules.is_placeholder(value):
        return None
    if validator is not None:
        try:
            if not validator(value):
                return None
        except Exception:  # a validator that raises refuses the id (never a 500)
            return None
    return value


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
