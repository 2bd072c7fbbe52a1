"""authorize(): resource ownership — owner, shared-with users, resources:read_any, everyone else."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from ctxvars_mw import (
    AuthenticationRequiredError,
    ConfigurationError,
    PermissionDeniedError,
    Policy,
    Tier,
    UserExecutionContext,
    authorize,
    child_context,
    use_context,
)

OWNER = "auth0|5f7c8ec7c33c6c004bbafe82"
FRIEND = "google-oauth2|1234567890"
STRANGER = "user_2hNqYf3kT9xWzL"
ADMIN = "3f2b8c1e-9d4a-4e6f-8b7a-2c5d1e0f9a6b"
SHARED = frozenset({FRIEND})


def ctx_for(user_id: str, roles: set[str] | None = None, **extra: Any) -> UserExecutionContext:
    """An authenticated context for ``user_id`` with the default policy's permissions."""
    perms, features = Policy.default().resolve(frozenset(roles or ()), Tier.BUSINESS)
    extra.setdefault("permissions", perms)
    return UserExecutionContext(
        user_id=user_id, tier=Tier.BUSINESS, roles=roles or (), features=features, **extra
    )


ACTORS = {
    "owner": ctx_for(OWNER, {"user"}),
    "shared": ctx_for(FRIEND, {"user"}),
    "admin": ctx_for(ADMIN, {"admin"}),
    "stranger": ctx_for(STRANGER, {"user"}),
    "resources:* holder": ctx_for(STRANGER, permissions={"resources:*"}),
    "* holder": ctx_for(STRANGER, permissions={"*"}),
    "owner with read_any": ctx_for(OWNER, {"admin"}),
}
# The contract's table: owner rwd, shared rw, read_any r, everyone else nothing.
ALLOWED = {
    "owner": {"read", "write", "delete"},
    "shared": {"read", "write"},
    "admin": {"read"},
    "stranger": set(),
    "resources:* holder": {"read"},
    "* holder": {"read"},
    "owner with read_any": {"read", "write", "delete"},
}


@pytest.mark.parametrize("action", ["read", "write", "delete"])
@pytest.mark.parametrize("actor", sorted(ACTORS))
def test_ownership_table(actor: str, action: str) -> None:
    """Each actor may do exactly the actions of the ownership table, else 403."""
    ctx = ACTORS[actor]
    if action in ALLOWED[actor]:
        assert authorize(action, owner_id=OWNER, shared_with=SHARED, ctx=ctx) is ctx
    else:
        with pytest.raises(PermissionDeniedError) as info:
            authorize(action, owner_id=OWNER, shared_with=SHARED, ctx=ctx)
        assert info.value.status_code == 403


@pytest.mark.parametrize(
    ("action", "required"),
    [
        ("read", ("owner", "shared", "resources:read_any")),
        ("write", ("owner", "shared")),
        ("delete", ("owner",)),
    ],
)
def test_denial_names_who_may_act(action: str, required: tuple[str, ...]) -> None:
    """The 403's ``required`` names the ways the action could have been allowed."""
    with pytest.raises(PermissionDeniedError) as info:
        authorize(action, owner_id=OWNER, ctx=ACTORS["stranger"])
    assert info.value.required == required


def test_defaults_to_the_current_context() -> None:
    """Without ``ctx``, authorize() checks (and returns) the current context."""
    ctx = ACTORS["shared"]
    with use_context(ctx):
        assert authorize("write", owner_id=OWNER, shared_with=[FRIEND]) is ctx
        with pytest.raises(PermissionDeniedError):
            authorize("delete", owner_id=OWNER, shared_with=[FRIEND])


def test_explicit_ctx_wins_over_the_current_one() -> None:
    """An explicit ``ctx`` is checked even when another context is current."""
    with use_context(ACTORS["owner"]), pytest.raises(PermissionDeniedError):
        authorize("delete", owner_id=OWNER, ctx=ACTORS["stranger"])


def test_anonymous_and_missing_context_get_401() -> None:
    """No context, or an anonymous one, raises AuthenticationRequiredError, never 403."""
    with pytest.raises(AuthenticationRequiredError):
        authorize("read", owner_id=OWNER)
    with use_context(UserExecutionContext.anonymous()), pytest.raises(AuthenticationRequiredError):
        authorize("read", owner_id=OWNER, shared_with={"anonymous"})
    with pytest.raises(AuthenticationRequiredError):
        authorize("read", owner_id=OWNER, ctx=UserExecutionContext.anonymous())


def test_unowned_resource_is_readable_only_with_read_any() -> None:
    """With no owner, only a resources:read_any holder may read; nobody may write or delete."""
    assert authorize("read", ctx=ACTORS["admin"]) is ACTORS["admin"]
    for actor, action in (("admin", "write"), ("admin", "delete"), ("stranger", "read")):
        with pytest.raises(PermissionDeniedError):
            authorize(action, ctx=ACTORS[actor])


def test_child_context_narrowed_without_read_any_loses_it() -> None:
    """A child narrowed to threads:read no longer reads others' resources through read_any."""
    with use_context(ACTORS["admin"]):
        assert authorize("read", owner_id=OWNER)
        with (
            child_context("report", permissions={"threads:read"}),
            pytest.raises(PermissionDeniedError),
        ):
            authorize("read", owner_id=OWNER)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"action": "update"},
        {"action": "READ"},
        {"action": "read", "shared_with": FRIEND},
        {"action": "read", "shared_with": 3},
        {"action": "read", "owner_id": 42},
    ],
)
def test_misuse_raises_configuration_error(kwargs: dict[str, Any]) -> None:
    """An unknown action, a single string as shared_with or a non-str owner is refused."""
    action = kwargs.pop("action")
    with pytest.raises(ConfigurationError):
        authorize(action, ctx=ACTORS["owner"], **kwargs)


def test_misuse_is_refused_before_looking_at_the_caller() -> None:
    """An unknown action is a ConfigurationError (a ValueError) even for anonymous callers."""
    with pytest.raises(ValueError, match="read"):
        authorize("share", owner_id=OWNER, ctx=UserExecutionContext.anonymous())


def test_denial_is_audited_once(caplog: pytest.LogCaptureFixture) -> None:
    """A refused write logs one WARNING audit record naming the action and the user."""
    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    ctx = ACTORS["stranger"]
    with pytest.raises(PermissionDeniedError):
        authorize("write", owner_id=OWNER, shared_with=SHARED, ctx=ctx)
    [record] = [r for r in caplog.records if r.name == "ctxvars_mw.audit"]
    assert record.levelno == logging.WARNING
    assert record.check == "ownership:write"  # type: ignore[attr-defined]
    assert record.user_id == STRANGER  # type: ignore[attr-defined]
    assert record.required == ["owner", "shared"]  # type: ignore[attr-defined]
    assert record.held == []  # type: ignore[attr-defined]
    assert record.request_id == ctx.request_id  # type: ignore[attr-defined]


def test_shared_user_denied_delete_is_audited_as_shared(caplog: pytest.LogCaptureFixture) -> None:
    """The audit record of a shared user's refused delete says what they held: 'shared'."""
    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    with pytest.raises(PermissionDeniedError):
        authorize("delete", owner_id=OWNER, shared_with=SHARED, ctx=ACTORS["shared"])
    [record] = [r for r in caplog.records if r.name == "ctxvars_mw.audit"]
    assert record.held == ["shared"]  # type: ignore[attr-defined]
