"""UserExecutionContext: the immutable, validated record of who a piece of work runs for."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

from . import ids as _ids
from ._memo import remember
from .errors import InvalidContextError, MaxDepthExceededError, PermissionEscalationError
from .frozen import EMPTY, FrozenMap, freeze_mapping, thaw
from .ids import MAX_ID_LENGTH, IdRules, generate_id, generate_ids, get_id_rules, is_valid_id
from .tier import Tier

__all__ = ["MAX_OPERATION_DEPTH", "RESERVED_METADATA_KEYS", "UserExecutionContext"]

#: The deepest a chain of child contexts may go (depth 10 is reachable, 11 is not).
MAX_OPERATION_DEPTH = 10
#: Keys that ``agent_context`` and ``audit_metadata`` may not carry.
RESERVED_METADATA_KEYS = frozenset(
    [
        "user_id",
        "thread_id",
        "run_id",
        "request_id",
        "created_at",
        "db_session",
        "websocket_client_id",
    ]
)
ANONYMOUS_USER_ID = "anonymous"
_EMPTY_SET: frozenset[str] = frozenset()
_FREE = Tier.FREE
_UTC = UTC
_now = datetime.now
_new = object.__new__
# What get_id_rules() and is_valid_id() read, for the inline fast paths of __new__.
_rules_get = _ids._rules_var.get
_validated_get = _ids._validated.get

#: Set by ctxvars_mw.testing.ContextRegistry while tracking is enabled; None costs nothing.
_track: Callable[[UserExecutionContext], None] | None = None


def _bad(message: str) -> NoReturn:
    raise InvalidContextError(message)


def _check_id(name: str, value: object, rules: IdRules) -> str:
    if type(value) is str and _validated_get(value) is rules:  # validated before: one lookup
        return value
    if isinstance(value, str) and is_valid_id(value, rules):
        return value
    if not isinstance(value, str):
        _bad(f"{name} must be a string")
    if not value or value.strip() != value or not value.isprintable():
        _bad(f"{name} must be a non-empty string without surrounding whitespace")
    if len(value) > MAX_ID_LENGTH:
        _bad(f"{name} is longer than {MAX_ID_LENGTH} characters")
    _bad(f"{name} is a placeholder value, not a real id")


def _check_names(name: str, value: object) -> frozenset[str]:
    if value is None:
        return _EMPTY_SET
    if type(value) is frozenset and _checked_names.get(value) is value:
        return value
    # Lists, tuples and sets skip the ABC check (an isinstance() against Iterable costs more
    # than building the set).
    if type(value) not in _PLAIN_COLLECTIONS and (
        isinstance(value, (str, bytes)) or not isinstance(value, Iterable)
    ):
        _bad(f"{name} must be a collection of strings, not a single value")
    try:
        items = value if isinstance(value, frozenset) else frozenset(value)  # type: ignore[call-overload]
    except TypeError:
        _bad(f"{name} must contain only non-empty strings")
    known = _checked_names.get(items)
    if known is not None:  # the same names passed before (a list from JSON, say): that set
        return known
    for v in items:  # a plain loop: half the cost of all() over a generator
        if not (isinstance(v, str) and v):
            _bad(f"{name} must contain only non-empty strings")
    if type(items) is frozenset:  # the same names may come again, as a set or a list
        remember(_checked_names, items, items, _CHECKED_NAMES_MAX)
    return items


# Name sets that passed _check_names, each mapped to itself. The same object (``is``) costs
# one lookup, for the frozensets a Policy hands out again and again; the same names in a new
# collection (a list from JSON or a token) cost building the set, and get the remembered one.
# Only sets of non-empty strs get in (a frozenset equals another only if its members do), so a
# hit is always a valid set. Bounded; cleared when full.
_checked_names: dict[frozenset[str], frozenset[str]] = {}
_PLAIN_COLLECTIONS = frozenset({list, tuple, set, frozenset})
_checked_names_get = _checked_names.get
_CHECKED_NAMES_MAX = 1024


def _given_ids(
    thread_id: object, run_id: object, request_id: object, rules: IdRules
) -> tuple[str, str, str]:
    """Thread, run and request id when at least one is given: checked, the rest generated."""
    gen = ("", "", "")
    if thread_id is None or run_id is None or request_id is None:
        gen = generate_ids()
    return (
        gen[0] if thread_id is None else _check_id("thread_id", thread_id, rules),
        gen[1] if run_id is None else _check_id("run_id", run_id, rules),
        gen[2] if request_id is None else _check_id("request_id", request_id, rules),
    )


def _check_metadata(name: str, value: object, *, reserved: bool = True) -> FrozenMap:
    if not isinstance(value, Mapping):
        _bad(f"{name} must be a mapping")
    try:
        frozen = freeze_mapping(value)
    except TypeError as exc:
        raise InvalidContextError(f"{name}: {exc}") from None
    if reserved and not RESERVED_METADATA_KEYS.isdisjoint(frozen):
        keys = ", ".join(sorted(RESERVED_METADATA_KEYS.intersection(frozen)))
        _bad(f"{name} may not carry reserved keys: {keys}")
    return frozen


def _check_tier(value: object) -> Tier:
    if isinstance(value, Tier):
        return value
    try:
        return Tier.parse(value)  # type: ignore[arg-type]
    except ValueError:
        _bad("tier must be one of: " + ", ".join(t.value for t in Tier))


def _check_depth(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        _bad("operation_depth must be an int")
    if value < 0:
        _bad("operation_depth must be >= 0")
    if value > MAX_OPERATION_DEPTH:
        raise MaxDepthExceededError(f"operation_depth may not exceed {MAX_OPERATION_DEPTH}")
    return value


def _check_created_at(value: object) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            _bad("created_at is not an ISO 8601 timestamp")
    if not isinstance(value, datetime) or value.tzinfo is None:
        _bad("created_at must be a timezone-aware datetime")
    return value.astimezone(_UTC)


def _check_trace_id(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) == 32 and value != _ZERO_TRACE:
        # fromhex() refuses anything but hex digits and whitespace; hex() gives back 32
        # lowercase digits, equal to ``value`` only when that is what it was. Half the cost
        # of value.strip("0123456789abcdef").
        try:
            if _fromhex(value).hex() == value:
                return value
        except ValueError:
            pass
    _bad("trace_id must be 32 lowercase hex characters, not all zero")


_ZERO_TRACE = "0" * 32
_fromhex = bytes.fromhex


def _check_optional_text(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        _bad(f"{name} must be a non-empty string")
    return value


class _ContextBase:
    """Holds the ``__weakref__`` slot, so that the field slots of the context and of its
    mutable twin (``_Filler``) have the same layout and ``__class__`` can switch between them."""

    __slots__ = ("__weakref__",)


@dataclass(frozen=True, slots=True, init=False)
class UserExecutionContext(_ContextBase):
    """Who a request (or a sub-operation of one) runs for, immutable and validated.

    Build it with keyword arguments; derive sub-operations with :meth:`child` and copies with
    :meth:`replace`. Ids left out are generated; ``correlation_id`` defaults to ``request_id``.
    """

    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    correlation_id: str
    session_id: str | None = None
    tier: Tier = Tier.FREE
    roles: frozenset[str] = _EMPTY_SET
    permissions: frozenset[str] = _EMPTY_SET
    features: frozenset[str] = _EMPTY_SET
    claims: Mapping[str, Any] = EMPTY
    auth_method: str | None = None
    is_authenticated: bool = True
    agent_context: Mapping[str, Any] = EMPTY
    audit_metadata: Mapping[str, Any] = EMPTY
    websocket_client_id: str | None = None
    trace_id: str | None = None
    operation: str | None = None
    operation_depth: int = 0
    parent_request_id: str | None = None
    created_at: datetime = field(default_factory=lambda: _now(_UTC))
    db_session: Any = field(default=None, compare=False, hash=False, repr=False)

    # Built in __new__, not __init__: __init__ would be handed an instance of this frozen
    # class and have to switch it to _Filler and back, and each ``__class__`` assignment
    # costs ~500 instructions (CPython compares the two classes' slots). __new__ fills a new
    # _Filler and switches it once.
    def __new__(
        cls,
        *,
        user_id: str,
        thread_id: str | None = None,
        run_id: str | None = None,
        request_id: str | None = None,
        correlation_id: str | None = None,
        session_id: str | None = None,
        tier: Tier | str = Tier.FREE,
        roles: Iterable[str] = _EMPTY_SET,
        permissions: Iterable[str] = _EMPTY_SET,
        features: Iterable[str] = _EMPTY_SET,
        claims: Mapping[str, Any] | None = None,
        auth_method: str | None = None,
        is_authenticated: bool = True,
        agent_context: Mapping[str, Any] | None = None,
        audit_metadata: Mapping[str, Any] | None = None,
        websocket_client_id: str | None = None,
        trace_id: str | None = None,
        operation: str | None = None,
        operation_depth: int = 0,
        parent_request_id: str | None = None,
        created_at: datetime | None = None,
        db_session: Any = None,
    ) -> UserExecutionContext:
        # The common values are accepted inline (an ``is``, a type check or a memo lookup):
        # a Python call per field would be a large share of the constructor's cost. Anything
        # else, and every refusal, goes through the full check of the field.
        rules = _rules_get()  # get_id_rules(), inline
        if rules is None:
            rules = _ids._global_rules
        if not isinstance(is_authenticated, bool):
            _bad("is_authenticated must be a bool")
        if (is_authenticated or user_id != ANONYMOUS_USER_ID) and (
            type(user_id) is not str or _validated_get(user_id) is not rules
        ):
            _check_id("user_id", user_id, rules)
        if thread_id is None and run_id is None and request_id is None:
            thread_id, run_id, request_id = generate_ids()
        else:
            thread_id, run_id, request_id = _given_ids(thread_id, run_id, request_id, rules)
        if type(tier) is not Tier:
            tier = _check_tier(tier)
        # Name sets: the shared empty set, or a frozenset that passed before (_check_names).
        if roles is not _EMPTY_SET and (
            type(roles) is not frozenset or _checked_names_get(roles) is not roles
        ):
            roles = _check_names("roles", roles)
        if permissions is not _EMPTY_SET and (
            type(permissions) is not frozenset or _checked_names_get(permissions) is not permissions
        ):
            permissions = _check_names("permissions", permissions)
        if features is not _EMPTY_SET and (
            type(features) is not frozenset or _checked_names_get(features) is not features
        ):
            features = _check_names("features", features)
        # The middleware gives anonymous requests the free tier's features; those are kept.
        if user_id == ANONYMOUS_USER_ID and (tier is not _FREE or roles or permissions):
            _bad("the anonymous context has tier FREE and no roles or permissions")
        # The remaining checks run in field order, as they always have (so that, of two bad
        # values, the same one is reported).
        if correlation_id is None:
            correlation_id = request_id
        else:
            correlation_id = _check_id("correlation_id", correlation_id, rules)
        if session_id is not None and (
            type(session_id) is not str or _validated_get(session_id) is not rules
        ):
            _check_id("session_id", session_id, rules)
        claims = EMPTY if claims is None else _check_metadata("claims", claims, reserved=False)
        if auth_method is not None and not (
            type(auth_method) is str and auth_method.isprintable() and auth_method.strip()
        ):
            _check_optional_text("auth_method", auth_method)
        return _fill(
            _new(_Filler),
            user_id,
            thread_id,
            run_id,
            request_id,
            correlation_id,
            session_id,
            tier,
            roles,
            permissions,
            features,
            claims,
            auth_method,
            is_authenticated,
            EMPTY if agent_context is None else _check_metadata("agent_context", agent_context),
            EMPTY if audit_metadata is None else _check_metadata("audit_metadata", audit_metadata),
            None
            if websocket_client_id is None
            else _check_id("websocket_client_id", websocket_client_id, rules),
            None if trace_id is None else _check_trace_id(trace_id),
            None if operation is None else _check_optional_text("operation", operation),
            0
            if operation_depth == 0 and type(operation_depth) is int
            else _check_depth(operation_depth),
            None
            if parent_request_id is None
            else _check_id("parent_request_id", parent_request_id, rules),
            _now(_UTC) if created_at is None else _check_created_at(created_at),
            db_session,
        )

    # -- construction helpers -------------------------------------------------------------

    @classmethod
    def anonymous(cls, **kwargs: Any) -> UserExecutionContext:
        """The unauthenticated context: user ``"anonymous"``, tier FREE, nothing granted."""
        for key in ("user_id", "is_authenticated"):
            if key in kwargs:
                _bad(f"anonymous() sets {key} itself")
        return cls(user_id=ANONYMOUS_USER_ID, is_authenticated=False, **kwargs)

    def child(
        self,
        operation: str,
        *,
        agent_context: Mapping[str, Any] | None = None,
        audit_metadata: Mapping[str, Any] | None = None,
        permissions: Iterable[str] | None = None,
    ) -> UserExecutionContext:
        """Derive the context of a sub-operation: same user and ids, one level deeper.

        ``permissions``, when given, narrows the child's permissions; asking for one the
        parent does not hold raises :class:`PermissionEscalationError`.
        """
        if not isinstance(operation, str) or not operation.strip() or not operation.isprintable():
            _bad("operation must be a non-empty string")
        depth = self.operation_depth + 1
        if depth > MAX_OPERATION_DEPTH:
            raise MaxDepthExceededError(f"operation_depth may not exceed {MAX_OPERATION_DEPTH}")
        perms = self.permissions
        if permissions is not None:
            perms = _check_names("permissions", permissions)
            extra = sorted(p for p in perms if not self.has_permission(p))
            if extra:
                raise PermissionEscalationError(
                    "a child context may only narrow its parent's permissions",
                    required=extra,
                )
        agent = self.agent_context
        if agent_context is not None:
            agent = agent.merged(_check_metadata("agent_context", agent_context))  # type: ignore[attr-defined]
        audit = self.audit_metadata
        if audit_metadata is not None:
            audit = audit.merged(_check_metadata("audit_metadata", audit_metadata))  # type: ignore[attr-defined]
        return _fill(
            _new(_Filler),
            self.user_id,
            self.thread_id,
            self.run_id,
            generate_id(),
            self.correlation_id,
            self.session_id,
            self.tier,
            self.roles,
            perms,
            self.features,
            self.claims,
            self.auth_method,
            self.is_authenticated,
            agent,
            audit,
            self.websocket_client_id,
            self.trace_id,
            operation,
            depth,
            self.request_id,
            _now(_UTC),
            self.db_session,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle and copy: the default reduction calls ``cls.__new__(cls)``, which needs the
        fields; restore the state (``__setstate__``) on a bare instance instead, as before."""
        return (_bare, (), self.__getstate__())

    def replace(self, **changes: Any) -> UserExecutionContext:
        """A validated copy with ``changes`` applied."""
        values = {f.name: getattr(self, f.name) for f in _FIELDS}
        unknown = set(changes) - values.keys()
        if unknown:
            _bad(f"unknown field(s): {', '.join(sorted(unknown))}")
        values.update(changes)
        return UserExecutionContext(**values)

    def with_db_session(self, session: Any) -> UserExecutionContext:
        """A copy carrying ``session`` (a database session) as ``db_session``."""
        if session is None:
            _bad("with_db_session() needs a session")
        return evolve(self, db_session=session)

    def with_websocket_client(self, client_id: str) -> UserExecutionContext:
        """A copy bound to a websocket client id."""
        if not client_id:
            _bad("with_websocket_client() needs a client id")
        return evolve(
            self,
            websocket_client_id=_check_id("websocket_client_id", client_id, get_id_rules()),
        )

    # -- checks ----------------------------------------------------------------------------

    def has_role(self, role: str) -> bool:
        """True when the context holds ``role``."""
        return role in self.roles

    def has_permission(self, permission: str) -> bool:
        """True when ``permission`` is held, directly or through ``resource:*`` or ``*``."""
        perms = self.permissions
        if permission in perms:
            return True
        if not perms:
            return False
        if "*" in perms:
            return True
        head, sep, _ = permission.rpartition(":")
        while sep:
            if head + ":*" in perms:
                return True
            head, sep, _ = head.rpartition(":")
        return False

    def has_feature(self, name: str) -> bool:
        """True when the context's tier grants feature ``name``."""
        return name in self.features

    def tier_at_least(self, tier: Tier | str) -> bool:
        """True when the context's tier is ``tier`` or above."""
        return self.tier >= Tier.parse(tier)

    # -- serialization ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field but ``db_session``."""
        return {
            "user_id": self.user_id,
            "thread_id": self.thread_id,
            "run_id": self.run_id,
            "request_id": self.request_id,
            "correlation_id": self.correlation_id,
            "session_id": self.session_id,
            "tier": self.tier.value,
            "roles": sorted(self.roles),
            "permissions": sorted(self.permissions),
            "features": sorted(self.features),
            "claims": thaw(self.claims),
            "auth_method": self.auth_method,
            "is_authenticated": self.is_authenticated,
            "agent_context": thaw(self.agent_context),
            "audit_metadata": thaw(self.audit_metadata),
            "websocket_client_id": self.websocket_client_id,
            "trace_id": self.trace_id,
            "operation": self.operation,
            "operation_depth": self.operation_depth,
            "parent_request_id": self.parent_request_id,
            "created_at": self.created_at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserExecutionContext:
        """Rebuild (and validate) a context from :meth:`to_dict` output."""
        if not isinstance(data, Mapping):
            _bad("from_dict() takes a mapping")
        unknown = set(data) - _SERIALIZED_NAMES
        if unknown:
            _bad(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        if "user_id" not in data:
            _bad("user_id is required")
        return cls(**data)

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> UserExecutionContext:
        """Rebuild a context from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except (ValueError, TypeError):
            _bad("not a JSON document")
        return cls.from_dict(data)

    def audit_trail(self) -> dict[str, Any]:
        """A flat, log-safe summary of the context (no claims, no metadata values)."""
        return {
            "user_id": self.user_id,
            "thread_id": self.thread_id,
            "run_id": self.run_id,
            "request_id": self.request_id,
            "correlation_id": self.correlation_id,
            "parent_request_id": self.parent_request_id,
            "operation": self.operation,
            "operation_depth": self.operation_depth,
            "tier": self.tier.value,
            "roles": sorted(self.roles),
            "auth_method": self.auth_method,
            "is_authenticated": self.is_authenticated,
            "session_id": self.session_id,
            "has_db_session": self.db_session is not None,
            "has_websocket": self.websocket_client_id is not None,
            "trace_id": self.trace_id,
            "created_at": self.created_at.isoformat(),
            "context_age_seconds": (_now(_UTC) - self.created_at).total_seconds(),
        }


def _frozen_setattr(self: object, name: str, value: object) -> NoReturn:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> NoReturn:
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


# A slotted frozen dataclass on 3.11 raises TypeError for names that are not fields;
# these make every assignment raise FrozenInstanceError (an AttributeError).
UserExecutionContext.__setattr__ = _frozen_setattr  # type: ignore[method-assign]
UserExecutionContext.__delattr__ = _frozen_delattr  # type: ignore[method-assign]

_FIELDS = dataclasses.fields(UserExecutionContext)
_FIELD_NAMES = tuple(f.name for f in _FIELDS)
_FIELD_INDEX = {name: i for i, name in enumerate(_FIELD_NAMES)}
_SERIALIZED_NAMES = frozenset(f.name for f in _FIELDS) - {"db_session"}


class _Filler(_ContextBase):
    """The mutable twin of UserExecutionContext: same slots, same layout.

    A frozen dataclass pays for ``object.__setattr__`` on every field (about 60 ns each, 22
    fields); plain attribute stores on this twin cost a fifth of that. :func:`_fill` fills the
    slots with already-validated values, then switches the object's class to the frozen one.
    """

    __slots__ = tuple(f.name for f in _FIELDS)


# A module function, not _Filler.__init__: ``_fill(_new(_Filler), ...)`` skips the generic
# type call (an argument tuple, a lookup of __init__ and a call from C).
def _fill(
    self: Any,  # a _Filler (typed Any: its slots are not declared to the type checker)
    user_id: str,
    thread_id: str,
    run_id: str,
    request_id: str,
    correlation_id: str,
    session_id: str | None,
    tier: Tier,
    roles: frozenset[str],
    permissions: frozenset[str],
    features: frozenset[str],
    claims: Mapping[str, Any],
    auth_method: str | None,
    is_authenticated: bool,
    agent_context: Mapping[str, Any],
    audit_metadata: Mapping[str, Any],
    websocket_client_id: str | None,
    trace_id: str | None,
    operation: str | None,
    operation_depth: int,
    parent_request_id: str | None,
    created_at: datetime,
    db_session: Any,
) -> UserExecutionContext:
    self.user_id = user_id
    self.thread_id = thread_id
    self.run_id = run_id
    self.request_id = request_id
    self.correlation_id = correlation_id
    self.session_id = session_id
    self.tier = tier
    self.roles = roles
    self.permissions = permissions
    self.features = features
    self.claims = claims
    self.auth_method = auth_method
    self.is_authenticated = is_authenticated
    self.agent_context = agent_context
    self.audit_metadata = audit_metadata
    self.websocket_client_id = websocket_client_id
    self.trace_id = trace_id
    self.operation = operation
    self.operation_depth = operation_depth
    self.parent_request_id = parent_request_id
    self.created_at = created_at
    self.db_session = db_session
    self.__class__ = UserExecutionContext
    if _track is not None:
        _track(self)
    return self  # type: ignore[no-any-return]


def _bare() -> UserExecutionContext:
    """An empty instance, for unpickling (its slots are then filled by ``__setstate__``)."""
    return _new(UserExecutionContext)


def evolve(ctx: UserExecutionContext, **changes: Any) -> UserExecutionContext:
    """A copy of ``ctx`` with ``changes`` applied WITHOUT validation (internal).

    For callers that have already validated (and, for mappings, frozen) every changed value;
    anything else must go through :meth:`UserExecutionContext.replace`.
    """
    values = [getattr(ctx, name) for name in _FIELD_NAMES]
    for name, value in changes.items():
        values[_FIELD_INDEX[name]] = value
    return _fill(_new(_Filler), *values)


def request_context(
    user_id: str,
    thread_id: str,
    run_id: str,
    request_id: str,
    correlation_id: str,
    trace_id: str | None,
    websocket_client_id: str | None,
    session_id: str | None,
    tier: Tier,
    roles: frozenset[str],
    permissions: frozenset[str],
    features: frozenset[str],
    claims: Mapping[str, Any],
    auth_method: str | None,
    is_authenticated: bool,
    created_at: datetime | None = None,
) -> UserExecutionContext:
    """The middleware's fast path: a root context from values it has already validated.

    Every argument is positional and required: this runs once per request, and a keyword
    call with defaults costs more than the rest of the function.
    """
    return _fill(
        _new(_Filler),
        user_id,
        thread_id,
        run_id,
        request_id,
        correlation_id,
        session_id,
        tier,
        roles,
        permissions,
        features,
        claims,
        auth_method,
        is_authenticated,
        EMPTY,
        EMPTY,
        websocket_client_id,
        trace_id,
        None,
        0,
        None,
        _now(_UTC) if created_at is None else created_at,
        None,
    )
