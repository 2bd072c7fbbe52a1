"""UserExecutionContext and Tier (API.md §1)."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxvars_mw import (
    IdRules,
    InvalidContextError,
    MaxDepthExceededError,
    PermissionDeniedError,
    PermissionEscalationError,
    Tier,
    UserExecutionContext,
    set_id_rules,
    use_id_rules,
)
from ctxvars_mw.context import caller_template, request_context
from ctxvars_mw.frozen import FrozenMap
from ctxvars_mw.ids import get_id_rules
from ctxvars_mw.proxies import TrustedProxies
from ctxvars_mw.request_metadata import REQUEST_METADATA_FIELDS, MetadataReader

USER = "user_2hNqYf3kT9xWzL"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ID_FIELDS = ("user_id", "thread_id", "run_id", "request_id", "correlation_id")
OPTIONAL_ID_FIELDS = ("session_id", "websocket_client_id", "parent_request_id")
EXACT_PLACEHOLDERS = [
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
SHORT_PREFIXES = [
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
PREFIX_EXCEPTIONS = [
    "default_user",
    "default_admin",
    "default_system",
    "default_account",
    "default_service",
    "default_client",
    "default_guest",
]
RESERVED_KEYS = [
    "user_id",
    "thread_id",
    "run_id",
    "request_id",
    "created_at",
    "db_session",
    "websocket_client_id",
]
REALISTIC_IDS = (
    "auth0|5f7c8ec7c33c6c004bbafe82",
    "google-oauth2|1234567890",
    str(uuid.uuid4()),
    "user_2hNqYf3kT9xWzL",
)


def make(**kwargs: Any) -> UserExecutionContext:
    """A valid context for USER with ``kwargs`` applied."""
    return UserExecutionContext(**{"user_id": USER, **kwargs})


def full_context() -> UserExecutionContext:
    """A context with every field set to a non-default value."""
    return UserExecutionContext(
        user_id=USER,
        thread_id="thread_8f14e45fceea167a",
        run_id="run_c9f0f895fb98ab91",
        request_id="req_45c48cce2e2d7fbd",
        correlation_id="corr_d3d9446802a44259",
        session_id="sess_6512bd43d9caa6e0",
        tier=Tier.ENTERPRISE,
        roles={"admin", "user"},
        permissions={"agents:*", "threads:read"},
        features={"sso", "chat"},
        claims={"sub": USER, "iss": "https://issuer.example.com", "aud": ["api", "web"]},
        auth_method="jwt",
        agent_context={"model": "gpt", "tools": ["search", "code"], "limits": {"tokens": 4096}},
        audit_metadata={"ip": "203.0.113.7", "tags": {"b", "a"}},
        websocket_client_id="ws_c20ad4d76fe97759",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        trace_flags=0x03,
        operation="agent.plan",
        operation_depth=2,
        parent_request_id="req_c51ce410c124a10e",
        client_ip="2001:db8::7",
        user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/126.0",
        method="POST",
        path="/threads/42/messages",
        created_at=datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
    )


# -- fields and defaults -------------------------------------------------------------------


def test_defaults_of_every_optional_field() -> None:
    """A context built from a user id alone has the documented defaults."""
    ctx = make()
    assert ctx.user_id == USER
    assert ctx.session_id is None
    assert ctx.tier is Tier.FREE
    assert ctx.roles == ctx.permissions == ctx.features == frozenset()
    assert isinstance(ctx.roles, frozenset)
    assert dict(ctx.claims) == dict(ctx.agent_context) == dict(ctx.audit_metadata) == {}
    assert ctx.auth_method is None
    assert ctx.is_authenticated is True
    assert ctx.websocket_client_id is None
    assert ctx.trace_id is None
    assert ctx.trace_flags == 0
    assert ctx.operation is None
    assert ctx.operation_depth == 0
    assert ctx.parent_request_id is None
    assert ctx.client_ip is ctx.user_agent is ctx.method is ctx.path is None
    assert ctx.db_session is None


def test_generated_ids_are_long_and_unique() -> None:
    """Generated thread, run and request ids are at least 20 characters and never repeat."""
    contexts = [make() for _ in range(500)]
    ids = [getattr(c, f) for c in contexts for f in ("thread_id", "run_id", "request_id")]
    assert all(isinstance(i, str) and len(i) >= 20 for i in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("given", ["thread_id", "run_id", "request_id"])
def test_ids_left_out_are_generated_when_others_are_given(given: str) -> None:
    """Giving one of thread, run and request id keeps it and generates the other two."""
    ctx = make(**{given: "given_45c48cce2e2d7fbd"})
    assert getattr(ctx, given) == "given_45c48cce2e2d7fbd"
    drawn = [getattr(ctx, f) for f in ("thread_id", "run_id", "request_id") if f != given]
    assert all(len(i) == 24 for i in drawn)
    assert len(set(drawn)) == 2
    assert ctx.correlation_id == ctx.request_id


def test_root_correlation_id_defaults_to_request_id() -> None:
    """A root context's correlation id is its own request id unless one is given."""
    ctx = make()
    assert ctx.correlation_id == ctx.request_id
    given_ctx = make(request_id="req_45c48cce2e2d7fbd")
    assert given_ctx.correlation_id == "req_45c48cce2e2d7fbd"
    assert make(correlation_id="corr_d3d9446802a44259").correlation_id == "corr_d3d9446802a44259"


def test_created_at_is_timezone_aware_utc_now() -> None:
    """created_at defaults to now, in UTC, timezone-aware."""
    before = datetime.now(UTC)
    ctx = make()
    after = datetime.now(UTC)
    assert ctx.created_at.tzinfo is not None
    assert ctx.created_at.utcoffset() == timedelta(0)
    assert before <= ctx.created_at <= after


def test_created_at_in_another_zone_is_converted_to_utc() -> None:
    """An aware created_at in another zone is stored as the same instant in UTC."""
    plus_two = timezone(timedelta(hours=2))
    ctx = make(created_at=datetime(2024, 1, 1, 14, 0, tzinfo=plus_two))
    assert ctx.created_at == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert ctx.created_at.utcoffset() == timedelta(0)


def test_naive_created_at_is_refused() -> None:
    """A naive created_at would be ambiguous, so it is refused."""
    with pytest.raises(InvalidContextError):
        make(created_at=datetime(2024, 1, 1, 12, 0))


def test_tier_given_as_string_is_parsed() -> None:
    """A tier value string is accepted in place of a Tier."""
    assert make(tier="business").tier is Tier.BUSINESS
    with pytest.raises(InvalidContextError):
        make(tier="gold")


# -- immutability --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["user_id", "tier", "db_session", "not_a_field", "__dict__"])
def test_assignment_raises_frozen_instance_error(name: str) -> None:
    """Assigning any attribute, field or not, raises FrozenInstanceError (an AttributeError)."""
    ctx = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(ctx, name, "x")
    with pytest.raises(AttributeError):
        setattr(ctx, name, "x")


def test_deleting_an_attribute_raises_frozen_instance_error() -> None:
    """Deleting a field is refused like assigning one."""
    ctx = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        del ctx.user_id  # type: ignore[misc]


def test_is_a_slotted_dataclass() -> None:
    """The context is a dataclass with slots: no per-instance __dict__."""
    ctx = make()
    assert dataclasses.is_dataclass(ctx)
    assert not hasattr(ctx, "__dict__")
    assert "user_id" in type(ctx).__slots__
    assert [f.name for f in dataclasses.fields(ctx)][:5] == list(ID_FIELDS)


def test_positional_construction_is_refused() -> None:
    """The context is built with keyword arguments only."""
    with pytest.raises(TypeError):
        UserExecutionContext(USER)  # type: ignore[misc]


def test_repr_leaves_out_the_db_session() -> None:
    """repr() shows the ids but not the database session."""
    ctx = make().with_db_session(object())
    text = repr(ctx)
    assert USER in text
    assert "db_session" not in text


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ID_FIELDS + OPTIONAL_ID_FIELDS)
@pytest.mark.parametrize("value", ["", "   ", " padded", "tab\there", "new\nline", 42, b"bytes"])
def test_malformed_ids_are_refused(field: str, value: object) -> None:
    """Empty, whitespace, non-printable and non-str ids raise InvalidContextError."""
    with pytest.raises(InvalidContextError):
        make(**{field: value})


def test_invalid_context_error_is_a_value_error() -> None:
    """Validation failures can be caught as ValueError."""
    with pytest.raises(ValueError):
        make(user_id="")


@pytest.mark.parametrize("field", ID_FIELDS + OPTIONAL_ID_FIELDS)
@pytest.mark.parametrize("value", EXACT_PLACEHOLDERS)
def test_exact_placeholders_are_refused_case_insensitively(field: str, value: str) -> None:
    """Every exact placeholder value is refused, in any case, in every id field."""
    for variant in {value, value.upper(), value.capitalize()}:
        with pytest.raises(InvalidContextError, match="placeholder"):
            make(**{field: variant})


@pytest.mark.parametrize("prefix", SHORT_PREFIXES)
def test_short_prefixed_ids_are_refused(prefix: str) -> None:
    """An id shorter than 20 characters with a placeholder prefix is refused."""
    short = (prefix + "abc123")[:19]
    with pytest.raises(InvalidContextError):
        make(user_id=short)
    with pytest.raises(InvalidContextError):
        make(user_id=short.upper())


@pytest.mark.parametrize("prefix", SHORT_PREFIXES)
def test_long_prefixed_ids_are_accepted(prefix: str) -> None:
    """The same prefix on an id of 20 characters or more is a real id."""
    long_id = prefix + "x" * (20 - len(prefix))
    assert len(long_id) == 20
    assert make(user_id=long_id).user_id == long_id


def test_test_prefix_is_forbidden_for_short_ids_by_default() -> None:
    """``test_`` ids under 20 characters are refused; at 20 they are accepted."""
    with pytest.raises(InvalidContextError):
        make(user_id="test_user_123")
    assert make(user_id="test_user_1234567890").user_id == "test_user_1234567890"


@pytest.mark.parametrize("value", PREFIX_EXCEPTIONS)
def test_default_prefix_exceptions_are_accepted(value: str) -> None:
    """The documented ``default_…`` ids are real ids despite the prefix."""
    assert make(user_id=value).user_id == value


@pytest.mark.parametrize("value", REALISTIC_IDS)
def test_realistic_ids_are_accepted(value: str) -> None:
    """Ids from real identity providers are accepted in every id field."""
    ctx = UserExecutionContext(
        user_id=value, thread_id=value, run_id=value, request_id=value, session_id=value
    )
    assert ctx.user_id == ctx.session_id == value


def test_overlong_id_is_refused() -> None:
    """An id longer than 256 characters is refused."""
    with pytest.raises(InvalidContextError, match="longer"):
        make(user_id="u" * 257)
    assert make(user_id="u" * 256).user_id == "u" * 256


@pytest.mark.parametrize("field", ["agent_context", "audit_metadata"])
@pytest.mark.parametrize("key", RESERVED_KEYS)
def test_reserved_metadata_keys_are_refused(field: str, key: str) -> None:
    """agent_context and audit_metadata may not carry a reserved key."""
    with pytest.raises(InvalidContextError, match="reserved"):
        make(**{field: {"fine": 1, key: "x"}})


def test_claims_may_carry_reserved_names() -> None:
    """Verified token claims are not metadata: a claim named like a field is kept."""
    ctx = make(claims={"user_id": "legacy-id", "request_id": 7})
    assert ctx.claims["user_id"] == "legacy-id"
    assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx


@pytest.mark.parametrize("field", ["claims", "agent_context", "audit_metadata"])
@pytest.mark.parametrize("value", [["a", "b"], "text", 3, ("k", "v")])
def test_non_mapping_metadata_is_refused(field: str, value: object) -> None:
    """Metadata must be a mapping."""
    with pytest.raises(InvalidContextError, match="mapping"):
        make(**{field: value})


@pytest.mark.parametrize("value", [{1: "int key"}, {"k": object()}, {"k": b"bytes"}])
def test_non_json_like_metadata_is_refused(value: dict[Any, Any]) -> None:
    """Metadata holds JSON-like values with string keys only."""
    with pytest.raises(InvalidContextError):
        make(agent_context=value)


@pytest.mark.parametrize("field", ["roles", "permissions", "features"])
@pytest.mark.parametrize(
    "value",
    ["admin", 5, ["ok", ""], ["ok", 3], [["nested"]], frozenset({"ok", ""}), frozenset({"ok", 3})],
)
def test_malformed_name_sets_are_refused(field: str, value: object) -> None:
    """Roles, permissions and features are collections of non-empty strings."""
    with pytest.raises(InvalidContextError):
        make(**{field: value})


def test_name_sets_accept_any_iterable_and_become_frozensets() -> None:
    """Lists, sets and generators of names become frozensets."""
    ctx = make(roles=["user", "user"], permissions=(p for p in ["a:b"]), features={"chat"})
    assert ctx.roles == frozenset({"user"})
    assert ctx.permissions == frozenset({"a:b"})
    assert isinstance(ctx.features, frozenset)


def test_none_name_sets_mean_empty() -> None:
    """roles/permissions/features given as None are empty sets."""
    ctx = make(roles=None, permissions=None, features=None)
    assert ctx.roles == ctx.permissions == ctx.features == frozenset()


@pytest.mark.parametrize("field", ["auth_method", "operation"])
@pytest.mark.parametrize("value", ["", "   ", "line\nbreak", 7])
def test_optional_text_fields_are_validated(field: str, value: object) -> None:
    """auth_method and operation, when given, are non-empty printable strings."""
    with pytest.raises(InvalidContextError):
        make(**{field: value})


@pytest.mark.parametrize("depth", [-1, -10])
def test_negative_depth_is_refused(depth: int) -> None:
    """operation_depth below zero is refused."""
    with pytest.raises(InvalidContextError):
        make(operation_depth=depth)


def test_depth_above_maximum_is_refused_with_max_depth_error() -> None:
    """operation_depth 10 is allowed; 11 raises MaxDepthExceededError."""
    assert make(operation_depth=10).operation_depth == 10
    with pytest.raises(MaxDepthExceededError):
        make(operation_depth=11)


@pytest.mark.parametrize("depth", [1.0, "1", True, 0.0, False])
def test_non_int_depth_is_refused(depth: object) -> None:
    """operation_depth must be a real int (not a bool, float or str)."""
    with pytest.raises(InvalidContextError):
        make(operation_depth=depth)


@pytest.mark.parametrize(
    "trace_id",
    [
        "0" * 32,
        "4BF92F3577B34DA6A3CE929D0E0E4736",
        "abc",
        "g" * 32,
        "4bf92f35" * 4 + "0",
        "4bf92f35 77b34da6a3ce929d0e0e47 ",  # hex with whitespace, as bytes.fromhex takes it
        "4bf92f3577b34da6a3ce929d0e0e473\n",
        "\u0664" * 32,  # Arabic-Indic digit four: a digit, not a hex digit
        "0x" + "4bf92f3577b34da6a3ce929d0e0e47",
    ],
)
def test_malformed_trace_id_is_refused(trace_id: str) -> None:
    """trace_id must be 32 lowercase hex characters, not all zero."""
    with pytest.raises(InvalidContextError):
        make(trace_id=trace_id)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trace_id": TRACE_ID, "trace_flags": 256},
        {"trace_id": TRACE_ID, "trace_flags": -1},
        {"trace_id": TRACE_ID, "trace_flags": "01"},
        {"trace_id": TRACE_ID, "trace_flags": True},
        {"trace_flags": 0x01},  # flags without the trace they belong to
    ],
)
def test_malformed_trace_flags_are_refused(kwargs: dict[str, Any]) -> None:
    """trace_flags is one byte, and only ever next to a trace id."""
    with pytest.raises(InvalidContextError):
        make(**kwargs)


def test_trace_flags_survive_children_serialization_and_pickling() -> None:
    """The flags travel wherever the trace id does: children, dicts, JSON, pickles."""
    ctx = make(trace_id=TRACE_ID, trace_flags=0x03).child("tool.search")
    assert ctx.trace_flags == 0x03
    assert ctx.to_dict()["trace_flags"] == 0x03
    assert UserExecutionContext.from_json(ctx.to_json()).trace_flags == 0x03
    assert pickle.loads(pickle.dumps(ctx)).trace_flags == 0x03
    assert ctx.audit_trail()["trace_flags"] == 0x03
    old = {k: v for k, v in ctx.to_dict().items() if k != "trace_flags"}
    assert UserExecutionContext.from_dict(old).trace_flags == 0  # data written before the field


def test_non_bool_is_authenticated_is_refused() -> None:
    """is_authenticated must be a bool."""
    with pytest.raises(InvalidContextError):
        make(is_authenticated=1)


def test_error_messages_never_echo_the_rejected_value() -> None:
    """A refused id does not appear in the error message."""
    secret = "eyJhbGciOi\r\nInjected"
    with pytest.raises(InvalidContextError) as info:
        make(user_id=secret)
    assert "eyJhbGciOi" not in str(info.value)


# -- id rules ------------------------------------------------------------------------------


def test_id_rules_default_is_current_by_default() -> None:
    """Without configuration the default rules are in force."""
    assert get_id_rules() == IdRules.default()


def test_use_id_rules_allowing_accepts_a_placeholder_in_the_block_only() -> None:
    """use_id_rules(rules.allowing(...)) accepts those ids in the block and restores after."""
    with use_id_rules(IdRules.default().allowing("demo", "test_")):
        assert make(user_id="DEMO").user_id == "DEMO"
        assert make(user_id="test_1").user_id == "test_1"
        with pytest.raises(InvalidContextError):
            make(user_id="sample")
    with pytest.raises(InvalidContextError):
        make(user_id="demo")
    with pytest.raises(InvalidContextError):
        make(user_id="test_1")


def test_use_id_rules_forbidding_refuses_more_ids() -> None:
    """Forbidding an exact value or a prefix refuses those ids in the block."""
    rules = IdRules.default().forbidding("acme_", "guest", "default_guest")
    with use_id_rules(rules):
        for value in ("acme_42", "GUEST", "default_guest"):
            with pytest.raises(InvalidContextError):
                make(user_id=value)
        assert make(user_id="acme_1234567890abcdef").user_id == "acme_1234567890abcdef"
    assert make(user_id="guest").user_id == "guest"


async def test_use_id_rules_is_task_local() -> None:
    """Rules set in one task are not seen by a task started elsewhere."""
    import asyncio

    entered = asyncio.Event()
    release = asyncio.Event()

    async def with_rules() -> str:
        with use_id_rules(IdRules.default().allowing("mock")):
            entered.set()
            await release.wait()
            return make(user_id="mock").user_id

    async def without_rules() -> bool:
        await entered.wait()
        try:
            make(user_id="mock")
        except InvalidContextError:
            return True
        finally:
            release.set()
        return False

    assert await asyncio.gather(with_rules(), without_rules()) == ["mock", True]


def test_use_id_rules_restores_after_an_error() -> None:
    """The previous rules come back even when the block raises."""
    with pytest.raises(RuntimeError), use_id_rules(IdRules.default().allowing("fake")):
        raise RuntimeError("boom")
    assert get_id_rules() == IdRules.default()


@pytest.mark.parametrize("field", ["user_id", "thread_id", "session_id", "parent_request_id"])
def test_an_id_accepted_before_is_checked_again_under_new_rules(field: str) -> None:
    """An id that passed (and was remembered) is refused once the rules forbid it."""
    assert getattr(make(**{field: "acme_42"}), field) == "acme_42"
    stricter = IdRules.default().forbidding("acme_")
    with use_id_rules(stricter), pytest.raises(InvalidContextError):
        make(**{field: "acme_42"})
    previous = get_id_rules()
    set_id_rules(stricter)
    try:
        with pytest.raises(InvalidContextError):
            make(**{field: "acme_42"})
    finally:
        set_id_rules(previous)
    assert getattr(make(**{field: "acme_42"}), field) == "acme_42"


def test_set_id_rules_is_process_wide() -> None:
    """set_id_rules changes the rules everywhere until set back."""
    previous = get_id_rules()
    set_id_rules(IdRules.default().allowing("dummy"))
    try:
        assert make(user_id="dummy").user_id == "dummy"
    finally:
        set_id_rules(previous)
    with pytest.raises(InvalidContextError):
        make(user_id="dummy")


# -- deep copy and deep freeze -------------------------------------------------------------


def test_mutating_the_callers_dict_changes_nothing() -> None:
    """The context keeps a deep copy: later changes to the caller's data are not seen."""
    source: dict[str, Any] = {"tools": ["search"], "limits": {"tokens": 10}}
    ctx = make(agent_context=source, audit_metadata=source, claims=source)
    source["tools"].append("shell")
    source["limits"]["tokens"] = 999
    source["new"] = True
    for mapping in (ctx.agent_context, ctx.audit_metadata, ctx.claims):
        assert list(mapping["tools"]) == ["search"]
        assert mapping["limits"]["tokens"] == 10
        assert "new" not in mapping


def test_context_mappings_cannot_be_mutated() -> None:
    """The context's mappings and their nested values refuse every mutation."""
    ctx = make(agent_context={"tools": ["a"], "nested": {"k": "v"}})
    with pytest.raises(TypeError):
        ctx.agent_context["x"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        del ctx.agent_context["tools"]  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        ctx.agent_context["nested"]["k"] = "w"
    with pytest.raises(AttributeError):
        ctx.agent_context["tools"].append("b")
    with pytest.raises(AttributeError):
        ctx.agent_context.update({"x": 1})  # type: ignore[attr-defined]


def _mutable_objects(value: Any, found: list[Any]) -> list[Any]:
    """Every list, dict, set or bytearray reachable from ``value`` (a FrozenMap is a dict
    whose mutators raise: not mutable)."""
    if isinstance(value, (list, dict, set, bytearray)) and not isinstance(value, FrozenMap):
        found.append(value)
    if isinstance(value, (dict,)):
        for item in value.values():
            _mutable_objects(item, found)
    elif isinstance(value, (tuple, list, frozenset, set)):
        for item in value:
            _mutable_objects(item, found)
    elif hasattr(value, "items") and not isinstance(value, str):
        for item in value.values():
            _mutable_objects(item, found)
    return found


def test_two_contexts_share_no_mutable_object() -> None:
    """No list, dict or set is reachable from a context's public values."""
    source = {"a": [1, {"b": [2]}], "s": {1, 2}}
    first = make(agent_context=source)
    second = make(agent_context=source)
    child = first.child("op", agent_context={"extra": [3]})
    for ctx in (first, second, child):
        for f in dataclasses.fields(ctx):
            assert _mutable_objects(getattr(ctx, f.name), []) == []


def test_sets_in_metadata_become_sorted_sequences() -> None:
    """A set in metadata is frozen as a sorted sequence (so it serializes as a list)."""
    ctx = make(audit_metadata={"tags": {"b", "c", "a"}})
    assert list(ctx.audit_metadata["tags"]) == ["a", "b", "c"]


# -- hashing and equality ------------------------------------------------------------------


def test_contexts_pickle_and_copy() -> None:
    """pickle, copy and deepcopy give back an equal, still frozen context."""
    ctx = full_context().with_db_session("session-handle")
    for clone in (pickle.loads(pickle.dumps(ctx)), copy.copy(ctx), copy.deepcopy(ctx)):
        assert type(clone) is UserExecutionContext
        assert clone == ctx
        assert clone.db_session == "session-handle"
        assert clone.created_at == ctx.created_at
        with pytest.raises(dataclasses.FrozenInstanceError):
            clone.user_id = "other"  # type: ignore[misc]


def test_equal_contexts_hash_alike_and_db_session_is_ignored() -> None:
    """Two contexts are equal, with equal hashes, iff every field but db_session is equal."""
    first = full_context()
    second = full_context()
    assert first == second
    assert hash(first) == hash(second)
    with_session = first.with_db_session(object())
    assert with_session == first
    assert hash(with_session) == hash(first)
    assert len({first, second, with_session}) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"tier": Tier.INTERNAL},
        {"roles": {"user"}},
        {"agent_context": {"model": "other"}},
        {"operation_depth": 3},
        {"is_authenticated": False},
        {"trace_id": None, "trace_flags": 0},
        {"trace_flags": 0x01},
        {"client_ip": "203.0.113.7"},
        {"path": "/other"},
    ],
)
def test_contexts_differing_in_one_field_are_unequal(change: dict[str, Any]) -> None:
    """Changing any compared field makes the contexts unequal."""
    ctx = full_context()
    assert ctx.replace(**change) != ctx


# -- anonymous -----------------------------------------------------------------------------


def test_anonymous_invariants() -> None:
    """anonymous() is unauthenticated, FREE, with no roles, permissions or features."""
    ctx = UserExecutionContext.anonymous()
    assert ctx.user_id == "anonymous"
    assert ctx.is_authenticated is False
    assert ctx.tier is Tier.FREE
    assert ctx.roles == ctx.permissions == ctx.features == frozenset()


def test_anonymous_round_trips() -> None:
    """An anonymous context survives to_dict/from_dict and to_json/from_json."""
    ctx = UserExecutionContext.anonymous(trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx
    assert UserExecutionContext.from_json(ctx.to_json()) == ctx
    child = ctx.child("public.search")
    assert UserExecutionContext.from_json(child.to_json()) == child


def test_anonymous_with_free_tier_features_round_trips() -> None:
    """The middleware's anonymous context carries free-tier features and round-trips."""
    ctx = UserExecutionContext.anonymous(features={"chat", "basic_agents", "history_7d"})
    assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx
    assert ctx.replace(operation="x").features == ctx.features


@pytest.mark.parametrize(
    "kwargs",
    [{"tier": Tier.BUSINESS}, {"roles": {"admin"}}, {"permissions": {"threads:read"}}],
)
def test_anonymous_cannot_hold_privileges(kwargs: dict[str, Any]) -> None:
    """An anonymous context with a tier above FREE, roles or permissions is refused."""
    with pytest.raises(InvalidContextError):
        UserExecutionContext.anonymous(**kwargs)


@pytest.mark.parametrize("kwargs", [{"user_id": USER}, {"is_authenticated": True}])
def test_anonymous_sets_its_own_identity(kwargs: dict[str, Any]) -> None:
    """anonymous() refuses a user_id or is_authenticated argument."""
    with pytest.raises(InvalidContextError):
        UserExecutionContext.anonymous(**kwargs)


@pytest.mark.parametrize("value", ["anonymous", "Anonymous", "ANONYMOUS"])
def test_anonymous_user_id_is_refused_for_authenticated_contexts(value: str) -> None:
    """ "anonymous" is only allowed with is_authenticated=False."""
    with pytest.raises(InvalidContextError):
        UserExecutionContext(user_id=value)


# -- child ---------------------------------------------------------------------------------


def test_child_inherits_every_documented_field() -> None:
    """A child keeps user, thread, run, session, correlation, tier, roles, features, ws id."""
    parent = full_context()
    child = parent.child("tool.search")
    for name in (
        "user_id",
        "thread_id",
        "run_id",
        "session_id",
        "correlation_id",
        "tier",
        "roles",
        "permissions",
        "features",
        "websocket_client_id",
        "claims",
        "auth_method",
        "is_authenticated",
        "trace_id",
        "trace_flags",
        "agent_context",
        "audit_metadata",
        "client_ip",
        "user_agent",
        "method",
        "path",
    ):
        assert getattr(child, name) == getattr(parent, name), name


def _every_way_in() -> dict[str, UserExecutionContext]:
    parent = full_context()
    return {
        "constructor": parent,
        "anonymous": UserExecutionContext.anonymous(),
        "child": parent.child("op"),
        "child with extras": parent.child(
            "op", agent_context={"k": 1}, audit_metadata={"a": 2}, permissions={"agents:run"}
        ),
        "replace": parent.replace(operation="other"),
        "with_db_session": parent.with_db_session(object()),
        "request_context": request_context(
            caller_template(parent),
            "req_aaaaaaaaaaaaaaaaaaaa",
            "corr_bbbbbbbbbbbbbbbbbbbb",
            None,
            None,
        ),
    }


@pytest.mark.parametrize("way", list(_every_way_in()))
def test_every_way_in_makes_a_frozen_context_with_every_field_set(way: str) -> None:
    """The constructor, child(), replace(), the with_ copies and request_context() all give
    a UserExecutionContext itself (not a subclass), frozen, with every field readable."""
    ctx = _every_way_in()[way]
    assert type(ctx) is UserExecutionContext
    for f in dataclasses.fields(UserExecutionContext):
        getattr(ctx, f.name)  # an unset slot would raise AttributeError
    assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.operation = "changed"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del ctx.user_id  # type: ignore[misc]


def test_child_gets_new_request_id_and_points_at_parent() -> None:
    """A child has its own request id, the parent's as parent_request_id, depth + 1."""
    parent = full_context()
    child = parent.child("tool.search")
    assert child.request_id != parent.request_id
    assert len(child.request_id) >= 20
    assert child.parent_request_id == parent.request_id
    assert child.operation == "tool.search"
    assert child.operation_depth == parent.operation_depth + 1
    assert child.created_at >= parent.created_at


def test_child_inherits_correlation_id() -> None:
    """Every descendant carries the root's correlation id."""
    root = make()
    grandchild = root.child("a").child("b")
    assert grandchild.correlation_id == root.correlation_id == root.request_id


def test_child_merges_metadata_without_touching_the_parent() -> None:
    """Extras are laid over the parent's metadata; the parent is unchanged."""
    parent = make(agent_context={"model": "a", "keep": 1}, audit_metadata={"ip": "x"})
    child = parent.child("op", agent_context={"model": "b"}, audit_metadata={"step": 2})
    assert dict(child.agent_context) == {"model": "b", "keep": 1}
    assert dict(child.audit_metadata) == {"ip": "x", "step": 2}
    assert dict(parent.agent_context) == {"model": "a", "keep": 1}
    assert dict(parent.audit_metadata) == {"ip": "x"}


def test_child_metadata_is_validated() -> None:
    """Reserved keys and non-mappings are refused in a child's extras too."""
    parent = make()
    with pytest.raises(InvalidContextError):
        parent.child("op", agent_context={"user_id": "other"})
    with pytest.raises(InvalidContextError):
        parent.child("op", audit_metadata=["not", "a", "mapping"])  # type: ignore[arg-type]


def test_child_may_narrow_permissions() -> None:
    """A child may hold a subset of its parent's permissions, wildcards included."""
    parent = make(permissions={"agents:*", "threads:read"})
    child = parent.child("op", permissions={"agents:execute"})
    assert child.permissions == frozenset({"agents:execute"})
    assert parent.child("op", permissions=[]).permissions == frozenset()


def test_child_cannot_escalate_permissions() -> None:
    """Asking a child for a permission the parent lacks raises PermissionEscalationError."""
    parent = make(permissions={"threads:read"})
    with pytest.raises(PermissionEscalationError) as info:
        parent.child("op", permissions={"threads:read", "billing:manage"})
    assert info.value.required == ("billing:manage",)
    assert isinstance(info.value, PermissionDeniedError)


@pytest.mark.parametrize("operation", ["", "   ", None, 5, "bad\noperation"])
def test_child_needs_an_operation(operation: object) -> None:
    """An empty or non-string operation raises InvalidContextError."""
    with pytest.raises(InvalidContextError):
        make().child(operation)  # type: ignore[arg-type]


def test_depth_ten_is_reachable_and_eleven_is_not() -> None:
    """Ten derivations succeed; the eleventh raises MaxDepthExceededError."""
    ctx = make()
    for level in range(1, 11):
        ctx = ctx.child(f"level{level}")
    assert ctx.operation_depth == 10
    with pytest.raises(MaxDepthExceededError):
        ctx.child("level11")
    with pytest.raises(InvalidContextError):
        ctx.child("level11")


def test_child_keeps_the_db_session() -> None:
    """A child runs in the same unit of work as its parent."""
    session = object()
    assert make().with_db_session(session).child("op").db_session is session


# -- replace and shorthands ----------------------------------------------------------------


def test_replace_returns_a_validated_copy() -> None:
    """replace() applies changes, validates them and leaves the original alone."""
    ctx = full_context()
    copy = ctx.replace(tier="early", operation="other")
    assert copy.tier is Tier.EARLY
    assert copy.operation == "other"
    assert ctx.tier is Tier.ENTERPRISE
    assert copy.request_id == ctx.request_id
    with pytest.raises(InvalidContextError):
        ctx.replace(user_id="placeholder")
    with pytest.raises(InvalidContextError):
        ctx.replace(no_such_field=1)


def test_dataclasses_replace_works_too() -> None:
    """dataclasses.replace() goes through the same validation."""
    ctx = make()
    assert dataclasses.replace(ctx, tier=Tier.EARLY).tier is Tier.EARLY
    with pytest.raises(InvalidContextError):
        dataclasses.replace(ctx, user_id="null")


def test_with_db_session_and_websocket_client() -> None:
    """The shorthands set db_session and websocket_client_id on a copy."""
    ctx = make()
    session = object()
    assert ctx.with_db_session(session).db_session is session
    assert ctx.db_session is None
    ws = ctx.with_websocket_client("ws_c20ad4d76fe97759")
    assert ws.websocket_client_id == "ws_c20ad4d76fe97759"
    assert ctx.websocket_client_id is None


@pytest.mark.parametrize("value", [None, ""])
def test_shorthands_refuse_none_and_empty(value: Any) -> None:
    """with_db_session(None) and with_websocket_client(None or "") raise InvalidContextError."""
    ctx = make()
    if value is None:
        with pytest.raises(InvalidContextError):
            ctx.with_db_session(value)
    with pytest.raises(InvalidContextError):
        ctx.with_websocket_client(value)


def test_with_websocket_client_validates_the_id() -> None:
    """A placeholder websocket client id is refused."""
    with pytest.raises(InvalidContextError):
        make().with_websocket_client("test")


# -- checks --------------------------------------------------------------------------------


def test_has_role_and_has_feature() -> None:
    """has_role and has_feature test membership."""
    ctx = make(roles={"user"}, features={"chat"})
    assert ctx.has_role("user")
    assert not ctx.has_role("admin")
    assert ctx.has_feature("chat")
    assert not ctx.has_feature("sso")


def test_has_permission_wildcards() -> None:
    """``resource:*`` grants every action on the resource; ``*`` grants everything."""
    ctx = make(permissions={"agents:*", "threads:read", "tools:code:*"})
    assert ctx.has_permission("agents:execute")
    assert ctx.has_permission("agents:manage")
    assert ctx.has_permission("threads:read")
    assert ctx.has_permission("tools:code:run")
    assert not ctx.has_permission("threads:write")
    assert not ctx.has_permission("agentsx:execute")
    assert not ctx.has_permission("agents")
    assert not make().has_permission("threads:read")
    star = make(permissions={"*"})
    assert star.has_permission("billing:manage")
    assert star.has_permission("anything")


def test_tier_at_least() -> None:
    """tier_at_least compares by tier order and accepts tier names."""
    ctx = make(tier=Tier.BUSINESS)
    assert ctx.tier_at_least(Tier.FREE)
    assert ctx.tier_at_least(Tier.BUSINESS)
    assert ctx.tier_at_least("early")
    assert not ctx.tier_at_least(Tier.ENTERPRISE)
    assert not ctx.tier_at_least("internal")


# -- serialization -------------------------------------------------------------------------


def test_to_dict_is_json_serializable_with_documented_shapes() -> None:
    """to_dict has plain JSON types: tier value, sorted lists, ISO time, plain dicts."""
    ctx = full_context().with_db_session(object())
    data = ctx.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["tier"] == "enterprise"
    assert data["roles"] == ["admin", "user"]
    assert data["permissions"] == ["agents:*", "threads:read"]
    assert data["features"] == ["chat", "sso"]
    assert data["created_at"] == "2024-05-01T12:30:00+00:00"
    assert type(data["agent_context"]) is dict
    assert type(data["agent_context"]["limits"]) is dict
    assert data["agent_context"]["tools"] == ["search", "code"]
    assert data["audit_metadata"]["tags"] == ["a", "b"]
    assert "db_session" not in data
    expected = {f.name for f in dataclasses.fields(ctx)} - {"db_session"}
    assert set(data) == expected


def test_round_trip_through_dict_and_json() -> None:
    """from_dict(to_dict()) and from_json(to_json()) give back an equal context."""
    for ctx in (full_context(), make(), full_context().child("x", agent_context={"d": [[1]]})):
        assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx
        assert UserExecutionContext.from_json(ctx.to_json()) == ctx
        assert UserExecutionContext.from_json(ctx.to_json().encode()) == ctx


def test_round_trip_of_a_child_chain_keeps_lineage() -> None:
    """Deserialized children keep their parent_request_id, operation and depth."""
    root = make()
    chain = [root]
    for name in ("plan", "tool", "fetch"):
        chain.append(chain[-1].child(name))
    restored = [UserExecutionContext.from_json(c.to_json()) for c in chain]
    assert restored == chain
    assert restored[-1].parent_request_id == chain[-2].request_id
    assert restored[-1].operation_depth == 3


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"user_id": USER, "unknown": 1},
        {"user_id": USER, "db_session": "x"},
        {"user_id": USER, "created_at": "yesterday"},
        {"user_id": USER, "tier": "platinum"},
    ],
)
def test_from_dict_refuses_bad_data(data: dict[str, Any]) -> None:
    """Missing user_id, unknown keys, db_session or bad values raise InvalidContextError."""
    with pytest.raises(InvalidContextError):
        UserExecutionContext.from_dict(data)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '"a string"', b"\xff\xfe"])
def test_from_json_refuses_non_objects(text: str | bytes) -> None:
    """Malformed JSON or a JSON value that is not an object raises InvalidContextError."""
    with pytest.raises(InvalidContextError):
        UserExecutionContext.from_json(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(
    metadata=st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda k: k not in RESERVED_KEYS),
        json_values,
        max_size=4,
    ),
    tier=st.sampled_from(list(Tier)),
    roles=st.frozensets(st.sampled_from(["admin", "user", "readonly"])),
)
def test_round_trip_holds_for_any_json_metadata(
    metadata: dict[str, Any], tier: Tier, roles: frozenset[str]
) -> None:
    """The round trip is lossless for any JSON-like metadata."""
    ctx = make(agent_context=metadata, audit_metadata=metadata, claims=metadata, tier=tier)
    ctx = ctx.replace(roles=roles)
    assert UserExecutionContext.from_json(ctx.to_json()) == ctx
    assert UserExecutionContext.from_dict(ctx.to_dict()).to_dict() == ctx.to_dict()


def test_audit_trail_has_the_documented_keys() -> None:
    """audit_trail() carries at least the documented keys with sensible values."""
    ctx = full_context().with_db_session(object())
    trail = ctx.audit_trail()
    required = [
        "user_id",
        "thread_id",
        "run_id",
        "request_id",
        "correlation_id",
        "parent_request_id",
        "operation",
        "operation_depth",
        "tier",
        "auth_method",
        "session_id",
        "has_db_session",
        "has_websocket",
        "created_at",
        "context_age_seconds",
    ]
    assert set(required) <= set(trail)
    assert trail["tier"] == "enterprise"
    assert trail["has_db_session"] is True
    assert trail["has_websocket"] is True
    assert trail["context_age_seconds"] > 0
    assert json.loads(json.dumps(trail)) == trail
    assert make().audit_trail()["has_db_session"] is False


def test_name_lists_seen_before_are_still_checked_and_give_equal_sets() -> None:
    """Names given as a list or tuple are remembered by content: a repeat gets the set
    checked before; a list with a bad member is still refused, and so is a single string."""
    first = UserExecutionContext(user_id="user_2hNqYf3kT9xWzL", roles=["editor", "viewer"])
    again = UserExecutionContext(user_id="user_2hNqYf3kT9xWzL", roles=("viewer", "editor"))
    assert first.roles == again.roles == frozenset({"editor", "viewer"})
    assert type(again.roles) is frozenset
    for bad in (["editor", ""], ["editor", 3], "editor", [["editor"]]):
        with pytest.raises(InvalidContextError):
            UserExecutionContext(user_id="user_2hNqYf3kT9xWzL", roles=bad)


# -- request metadata ----------------------------------------------------------------------


def test_request_metadata_is_kept_through_children_serialization_and_pickling() -> None:
    """client_ip, user_agent, method and path survive child(), to_dict/from_dict, JSON,
    pickling, and show in audit_trail()."""
    ctx = full_context().child("tool.search")
    expected = {
        "client_ip": "2001:db8::7",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/126.0",
        "method": "POST",
        "path": "/threads/42/messages",
    }
    for copy_ in (
        ctx,
        UserExecutionContext.from_json(ctx.to_json()),
        pickle.loads(pickle.dumps(ctx)),
    ):
        assert {name: getattr(copy_, name) for name in expected} == expected
    trail = ctx.audit_trail()
    assert {name: trail[name] for name in expected} == expected
    old = {k: v for k, v in ctx.to_dict().items() if k not in expected}
    assert UserExecutionContext.from_dict(old).client_ip is None  # data written before the fields


def test_client_ip_is_stored_canonical() -> None:
    """Any spelling of an address is kept in its canonical form."""
    assert make(client_ip="2001:DB8:0::1").client_ip == "2001:db8::1"
    assert make(client_ip="::ffff:192.0.2.1").client_ip == "192.0.2.1"
    assert make(client_ip="[2001:db8::1]:443").client_ip == "2001:db8::1"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"client_ip": "unknown"},
        {"client_ip": ""},
        {"client_ip": "203.0.113.7\n"},
        {"client_ip": 3405803783},
        {"user_agent": ""},
        {"user_agent": "a\nb"},
        {"user_agent": "x" * 257},
        {"user_agent": b"curl/8"},
        {"method": "GET\r\n"},
        {"method": "X" * 33},
        {"path": "/a\x1b[2J"},
        {"path": "/" + "p" * 2048},
        {"path": ""},
    ],
)
def test_malformed_request_metadata_is_refused(kwargs: dict[str, Any]) -> None:
    """The keyword constructor (and so from_dict and the envelope) accepts only what the
    middleware records: an IP address, bounded printable texts."""
    with pytest.raises(InvalidContextError):
        make(**kwargs)


def test_anonymous_contexts_may_describe_their_request() -> None:
    """anonymous() records no request by default and takes the metadata fields."""
    assert UserExecutionContext.anonymous().client_ip is None
    anon = UserExecutionContext.anonymous(client_ip="192.0.2.1", method="GET", path="/")
    assert (anon.client_ip, anon.method, anon.path) == ("192.0.2.1", "GET", "/")
    assert UserExecutionContext.from_dict(anon.to_dict()) == anon


def test_a_requests_context_takes_its_metadata_from_the_request_not_the_caller() -> None:
    """request_context() sets the request's own fields, the metadata among them, and copies
    every other field from the caller's template (a caller that held metadata leaks none)."""
    caller = caller_template(full_context())
    ctx = _measured()
    assert (ctx.client_ip, ctx.user_agent, ctx.method, ctx.path) == _CLEANED
    assert ctx.user_id == USER
    assert ctx.roles == full_context().roles
    bare = request_context(
        caller, "req_aaaaaaaaaaaaaaaaaaaa", "corr_bbbbbbbbbbbbbbbbbbbb", None, None
    )
    assert bare.client_ip is bare.user_agent is bare.method is bare.path is None
    assert UserExecutionContext.from_dict(ctx.to_dict()) == ctx


def test_created_at_reads_as_the_same_utc_datetime_every_time() -> None:
    """A derived context's creation time is one aware UTC datetime, however often it is read,
    and agrees with the clock ``datetime.now`` reads."""
    parent = make()
    before = datetime.now(UTC)
    child = parent.child("op")
    after = datetime.now(UTC)
    first = child.created_at
    assert type(first) is datetime
    assert first.utcoffset() == timedelta(0)
    assert before <= first <= after
    assert child.created_at is first
    assert parent.created_at <= first


def test_created_at_survives_copies_pickling_and_equality_unread() -> None:
    """Copies made before the creation time was ever read carry the same instant; equal
    contexts hash alike whether or not their creation time was read."""
    ctx = make().child("op")
    copied = ctx.with_db_session(object())
    restored = pickle.loads(pickle.dumps(ctx))
    assert copied.created_at == ctx.created_at == restored.created_at
    unread = pickle.loads(pickle.dumps(make().child("op")))
    again = pickle.loads(pickle.dumps(unread))
    assert hash(unread) == hash(again)
    assert unread == again
    assert ctx.to_dict()["created_at"] == ctx.created_at.isoformat()


_TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
_TRACE = "0af7651916cd43dd8448eb211c80319c"


def _traced(traceparent: bytes) -> UserExecutionContext:
    """A request's context holding its raw traceparent header, as the middleware builds it."""
    caller = caller_template(make())
    return request_context(
        caller, "req_aaaaaaaaaaaaaaaaaaaa", "corr_bbbbbbbbbbbbbbbbbbbb", traceparent, None
    )


@pytest.mark.parametrize("read", ["trace_id", "trace_flags"])
def test_a_raw_traceparent_reads_as_its_trace_id_and_flags_whichever_is_read_first(
    read: str,
) -> None:
    """Reading either trace field of a request's context parses its traceparent once: both
    fields then hold the parsed values, and the raw header is never what a reader sees."""
    ctx = _traced(_TRACEPARENT)
    getattr(ctx, read)
    assert (ctx.trace_id, ctx.trace_flags) == (_TRACE, 1)
    assert type(ctx.trace_id) is str


@pytest.mark.parametrize(
    "raw",
    [
        b"00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # uppercase
        b"\x00repeated",  # what a repeated header reads as
        b"garbage\r\ninjected: 1",
        b"",
    ],
)
def test_an_invalid_raw_traceparent_reads_as_no_trace(raw: bytes) -> None:
    """A traceparent that is not valid gives no trace: None and flags 0, never its bytes."""
    ctx = _traced(raw)
    assert (ctx.trace_flags, ctx.trace_id) == (0, None)


def _parsed_twin(ctx: UserExecutionContext) -> UserExecutionContext:
    """A context equal to ``ctx`` built with its trace parsed, from ``ctx``'s other fields
    (reading those leaves ``ctx``'s traceparent unread)."""
    fields = {
        f.name: getattr(ctx, f.name)
        for f in dataclasses.fields(ctx)
        if f.name not in ("trace_id", "trace_flags")
    }
    return UserExecutionContext(**fields, trace_id=_TRACE, trace_flags=1)


def test_a_context_with_a_raw_traceparent_equals_one_built_with_its_trace() -> None:
    """Equality, hashing, repr, to_dict, pickling, copies, replace and child of a context whose
    trace was never read all see the parsed trace."""
    ctx = _traced(_TRACEPARENT)
    assert ctx == _parsed_twin(ctx)
    ctx = _traced(_TRACEPARENT)
    twin = _parsed_twin(ctx)
    assert hash(ctx) == hash(twin)
    ctx = _traced(_TRACEPARENT)
    twin = _parsed_twin(ctx)
    assert repr(ctx) == repr(twin)
    assert f"trace_id='{_TRACE}', trace_flags=1" in repr(twin)
    ctx = _traced(_TRACEPARENT)
    twin = _parsed_twin(ctx)
    assert ctx.to_dict() == twin.to_dict()
    ctx = _traced(_TRACEPARENT)
    twin = _parsed_twin(ctx)
    assert pickle.loads(pickle.dumps(ctx)) == twin
    ctx = _traced(_TRACEPARENT)
    twin = _parsed_twin(ctx)
    assert copy.copy(ctx) == twin
    assert _traced(_TRACEPARENT).child("op").trace_flags == 1
    assert _traced(_TRACEPARENT).replace(path="/x").trace_id == _TRACE


def test_trace_fields_stay_frozen() -> None:
    """The trace fields of a request's context cannot be assigned, parsed or not."""
    ctx = _traced(_TRACEPARENT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.trace_id = _TRACE  # type: ignore[misc]
    ctx.trace_flags  # noqa: B018 - parse
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.trace_flags = 3  # type: ignore[misc]
    assert ctx.trace_flags == 1


def test_a_reader_while_a_parse_is_stored_sees_the_trace_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread that reads the trace while the first read is storing what it parsed
    (here: when the flags are stored, after the id) sees the parsed id with its flags, never
    flags not yet parsed."""
    import ctxvars_mw.context as context_module

    flags_slot = context_module._TRACE_FLAGS_SLOT
    seen: list[tuple[int, str | None]] = []

    class ReadInBetween:
        def __set__(self, ctx: UserExecutionContext, value: int) -> None:
            if not seen:  # the other thread runs here, once
                seen.append((-1, None))
                seen[0] = (ctx.trace_flags, ctx.trace_id)
            flags_slot.__set__(ctx, value)

    monkeypatch.setattr(context_module, "_TRACE_FLAGS_SLOT", ReadInBetween())
    ctx = _traced(_TRACEPARENT)
    assert ctx.trace_id == _TRACE
    assert seen == [(1, _TRACE)]
    assert ctx.trace_flags == 1


# -- request metadata, cleaned on first read ---------------------------------------------

_READER = MetadataReader(REQUEST_METADATA_FIELDS, TrustedProxies(()))
_REQUEST = {"type": "http", "method": "GET", "path": "/x\x1b[2J", "client": ("2001:DB8::1", 4711)}
_RAW_AGENT = b"curl/8\r\nX-Injected: 1"
#: What _measured's request records, cleaned (canonical address, control characters replaced).
_CLEANED = ("2001:db8::1", "curl/8\ufffd\ufffdX-Injected: 1", "GET", "/x\ufffd[2J")


def _measured() -> UserExecutionContext:
    """A request's context holding what its middleware took of the request, as it builds it."""
    return request_context(
        caller_template(full_context()),
        "req_aaaaaaaaaaaaaaaaaaaa",
        "corr_bbbbbbbbbbbbbbbbbbbb",
        None,
        None,
        metadata=_READER.capture(_REQUEST, {b"user-agent": _RAW_AGENT}),
    )


def _cleaned_twin(ctx: UserExecutionContext) -> UserExecutionContext:
    """A context equal to ``ctx`` built with its metadata cleaned, from ``ctx``'s other fields
    (reading those leaves ``ctx``'s metadata unread)."""
    fields = {
        f.name: getattr(ctx, f.name)
        for f in dataclasses.fields(ctx)
        if f.name not in REQUEST_METADATA_FIELDS
    }
    return UserExecutionContext(
        **fields, **dict(zip(REQUEST_METADATA_FIELDS, _CLEANED, strict=True))
    )


@pytest.mark.parametrize("read", REQUEST_METADATA_FIELDS)
def test_request_metadata_reads_cleaned_whichever_field_is_read_first(read: str) -> None:
    """Reading any metadata field of a request's context cleans all four once; what the
    middleware took of the request is never what a reader sees."""
    ctx = _measured()
    first = getattr(ctx, read)
    assert first == _CLEANED[REQUEST_METADATA_FIELDS.index(read)]
    assert (ctx.client_ip, ctx.user_agent, ctx.method, ctx.path) == _CLEANED
    assert getattr(ctx, read) is first


def test_a_context_with_unread_metadata_equals_one_built_with_it_cleaned() -> None:
    """Equality, hashing, repr, to_dict, pickling, copies, replace and child of a context whose
    metadata was never read all see it cleaned."""

    def unread_and_twin() -> tuple[UserExecutionContext, UserExecutionContext]:
        ctx = _measured()
        return ctx, _cleaned_twin(ctx)

    ctx, twin = unread_and_twin()
    assert ctx == twin
    ctx, twin = unread_and_twin()
    assert hash(ctx) == hash(twin)
    ctx, twin = unread_and_twin()
    assert repr(ctx) == repr(twin)
    assert "client_ip='2001:db8::1'" in repr(twin)
    ctx, twin = unread_and_twin()
    assert ctx.to_dict() == twin.to_dict()
    ctx, twin = unread_and_twin()
    assert pickle.loads(pickle.dumps(ctx)) == twin
    ctx, twin = unread_and_twin()
    assert copy.copy(ctx) == twin
    assert _measured().replace(trace_id=_TRACE).path == _CLEANED[3]
    child = _measured().child("op")
    assert (child.client_ip, child.user_agent, child.method, child.path) == _CLEANED


def test_a_child_of_unread_metadata_leaves_it_unread_in_both() -> None:
    """A child copies what its parent's metadata is made of rather than cleaning it: each
    cleans it on its own first read, to the same values."""
    import ctxvars_mw.context as context_module

    parent = _measured()
    child = parent.child("op")
    raw = context_module._CLIENT_IP_SLOT.__get__
    assert type(raw(parent)) is tuple
    assert type(raw(child)) is tuple
    assert child.user_agent == parent.user_agent == _CLEANED[1]
    assert raw(child) == raw(parent) == _CLEANED[0]


@pytest.mark.parametrize(
    "change",
    [{"user_agent": "curl/9"}, {"client_ip": None}, {"trace_flags": 3}, {"path": "/y"}],
)
def test_evolving_a_field_read_on_first_use_keeps_the_change(change: dict[str, Any]) -> None:
    """An unchecked copy that changes one field of an unread group (metadata, trace) keeps the
    change when the group is then read, and the group's other fields as they were."""
    from ctxvars_mw.context import evolve

    ctx = request_context(
        caller_template(full_context()), "req_aaaaaaaaaaaaaaaaaaaa", "corr_bbbbbbbbbbbbbbbbbbbb",
        _TRACEPARENT, None, metadata=_READER.capture(_REQUEST, {b"user-agent": _RAW_AGENT}),
    )  # fmt: skip
    changed = evolve(ctx, **change)
    ((name, value),) = change.items()
    assert getattr(changed, name) == value
    unchanged = dict(zip(REQUEST_METADATA_FIELDS, _CLEANED, strict=True))
    unchanged |= {"trace_id": _TRACE, "trace_flags": 1}
    for other, expected in unchanged.items():
        if other != name:
            assert getattr(changed, other) == expected, other


def test_request_metadata_stays_frozen() -> None:
    """The metadata fields of a request's context cannot be assigned, read or not."""
    ctx = _measured()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.client_ip = "192.0.2.9"  # type: ignore[misc]
    assert ctx.client_ip == _CLEANED[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.path = "/elsewhere"  # type: ignore[misc]
    assert ctx.path == _CLEANED[3]


def test_a_reader_while_the_metadata_is_stored_sees_it_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread that reads the metadata while the first read is storing it (here: when
    the path, the last of the four, is stored) sees all four cleaned, never a field not yet
    stored."""
    import ctxvars_mw.context as context_module

    path_slot = context_module._PATH_SLOT
    seen: list[tuple[str | None, ...]] = []

    class ReadInBetween:
        def __set__(self, ctx: UserExecutionContext, value: str | None) -> None:
            if not seen:  # the other thread runs here, once
                seen.append(())
                seen[0] = (ctx.client_ip, ctx.user_agent, ctx.method, ctx.path)
            path_slot.__set__(ctx, value)

    monkeypatch.setattr(context_module, "_PATH_SLOT", ReadInBetween())
    ctx = _measured()
    assert ctx.user_agent == _CLEANED[1]
    assert seen == [_CLEANED]
    assert (ctx.client_ip, ctx.user_agent, ctx.method, ctx.path) == _CLEANED


def test_a_request_that_records_no_metadata_reads_none() -> None:
    """Without a reader (``request_metadata=()``) every metadata field is None."""
    ctx = request_context(
        caller_template(full_context()), "req_aaaaaaaaaaaaaaaaaaaa", "corr_bbbbbbbbbbbbbbbbbbbb",
        None, None,
    )  # fmt: skip
    assert (ctx.client_ip, ctx.user_agent, ctx.method, ctx.path) == (None,) * 4
