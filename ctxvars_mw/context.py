"""UserExecutionContext: the immutable, validated record of who a piece of work runs for.

The fields are declared once, in the class body; equality, hashing, ``repr``,
``to_dict``/``from_dict``, ``replace``, pickling and the copies that
:meth:`~UserExecutionContext.child` and a request's context start from are derived from that
declaration. Adding a field means declaring it and giving the keyword constructor its
parameter and check.

Two ways in:

* **The keyword constructor** (``UserExecutionContext(user_id=...)``, ``from_dict``,
  ``replace``) checks every value and raises :class:`InvalidContextError`.
* **Derivation** from a context that passed those checks — :meth:`child`, a request's context
  from its caller's (:func:`request_context`) — copies the checked fields and sets only the ones
  that change.

A frozen dataclass pays ``object.__setattr__`` for each field it sets; both ways fill
``_Filler``, a subclass that adds no slots and takes plain attribute stores, and then seal it:
switch its class to the frozen one (at a fifth of the cost), and hand the new context to
``_track`` while a testing registry is on. :func:`_seal` does that; the three hot paths (the
keyword constructor, :meth:`~UserExecutionContext.child` and :func:`request_context`) write
its three lines out to save the call.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from . import ids
from ._memo import remember
from .errors import InvalidContextError, MaxDepthExceededError, PermissionEscalationError
from .frozen import EMPTY, FrozenMap, freeze_mapping, thaw
from .ids import (
    MAX_ID_LENGTH,
    IdRules,
    generate_id,
    generate_id_pair,  # noqa: F401 - used by the generated request_context
    generate_ids,
    get_id_rules,
    is_valid_id,
    pop_id,  # noqa: F401 - used by the generated request_context
)
from .proxies import canonical_ip
from .tier import Tier
from .w3c import is_trace_id, trace_of

__all__ = [
    "MAX_METHOD_LENGTH",
    "MAX_OPERATION_DEPTH",
    "MAX_PATH_LENGTH",
    "MAX_USER_AGENT_LENGTH",
    "REQUEST_METADATA_FIELDS",
    "RESERVED_METADATA_KEYS",
    "UserExecutionContext",
]

#: The deepest a chain of child contexts may go (depth 10 is reachable, 11 is not).
MAX_OPERATION_DEPTH = 10
#: The fields that describe the request a context was made for (see
#: :mod:`ctxvars_mw.request_metadata`), in their declared order.
REQUEST_METADATA_FIELDS = ("client_ip", "user_agent", "method", "path")
#: The longest ``user_agent`` a context holds, in characters (the middleware cuts longer ones).
MAX_USER_AGENT_LENGTH = 256
#: The longest ``method`` a context holds.
MAX_METHOD_LENGTH = 32
#: The longest ``path`` a context holds, in characters (the middleware cuts longer ones).
MAX_PATH_LENGTH = 2048
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
_UTC = UTC
_now = datetime.now
_time = time.time_ns
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_new = object.__new__
_set = object.__setattr__
# The declared default of a field the constructor fills in when it is left out (a generated
# id, the request id, the current time). Typed Any so that it can stand for a str or a datetime.
_GENERATED: Any = None

#: Set by ctxvars_mw.testing.ContextRegistry while tracking is enabled; None costs nothing.
_track: Callable[[UserExecutionContext], None] | None = None


def _bad(message: str) -> NoReturn:
    raise InvalidContextError(message)


@dataclass(frozen=True, slots=True, weakref_slot=True, init=False)
class UserExecutionContext:
    """Who a request (or a sub-operation of one) runs for, immutable and validated.

    Build it with keyword arguments; derive sub-operations with :meth:`child` and copies with
    :meth:`replace`. Ids left out are generated; ``correlation_id`` defaults to ``request_id``.
    """

    user_id: str
    thread_id: str = _GENERATED
    run_id: str = _GENERATED
    request_id: str = _GENERATED
    correlation_id: str = _GENERATED
    session_id: str | None = None
    tier: Tier = Tier.FREE
    roles: frozenset[str] = _EMPTY_SET
    permissions: frozenset[str] = _EMPTY_SET
    features: frozenset[str] = _EMPTY_SET
    #: The OAuth scopes the caller's token carries (also part of ``permissions``).
    scopes: frozenset[str] = _EMPTY_SET
    claims: Mapping[str, Any] = EMPTY
    auth_method: str | None = None
    #: The OAuth client the caller's token was issued to, when the token names one.
    client_id: str | None = None
    is_authenticated: bool = True
    agent_context: Mapping[str, Any] = EMPTY
    audit_metadata: Mapping[str, Any] = EMPTY
    websocket_client_id: str | None = None
    trace_id: str | None = None
    #: The W3C trace flags that came with ``trace_id`` (``0x01`` sampled, ``0x02`` random
    #: trace id); 0 without a trace id.
    trace_flags: int = 0
    operation: str | None = None
    operation_depth: int = 0
    parent_request_id: str | None = None
    #: The request's client address, canonical (``203.0.113.7``, ``2001:db8::1``): the peer's,
    #: or the one trusted proxies forwarded. None outside a request or when not recorded.
    client_ip: str | None = None
    #: The request's ``User-Agent``, sanitised, at most :data:`MAX_USER_AGENT_LENGTH` characters.
    user_agent: str | None = None
    #: The request's HTTP method (None on a websocket).
    method: str | None = None
    #: The request's path without its query string, sanitised, at most :data:`MAX_PATH_LENGTH`.
    path: str | None = None
    created_at: datetime = _GENERATED
    db_session: Any = field(default=None, compare=False, hash=False, repr=False)

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
        roles: Iterable[str] | None = _EMPTY_SET,
        permissions: Iterable[str] | None = _EMPTY_SET,
        features: Iterable[str] | None = _EMPTY_SET,
        scopes: Iterable[str] | None = _EMPTY_SET,
        claims: Mapping[str, Any] | None = EMPTY,
        auth_method: str | None = None,
        client_id: str | None = None,
        is_authenticated: bool = True,
        agent_context: Mapping[str, Any] | None = EMPTY,
        audit_metadata: Mapping[str, Any] | None = EMPTY,
        websocket_client_id: str | None = None,
        trace_id: str | None = None,
        trace_flags: int = 0,
        operation: str | None = None,
        operation_depth: int = 0,
        parent_request_id: str | None = None,
        client_ip: str | None = None,
        user_agent: str | None = None,
        method: str | None = None,
        path: str | None = None,
        created_at: datetime | str | None = None,
        db_session: Any = None,
    ) -> UserExecutionContext:
        # The keyword constructor: every value checked (InvalidContextError), in field order,
        # so of two bad values the first is reported. The common values are accepted with an
        # ``is`` or a memo lookup (an absent optional value skips its check's call). The
        # checked values go straight into the slots of a ``_Filler`` (see the module
        # docstring), which is then sealed.
        rules = get_id_rules()
        if type(is_authenticated) is not bool:
            _bad("is_authenticated must be a bool")
        new: Any = _new(_Filler)  # typed Any: its slots are not declared to the type checker
        if user_id != ANONYMOUS_USER_ID or is_authenticated:
            _check_id("user_id", user_id, rules)
        new.user_id = user_id
        if thread_id is None and run_id is None and request_id is None:  # one draw for all
            new.thread_id, new.run_id, request_id = generate_ids()
        else:
            new.thread_id = (
                generate_id() if thread_id is None else _id("thread_id", thread_id, rules)
            )
            new.run_id = generate_id() if run_id is None else _id("run_id", run_id, rules)
            request_id = (
                generate_id() if request_id is None else _id("request_id", request_id, rules)
            )
        new.request_id = request_id
        new.correlation_id = (
            request_id if correlation_id is None else _id("correlation_id", correlation_id, rules)
        )
        new.session_id = None if session_id is None else _id("session_id", session_id, rules)
        new.tier = tier if type(tier) is Tier else _check_tier(tier)
        new.roles = _EMPTY_SET if roles is _EMPTY_SET else _check_names("roles", roles)
        new.permissions = (
            _EMPTY_SET if permissions is _EMPTY_SET else _check_names("permissions", permissions)
        )
        new.features = _EMPTY_SET if features is _EMPTY_SET else _check_names("features", features)
        new.scopes = _EMPTY_SET if scopes is _EMPTY_SET else _check_names("scopes", scopes)
        if user_id == ANONYMOUS_USER_ID and (
            new.tier is not Tier.FREE or new.roles or new.permissions or new.scopes
        ):
            _bad("the anonymous context has tier FREE and no roles, permissions or scopes")
        new.claims = EMPTY if claims is EMPTY else _check_metadata("claims", claims, reserved=False)
        new.auth_method = (
            None if auth_method is None else _check_optional_text("auth_method", auth_method)
        )
        new.client_id = None if client_id is None else _check_optional_text("client_id", client_id)
        new.is_authenticated = is_authenticated
        new.agent_context = (
            EMPTY if agent_context is EMPTY else _check_metadata("agent_context", agent_context)
        )
        new.audit_metadata = (
            EMPTY if audit_metadata is EMPTY else _check_metadata("audit_metadata", audit_metadata)
        )
        new.websocket_client_id = (
            None
            if websocket_client_id is None
            else _id("websocket_client_id", websocket_client_id, rules)
        )
        if trace_id is not None and not is_trace_id(trace_id):
            _bad("trace_id must be 32 lowercase hex characters, not all zero")
        new.trace_id = trace_id
        new.trace_flags = 0 if trace_flags == 0 else _check_trace_flags(trace_flags, trace_id)
        new.operation = None if operation is None else _check_optional_text("operation", operation)
        new.operation_depth = (
            0
            if operation_depth == 0 and type(operation_depth) is int
            else _check_depth(operation_depth)
        )
        new.parent_request_id = (
            None
            if parent_request_id is None
            else _id("parent_request_id", parent_request_id, rules)
        )
        new.client_ip = None if client_ip is None else _check_client_ip(client_ip)
        new.user_agent = (
            None
            if user_agent is None
            else _check_request_text("user_agent", user_agent, MAX_USER_AGENT_LENGTH)
        )
        new.method = (
            None if method is None else _check_request_text("method", method, MAX_METHOD_LENGTH)
        )
        new.path = None if path is None else _check_request_text("path", path, MAX_PATH_LENGTH)
        new.created_at = _time() if created_at is None else _check_created_at(created_at)
        new.db_session = db_session
        new.__class__ = UserExecutionContext  # sealed as _seal does (see the module docstring)
        if _track is not None:
            _track(new)
        return new  # type: ignore[no-any-return]

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
        new = _child_copy(self)  # every field but those of _CHILD_FIELDS, set below
        if permissions is not None:
            narrowed = _check_names("permissions", permissions)
            extra = sorted(p for p in narrowed if not self.has_permission(p))
            if extra:
                raise PermissionEscalationError(
                    "a child context may only narrow its parent's permissions", required=extra
                )
            new.permissions = narrowed
        if agent_context is not None:
            new.agent_context = self.agent_context.merged(  # type: ignore[attr-defined]
                _check_metadata("agent_context", agent_context)
            )
        if audit_metadata is not None:
            new.audit_metadata = self.audit_metadata.merged(  # type: ignore[attr-defined]
                _check_metadata("audit_metadata", audit_metadata)
            )
        new.request_id = generate_id()
        new.operation = operation
        new.operation_depth = depth
        new.parent_request_id = self.request_id
        new.created_at = _time()
        new.__class__ = UserExecutionContext  # sealed as _seal does (see the module docstring)
        if _track is not None:
            _track(new)
        return new  # type: ignore[no-any-return]

    def replace(self, **changes: Any) -> UserExecutionContext:
        """A validated copy with ``changes`` applied."""
        unknown = changes.keys() - _FIELD_NAMES
        if unknown:
            _bad(f"unknown field(s): {', '.join(sorted(unknown))}")
        return UserExecutionContext(**{name: getattr(self, name) for name in _SLOTS} | changes)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle and copy: rebuild the slots on a bare instance (``__new__`` needs the
        fields as keywords, which the default reduction does not pass)."""
        return (_bare, (), self.__getstate__())

    def with_db_session(self, session: Any) -> UserExecutionContext:
        """A copy carrying ``session`` (a database session) as ``db_session``."""
        if session is None:
            _bad("with_db_session() needs a session")
        return evolve(self, db_session=session)

    def with_websocket_client(self, client_id: str) -> UserExecutionContext:
        """A copy bound to a websocket client id."""
        if not client_id:
            _bad("with_websocket_client() needs a client id")
        _check_id("websocket_client_id", client_id, get_id_rules())
        return evolve(self, websocket_client_id=client_id)

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
        """A JSON-serializable dict of every field but ``db_session``: the tier as its value,
        name sets as sorted lists, mappings as plain dicts, ``created_at`` in ISO 8601."""
        return {name: _plain(getattr(self, name)) for name in _SERIALIZED_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserExecutionContext:
        """Rebuild (and validate) a context from :meth:`to_dict` output."""
        if not isinstance(data, Mapping):
            _bad("from_dict() takes a mapping")
        unknown = set(data) - set(_SERIALIZED_NAMES)
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
            "client_id": self.client_id,
            "is_authenticated": self.is_authenticated,
            "session_id": self.session_id,
            "has_db_session": self.db_session is not None,
            "has_websocket": self.websocket_client_id is not None,
            "trace_id": self.trace_id,
            "trace_flags": self.trace_flags,
            "client_ip": self.client_ip,
            "user_agent": self.user_agent,
            "method": self.method,
            "path": self.path,
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


# -- fields read on first use -------------------------------------------------------------
#
# A few fields are costly to make and often never read: their slot holds what they are made
# of until one of them is first read, which makes the field (and the others of its group)
# and keeps it. The raw value's type is never the field's own, so each field tells from its
# own slot whether it was read: a read is one slot read and one type check once the field
# holds its value, and a thread that reads a field while another is storing its group sees
# the raw value (and makes the same values itself) or the field's value. Equality, hashing,
# ``repr``, pickling and ``to_dict`` read the fields, so nothing outside this module sees a
# raw value; copies carry it as it is (``_RAW_SLOTS``).

#: The slot (member descriptor) of each field read on first use, by name.
_RAW_SLOTS: dict[str, Any] = {}


def _read_on_first_use(name: str, raw: type, fill: Callable[[Any, Any], None]) -> Any:
    """Make field ``name`` read on first use: while its slot holds a value of type ``raw``,
    a read calls ``fill(ctx, value)``, which stores the field (and its group); returns the
    field's slot."""
    slot = UserExecutionContext.__dict__[name]
    get = slot.__get__

    def read(ctx: Any) -> Any:
        value = get(ctx)
        if type(value) is raw:
            fill(ctx, value)
            value = get(ctx)
        return value

    read.__name__ = read.__qualname__ = name
    setattr(UserExecutionContext, name, property(read, slot.__set__, slot.__delete__))
    _RAW_SLOTS[name] = slot
    return slot


def _fill_created_at(ctx: Any, ns: int) -> None:
    """``created_at``: a new context's slot holds ``time.time_ns()`` (a seventh of the cost
    of ``datetime.now(UTC)``, on every request and child), turned into the timezone-aware UTC
    datetime (truncated to the microsecond, as ``datetime.now`` does)."""
    _CREATED_AT_SLOT.__set__(ctx, _EPOCH + timedelta(microseconds=ns // 1000))


def _fill_trace(ctx: Any, traceparent: bytes) -> None:
    """``trace_id`` and ``trace_flags``: a request's context keeps its raw ``traceparent``
    header (bytes) in both slots, read (:func:`~ctxvars_mw.w3c.trace_of`: the trace id and
    flags of a valid header, else none) when either field is first read. A request whose
    trace nobody reads pays no parse; one that is read pays it once."""
    trace_id, flags = trace_of(traceparent)
    _TRACE_ID_SLOT.__set__(ctx, trace_id)
    _TRACE_FLAGS_SLOT.__set__(ctx, flags)


def _fill_metadata(ctx: Any, captured: tuple[Any, ...]) -> None:
    """``client_ip``, ``user_agent``, ``method`` and ``path``: a request's context keeps what
    its middleware took of the request (``MetadataReader.capture``: the reader first, then
    the request's raw values, a tuple) in the four slots, cleaned by that reader
    (``MetadataReader.clean``) when one of the four is first read. A request whose metadata
    nobody reads pays no cleaning; one that is read pays it once."""
    client_ip, user_agent, method, path = captured[0].clean(captured)
    _CLIENT_IP_SLOT.__set__(ctx, client_ip)
    _USER_AGENT_SLOT.__set__(ctx, user_agent)
    _METHOD_SLOT.__set__(ctx, method)
    _PATH_SLOT.__set__(ctx, path)


_CREATED_AT_SLOT = _read_on_first_use("created_at", int, _fill_created_at)
_TRACE_ID_SLOT = _read_on_first_use("trace_id", bytes, _fill_trace)
_TRACE_FLAGS_SLOT = _read_on_first_use("trace_flags", bytes, _fill_trace)
_CLIENT_IP_SLOT, _USER_AGENT_SLOT, _METHOD_SLOT, _PATH_SLOT = (
    _read_on_first_use(name, tuple, _fill_metadata) for name in REQUEST_METADATA_FIELDS
)
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(UserExecutionContext))
_SLOTS = tuple(f.name for f in dataclasses.fields(UserExecutionContext))
_SERIALIZED_NAMES = tuple(name for name in _SLOTS if name != "db_session")


class _Filler(UserExecutionContext):
    """UserExecutionContext with plain attribute stores (see the module docstring).

    It adds no slots, so its instances have the context's layout and sealing one is a cheap
    ``__class__`` switch. Made with ``object.__new__`` (the keyword constructor is not run);
    only ever seen inside this module, between its copy (or the keyword constructor's
    checks) and its seal. The fields read on first use are its plain slots (``_RAW_SLOTS``):
    it is stored into, never read as a context.
    """

    __slots__ = ()
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__


for _name, _slot in _RAW_SLOTS.items():
    setattr(_Filler, _name, _slot)


def _compile_copy(name: str, skip: frozenset[str]) -> Callable[[UserExecutionContext], Any]:
    """``name(ctx)``: a ``_Filler`` holding every field of ``ctx`` but those in ``skip``, which
    its caller sets itself (a store into a slot already filled costs more than into an empty
    one).

    Generated from the field declarations, as dataclasses generates ``__init__``: one plain
    attribute copy per field (a field read on first use through its slot, as it is), with no
    loop and no ``getattr``/``setattr`` calls.
    """
    lines = [f"def {name}(src):", "    new = _new(_Filler)"]
    reads = {slot: f"_raw_{slot}(src)" if slot in _RAW_SLOTS else f"src.{slot}" for slot in _SLOTS}
    lines += [f"    new.{slot} = {reads[slot]}" for slot in _SLOTS if slot not in skip]
    lines.append("    return new")
    namespace: dict[str, Any] = {"_new": _new, "_Filler": _Filler}
    namespace.update((f"_raw_{slot}", member.__get__) for slot, member in _RAW_SLOTS.items())
    exec("\n".join(lines), namespace)  # noqa: S102 - source built above from the field names
    copy: Callable[[UserExecutionContext], Any] = namespace[name]
    return copy


#: The fields :meth:`~UserExecutionContext.child` sets itself; it copies the others.
_CHILD_FIELDS = frozenset(
    ["request_id", "operation", "operation_depth", "parent_request_id", "created_at"]
)
_copy = _compile_copy("_copy", frozenset())
_child_copy = _compile_copy("_child_copy", _CHILD_FIELDS)


def _bare() -> UserExecutionContext:
    """An empty instance, for unpickling (its slots are then filled by ``__setstate__``)."""
    return _new(UserExecutionContext)


def _seal(new: Any) -> UserExecutionContext:
    """Turn a filled ``_Filler`` into the frozen context it stands for."""
    new.__class__ = UserExecutionContext
    if _track is not None:
        _track(new)
    return new  # type: ignore[no-any-return]


def evolve(ctx: UserExecutionContext, **changes: Any) -> UserExecutionContext:
    """A copy of ``ctx`` with ``changes`` applied WITHOUT validation (internal).

    For callers that have already validated (and, for mappings, frozen) every changed value;
    anything else must go through :meth:`UserExecutionContext.replace`.
    """
    for name in changes.keys() & _RAW_SLOTS.keys():
        # Read first: a copy carries what such a field is made of, whose first read would
        # put back the values the change replaces (the whole group is read at once).
        getattr(ctx, name)
    new = _copy(ctx)
    for name, value in changes.items():
        setattr(new, name, value)
    return _seal(new)


#: The validated fields of a caller (see :func:`caller_template`): what :func:`request_context`
#: copies. An unsealed ``_Filler``: never handed out as a context, never counted as a live one.
CallerTemplate = Any


def caller_template(ctx: UserExecutionContext) -> CallerTemplate:
    """The template that the contexts of ``ctx``'s caller's requests are copied from."""
    return _copy(ctx)


# request_context: the fields it sets (the request's own) are those of _REQUEST_FIELDS; every
# other one is copied from the caller. It ends as _seal does (see the module docstring).
_REQUEST_SOURCE = """
def request_context(
    caller,
    request_id,
    correlation_id,
    trace_id,
    websocket_client_id,
    outer=None,
    trace_flags=0,
    metadata=None,
):
    new = _new(_Filler)
{copies}
    if outer is None:
        try:
            new.thread_id = pop_id()
            new.run_id = pop_id()
        except IndexError:  # the pool is empty: generate_id_pair refills it
            new.thread_id, new.run_id = generate_id_pair()
    else:
        new.thread_id = outer.thread_id
        new.run_id = outer.run_id
    new.request_id = request_id
    new.correlation_id = correlation_id
    new.trace_id = trace_id
    new.trace_flags = trace_id if type(trace_id) is bytes else trace_flags  # raw: see _fill_trace
    new.websocket_client_id = websocket_client_id
    {metadata} = metadata  # what is read on first use (_fill_metadata), or None
    new.created_at = _time()
    new.__class__ = UserExecutionContext
    if _track is not None:
        _track(new)
    return new
"""
_REQUEST_SOURCE = _REQUEST_SOURCE.replace(
    "{metadata}", " = ".join(f"new.{name}" for name in REQUEST_METADATA_FIELDS)
)
# Every ``new.<field>`` assigned, alone or in a tuple (``new.thread_id, new.run_id = ...``).
_REQUEST_FIELDS = frozenset(re.findall(r"new\.(\w+)(?=(?:, new\.\w+)* =)", _REQUEST_SOURCE))


def _compile_request_context() -> Callable[..., UserExecutionContext]:
    """``request_context`` from :data:`_REQUEST_SOURCE`, with the copies of the caller's
    fields written out from the field declarations (one call per request, no loop)."""
    copies = [f"    new.{slot} = caller.{slot}" for slot in _SLOTS if slot not in _REQUEST_FIELDS]
    namespace = globals()  # _track is read at call time, as testing sets it
    exec(_REQUEST_SOURCE.format(copies="\n".join(copies)), namespace)  # noqa: S102
    built: Callable[..., UserExecutionContext] = namespace["request_context"]
    built.__doc__ = """The context of a new request by ``caller`` (the template of a validated
    context that holds the caller's identity, see ``ctxvars_mw.auth.admission``), with the
    request's checked ids and trace (``trace_flags`` being those of ``trace_id``; or, for
    ``trace_id``, the request's raw ``traceparent`` header, bytes, read on first use with
    ``trace_flags`` 0: see ``_fill_trace``), and its ``metadata``: what
    ``MetadataReader.capture`` took of the request, cleaned into the fields of
    :data:`REQUEST_METADATA_FIELDS` on first use (see ``_fill_metadata``), or None for
    none of them.

    New thread and run ids are drawn, unless the request is already handled by an ``outer``
    middleware whose context they are taken from."""
    return built


#: ``request_context(caller, request_id, correlation_id, trace_id, websocket_client_id,
#: outer=None, trace_flags=0, metadata=None)``: see :func:`_compile_request_context`.
request_context = _compile_request_context()


# -- field checks ------------------------------------------------------------------------


def _id(name: str, value: object, rules: IdRules) -> str:
    """``value``, a checked id (see :func:`_check_id`)."""
    _check_id(name, value, rules)
    return value  # type: ignore[return-value]


def _check_id(name: str, value: object, rules: IdRules) -> None:
    if type(value) is str and ids._validated.get(value) is rules:  # validated before
        return
    if isinstance(value, str) and is_valid_id(value, rules):
        return
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
    for v in items:
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
_CHECKED_NAMES_MAX = 1024


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
    try:
        return Tier.parse(value)  # type: ignore[arg-type]
    except ValueError:
        _bad("tier must be one of: " + ", ".join(t.value for t in Tier))


def _check_depth(value: object) -> int:
    if type(value) is int and 0 <= value <= MAX_OPERATION_DEPTH:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        _bad("operation_depth must be an int")
    if value < 0:
        _bad("operation_depth must be >= 0")
    raise MaxDepthExceededError(f"operation_depth may not exceed {MAX_OPERATION_DEPTH}")


def _check_created_at(value: object) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            _bad("created_at is not an ISO 8601 timestamp")
    if not isinstance(value, datetime) or value.tzinfo is None:
        _bad("created_at must be a timezone-aware datetime")
    return value if value.tzinfo is _UTC else value.astimezone(_UTC)


def _check_trace_flags(value: object, trace_id: str | None) -> int:
    if type(value) is not int or not 0 <= value <= 0xFF:
        _bad("trace_flags must be an int from 0 to 255")
    if trace_id is None:
        _bad("trace_flags needs a trace_id")
    return value


def _check_client_ip(value: object) -> str:
    ip = canonical_ip(value)
    if ip is None:
        _bad("client_ip must be an IP address")
    return ip


def _check_request_text(name: str, value: object, limit: int) -> str | None:
    if value is None or (
        type(value) is str and value and len(value) <= limit and value.isprintable()
    ):
        return value
    _bad(f"{name} must be a non-empty printable string of at most {limit} characters")


def _check_optional_text(name: str, value: object) -> str | None:
    if value is None or (type(value) is str and value.isprintable() and value.strip()):
        return value
    _bad(f"{name} must be a non-empty string")


def _plain(value: Any) -> Any:
    """A field's value as JSON data (for :meth:`UserExecutionContext.to_dict`)."""
    if isinstance(value, Tier):
        return value.value
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, FrozenMap):
        return thaw(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value
