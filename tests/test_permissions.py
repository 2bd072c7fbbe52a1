"""The requires_* decorators and depends_* factories on plain, async and threaded functions."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctxvars_mw import (
    AuthenticationRequiredError,
    ConfigurationError,
    PermissionDeniedError,
    PermissionEscalationError,
    Policy,
    Tier,
    UserExecutionContext,
    bind,
    child_context,
    depends_authenticated,
    depends_feature,
    depends_permission,
    depends_role,
    depends_tier,
    get_context,
    requires_authenticated,
    requires_feature,
    requires_permission,
    requires_role,
    requires_tier,
    run_in_thread,
    use_context,
)

from .authz_tables import ADMIN, FEATURE_TIER, ROLE_HOLDS

USER_ID = "auth0|5f7c8ec7c33c6c004bbafe82"
STYLES = ["sync", "async", "run_in_thread", "bind_executor"]


def context(roles: Any = (), tier: Tier = Tier.FREE, **extra: Any) -> UserExecutionContext:
    """An authenticated context resolved through the default policy, as the middleware does."""
    perms, features = Policy.default().resolve(frozenset(roles), tier)
    extra.setdefault("permissions", perms)
    return UserExecutionContext(user_id=USER_ID, tier=tier, roles=roles, features=features, **extra)


def guarded(decorator: Callable[[Callable[..., Any]], Callable[..., Any]], style: str) -> Any:
    """A function of ``style``'s kind (sync or async) guarded by ``decorator``."""
    if style == "async":

        async def async_endpoint(value: int = 1) -> int:
            await asyncio.sleep(0)
            return value

        return decorator(async_endpoint)

    def sync_endpoint(value: int = 1) -> int:
        return value

    return decorator(sync_endpoint)


async def outcome(fn: Any, style: str) -> int:
    """Call ``fn`` the ``style`` way; 200 on success, else the error's status code."""
    try:
        if style == "sync":
            result = fn(7)
        elif style == "async":
            result = await fn(7)
        elif style == "run_in_thread":
            result = await run_in_thread(fn, 7)
        else:
            with ThreadPoolExecutor(1) as pool:
                result = pool.submit(bind(fn), 7).result()
    except (AuthenticationRequiredError, PermissionDeniedError) as exc:
        return exc.status_code
    assert result == 7
    return 200


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("tier", list(Tier))
async def test_tier_and_feature_gates_follow_the_default_tables(style: str, tier: Tier) -> None:
    """At each tier, exactly the features of that tier and below, and tiers up to it, pass."""
    gates = {f"feature:{f}": (requires_feature(f), t) for f, t in FEATURE_TIER.items()}
    gates.update({f"tier:{t.value}": (requires_tier(t), t) for t in Tier})
    seen = {}
    expected = {}
    with use_context(context(tier=tier)):
        for name, (decorator, lowest) in gates.items():
            seen[name] = await outcome(guarded(decorator, style), style)
            expected[name] = 200 if tier >= lowest else 403
    assert seen == expected


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("role", sorted(ROLE_HOLDS))
async def test_role_and_permission_gates_follow_the_default_tables(style: str, role: str) -> None:
    """Each role passes exactly its (inherited) permissions and its roles; others get 403."""
    roles = set() if role == "none" else {role}
    seen = {}
    expected = {}
    with use_context(context(roles=roles)):
        for perm in sorted(ADMIN):
            seen[perm] = await outcome(guarded(requires_permission(perm), style), style)
            expected[perm] = 200 if perm in ROLE_HOLDS[role] else 403
        for name in ("readonly", "user", "admin"):
            seen[f"role:{name}"] = await outcome(guarded(requires_role(name), style), style)
            expected[f"role:{name}"] = 200 if name == role else 403
    assert seen == expected


ALL_DECORATORS = [
    requires_authenticated(),
    requires_tier(Tier.FREE),
    requires_role("readonly"),
    requires_permission("threads:read"),
    requires_feature("chat"),
]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("decorator", ALL_DECORATORS)
async def test_anonymous_gets_401_from_every_decorator(decorator: Any, style: str) -> None:
    """Anonymous callers get AuthenticationRequiredError, even for requires_tier(FREE)."""
    with use_context(UserExecutionContext.anonymous()):
        assert await outcome(guarded(decorator, style), style) == 401


@pytest.mark.parametrize("decorator", ALL_DECORATORS)
async def test_no_context_gets_401(decorator: Any) -> None:
    """Outside any request or use_context block, a guarded call is refused as anonymous."""
    assert await outcome(guarded(decorator, "async"), "async") == 401
    assert await outcome(guarded(decorator, "sync"), "sync") == 401


def test_requires_authenticated_passes_any_authenticated_user() -> None:
    """requires_authenticated() lets through an authenticated context with no grants."""
    with use_context(context()):
        assert guarded(requires_authenticated(), "sync")(3) == 3


def test_denial_names_what_was_required() -> None:
    """The 403's ``required`` lists the names the check asked for, in order, deduplicated."""
    endpoint = guarded(
        requires_permission("billing:manage", "users:read", "billing:manage"), "sync"
    )
    with use_context(context(roles={"user"})), pytest.raises(PermissionDeniedError) as info:
        endpoint()
    assert info.value.required == ("billing:manage", "users:read")
    assert info.value.status_code == 403
    assert info.value.error == "insufficient_scope"
    assert "billing:manage" in info.value.description


@pytest.mark.parametrize(
    ("decorator", "required"),
    [
        (requires_tier("enterprise"), ("enterprise",)),
        (requires_role("admin"), ("admin",)),
        (requires_feature("sso", "sla"), ("sso", "sla")),
    ],
)
def test_denial_required_for_each_kind(decorator: Any, required: tuple[str, ...]) -> None:
    """Tier, role and feature denials carry the tier value or the names as ``required``."""
    with use_context(context(roles={"user"})), pytest.raises(PermissionDeniedError) as info:
        guarded(decorator, "sync")()
    assert info.value.required == required


def test_any_of_needs_only_one() -> None:
    """With any_=True one held name is enough; with the default all are needed."""
    with use_context(context(roles={"readonly"}, tier=Tier.EARLY)):
        assert (
            guarded(requires_permission("agents:read", "agents:manage", any_=True), "sync")() == 1
        )
        assert guarded(requires_role("admin", "readonly", any_=True), "sync")() == 1
        assert guarded(requires_feature("sso", "beta_features", any_=True), "sync")() == 1
        for decorator in (
            requires_permission("agents:read", "agents:manage"),
            requires_role("admin", "readonly"),
            requires_feature("sso", "beta_features"),
            requires_permission("agents:manage", "billing:read", any_=True),
        ):
            with pytest.raises(PermissionDeniedError):
                guarded(decorator, "sync")()


@pytest.mark.parametrize(
    ("held", "required", "any_", "allowed"),
    [
        ({"agents:*"}, ("agents:execute", "agents:manage"), False, True),
        ({"agents:*"}, ("agents:execute", "tools:execute"), False, False),
        ({"agents:*"}, ("tools:execute", "agents:manage"), True, True),
        ({"*"}, ("billing:manage", "users:manage"), False, True),
        ({"agents:*"}, ("agents:*",), False, True),
        ({"agents:execute"}, ("agents:*",), False, False),
        ({"tools:*"}, ("agents:execute", "agents:manage"), True, False),
    ],
)
def test_held_wildcards_grant_permissions(
    held: set[str], required: tuple[str, ...], any_: bool, allowed: bool
) -> None:
    """A held ``resource:*`` grants that resource's permissions; ``*`` grants all."""
    endpoint = guarded(requires_permission(*required, any_=any_), "sync")
    with use_context(context(permissions=held)):
        if allowed:
            assert endpoint() == 1
        else:
            with pytest.raises(PermissionDeniedError):
                endpoint()


_PERMISSION = st.sampled_from(["agents", "tools", "billing"]).flatmap(
    lambda resource: st.sampled_from([f"{resource}:read", f"{resource}:manage", f"{resource}:*"])
)


@given(
    held=st.frozensets(_PERMISSION | st.just("*"), max_size=4),
    required=st.lists(_PERMISSION, min_size=1, max_size=3),
    any_=st.booleans(),
)
def test_permission_check_agrees_with_has_permission(
    held: frozenset[str], required: list[str], any_: bool
) -> None:
    """For any held/required sets, the decorator passes iff has_permission says all (or any)."""
    ctx = context(permissions=held)
    endpoint = guarded(requires_permission(*required, any_=any_), "sync")
    combine = any if any_ else all
    expected = combine(ctx.has_permission(p) for p in required)
    with use_context(ctx):
        try:
            endpoint()
            allowed = True
        except PermissionDeniedError:
            allowed = False
    assert allowed is expected


@pytest.mark.parametrize(
    "make",
    [
        lambda: requires_tier("platinum"),
        lambda: requires_tier(3),
        lambda: requires_role(),
        lambda: requires_role(""),
        lambda: requires_role("ad min"),
        lambda: requires_role(1),
        lambda: requires_role("admin", any_="yes"),
        lambda: requires_permission(),
        lambda: requires_permission("agents execute"),
        lambda: requires_permission("*:execute"),
        lambda: requires_permission("agents:"),
        lambda: requires_feature(),
        lambda: requires_feature(None),
        lambda: requires_role(lambda: None),
        lambda: depends_tier("gold"),
        lambda: depends_permission(),
        lambda: requires_authenticated()(type("Endpoint", (), {})),
        lambda: requires_authenticated()(42),
    ],
)
def test_misuse_raises_configuration_error_at_decoration(make: Callable[[], Any]) -> None:
    """Unknown tiers, missing or malformed names, non-functions fail when decorating."""
    with pytest.raises(ConfigurationError):
        make()


def test_async_generators_are_refused() -> None:
    """Guarding an async generator function is refused at decoration time."""

    async def stream() -> Any:
        yield 1

    with pytest.raises(ConfigurationError):
        requires_authenticated()(stream)


def test_wrapper_keeps_name_doc_signature_and_kind() -> None:
    """functools.wraps metadata, the signature and coroutine-ness survive decoration."""

    async def endpoint(item_id: int, q: str | None = None, *, limit: int = 10) -> dict[str, Any]:
        """Fetch an item."""
        return {"item_id": item_id}

    def view(request: object) -> str:
        """A Django-style view."""
        return "ok"

    guarded_endpoint = requires_permission("agents:read")(endpoint)
    guarded_view = requires_role("user")(view)
    assert guarded_endpoint.__name__ == "endpoint"
    assert guarded_endpoint.__doc__ == "Fetch an item."
    assert inspect.signature(guarded_endpoint) == inspect.signature(endpoint)
    assert inspect.iscoroutinefunction(guarded_endpoint)
    assert not inspect.iscoroutinefunction(guarded_view)
    assert inspect.signature(guarded_view) == inspect.signature(view)


def test_view_receives_its_request_argument_untouched() -> None:
    """A view's positional ``request`` and keyword arguments pass through unchanged."""
    request = object()

    @requires_role("user")
    def view(req: object, *, slug: str) -> tuple[object, str]:
        return req, slug

    with use_context(context(roles={"user"})):
        assert view(request, slug="news") == (request, "news")


async def test_methods_and_async_callable_instances_are_guarded() -> None:
    """Methods and instances with an async __call__ keep their kind and are checked."""

    class Endpoints:
        @requires_permission("agents:execute")
        async def run(self, name: str) -> str:
            return f"ran {name}"

    class Handler:
        async def __call__(self, value: int) -> int:
            return value

    guarded_handler = requires_role("user")(Handler())
    assert inspect.iscoroutinefunction(guarded_handler)
    with use_context(context(roles={"user"})):
        assert await Endpoints().run("planner") == "ran planner"
        assert await guarded_handler(5) == 5
    with use_context(context(roles={"readonly"})), pytest.raises(PermissionDeniedError):
        await Endpoints().run("planner")


def test_stacked_decorators_check_outermost_first() -> None:
    """Stacked decorators merge into one wrapper; the outermost failing check is reported."""

    @requires_tier("enterprise")
    @requires_permission("billing:manage")
    def report() -> str:
        return "ok"

    with use_context(context(roles={"user"})), pytest.raises(PermissionDeniedError) as info:
        report()
    assert info.value.required == ("enterprise",)
    with (
        use_context(context(roles={"user"}, tier=Tier.ENTERPRISE)),
        pytest.raises(PermissionDeniedError) as info,
    ):
        report()
    assert info.value.required == ("billing:manage",)
    with use_context(context(roles={"admin"}, tier=Tier.ENTERPRISE)):
        assert report() == "ok"


def test_guard_around_a_foreign_decorator_still_checks() -> None:
    """Our decorator over (or under) another functools.wraps decorator still enforces both."""
    calls: list[str] = []

    def traced(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return inner

    @requires_role("admin")
    @traced
    @requires_feature("sso")
    def act() -> str:
        return "done"

    with use_context(context(roles={"admin"})), pytest.raises(PermissionDeniedError) as info:
        act()
    assert info.value.required == ("sso",)
    assert calls == ["act"]
    with use_context(context(roles={"admin"}, tier=Tier.ENTERPRISE)):
        assert act() == "done"


async def test_check_runs_when_the_coroutine_runs_in_its_context() -> None:
    """An async endpoint is checked against the context current when it runs, per task."""

    @requires_role("admin")
    async def endpoint(value: int) -> int:
        await asyncio.sleep(0)
        return value

    async def run_as(roles: set[str]) -> int:
        with use_context(context(roles=roles)):
            await asyncio.sleep(0)
            return await outcome(endpoint, "async")

    results = await asyncio.gather(*(run_as({"admin"} if i % 2 else {"user"}) for i in range(20)))
    assert results == [200 if i % 2 else 403 for i in range(20)]


async def test_checks_inside_child_context_see_narrowed_permissions() -> None:
    """A child narrowed to agents:read fails requires_permission('agents:execute')."""
    execute = guarded(requires_permission("agents:execute"), "async")
    read = guarded(requires_permission("agents:read"), "sync")
    admin_only = guarded(requires_role("user"), "sync")
    with use_context(context(roles={"user"})):
        assert await outcome(execute, "async") == 200
        with child_context("agent.plan", permissions={"agents:read"}) as child:
            assert child.permissions == {"agents:read"}
            assert await outcome(execute, "async") == 403
            assert await outcome(read, "run_in_thread") == 200
            assert admin_only() == 1  # roles are inherited unchanged; permissions narrow
        assert await outcome(execute, "async") == 200


def test_child_context_cannot_widen_permissions() -> None:
    """Asking a child for a permission the parent lacks raises PermissionEscalationError."""
    with use_context(context(roles={"readonly"})):
        with pytest.raises(PermissionEscalationError) as info:
            get_context().child("agent.run", permissions={"agents:read", "agents:execute"})
        assert info.value.required == ("agents:execute",)
        assert info.value.status_code == 403
        with pytest.raises(PermissionEscalationError):
            child_context("agent.run", permissions={"agents:*"})


def test_child_of_wildcard_holder_may_narrow_to_a_specific_permission() -> None:
    """A parent holding agents:* may derive a child holding only agents:execute."""
    endpoint = guarded(requires_permission("agents:execute"), "sync")
    manage = guarded(requires_permission("agents:manage"), "sync")
    with (
        use_context(context(permissions={"agents:*"})),
        child_context("agent.run", permissions={"agents:execute"}),
    ):
        assert endpoint() == 1
        with pytest.raises(PermissionDeniedError):
            manage()


async def test_dependencies_return_the_context_or_raise() -> None:
    """depends_* return no-argument async callables giving the context, or the same errors."""
    deps = [
        depends_authenticated(),
        depends_tier("business"),
        depends_role("user"),
        depends_permission("agents:execute"),
        depends_feature("api_access"),
    ]
    for dep in deps:
        assert inspect.iscoroutinefunction(dep)
        assert not inspect.signature(dep).parameters
    ctx = context(roles={"user"}, tier=Tier.BUSINESS)
    with use_context(ctx):
        assert [await dep() for dep in deps] == [ctx] * 5
    with use_context(context(roles={"readonly"})):
        for dep in deps[1:]:
            with pytest.raises(PermissionDeniedError):
                await dep()
    with use_context(UserExecutionContext.anonymous()):
        for dep in deps:
            with pytest.raises(AuthenticationRequiredError):
                await dep()


def test_any_of_dependency_and_decorator_agree() -> None:
    """depends_role(any_=True) and requires_role(any_=True) pass and fail together."""
    dep = depends_role("admin", "user", any_=True)
    endpoint = guarded(requires_role("admin", "user", any_=True), "sync")
    for roles, ok in (({"user"}, True), ({"readonly"}, False)):
        with use_context(context(roles=roles)):
            try:
                asyncio.run(dep())
                dep_ok = True
            except PermissionDeniedError:
                dep_ok = False
            try:
                endpoint()
                dec_ok = True
            except PermissionDeniedError:
                dec_ok = False
        assert dep_ok is dec_ok is ok


# -- audit ---------------------------------------------------------------------------------


def audit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The audit records captured so far."""
    return [r for r in caplog.records if r.name == "ctxvars_mw.audit"]


def test_denial_emits_one_structured_audit_record(caplog: pytest.LogCaptureFixture) -> None:
    """A 403 logs exactly one WARNING on ctxvars_mw.audit with ids, required and held."""
    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    ctx = context(roles={"readonly"}, tier=Tier.EARLY)

    @requires_tier("early")
    @requires_permission("agents:execute", "tools:execute")
    def act() -> None:
        return None

    with use_context(ctx), pytest.raises(PermissionDeniedError):
        act()
    [record] = audit_records(caplog)
    assert record.levelno == logging.WARNING
    assert record.audit_event == "authorization_denied"  # type: ignore[attr-defined]
    assert record.check == "permission"  # type: ignore[attr-defined]
    assert record.match == "all"  # type: ignore[attr-defined]
    assert record.status == 403  # type: ignore[attr-defined]
    assert record.required == ["agents:execute", "tools:execute"]  # type: ignore[attr-defined]
    assert record.held == ["agents:read", "threads:read"]  # type: ignore[attr-defined]
    assert record.user_id == USER_ID  # type: ignore[attr-defined]
    assert record.request_id == ctx.request_id  # type: ignore[attr-defined]
    assert record.correlation_id == ctx.correlation_id  # type: ignore[attr-defined]
    assert record.tier == "early"  # type: ignore[attr-defined]


def test_anonymous_denial_is_audited_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """A 401 from a decorator logs one INFO audit record for the anonymous user."""
    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    with use_context(UserExecutionContext.anonymous()), pytest.raises(AuthenticationRequiredError):
        guarded(requires_role("admin"), "sync")()
    [record] = audit_records(caplog)
    assert record.levelno == logging.INFO
    assert record.status == 401  # type: ignore[attr-defined]
    assert record.user_id == "anonymous"  # type: ignore[attr-defined]
    assert record.required == ["admin"]  # type: ignore[attr-defined]
    assert record.parent_request_id == "-"  # type: ignore[attr-defined]


def test_denial_in_a_child_context_audits_its_parent_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The audit record carries the same fields as the log filter: a child's parent id too."""
    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    parent = context(roles={"user"})
    with use_context(parent.child("tool.search")), pytest.raises(PermissionDeniedError):
        guarded(requires_role("admin"), "sync")()
    [record] = audit_records(caplog)
    assert record.parent_request_id == parent.request_id  # type: ignore[attr-defined]


def test_a_denial_audits_the_request_the_context_describes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The audit record names the client address, user agent, method and path of the
    context ("-" for those it does not hold)."""
    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    ctx = context(roles={"user"}, client_ip="192.0.2.44", method="DELETE", path="/threads/9")
    with use_context(ctx.child("tool.delete")), pytest.raises(PermissionDeniedError):
        guarded(requires_role("admin"), "sync")()
    [record] = audit_records(caplog)
    assert record.client_ip == "192.0.2.44"  # type: ignore[attr-defined]
    assert record.method == "DELETE"  # type: ignore[attr-defined]
    assert record.path == "/threads/9"  # type: ignore[attr-defined]
    assert record.user_agent == "-"  # type: ignore[attr-defined]


def test_passing_checks_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """An allowed call emits no audit record."""
    caplog.set_level(logging.DEBUG, logger="ctxvars_mw.audit")
    with use_context(context(roles={"admin"}, tier=Tier.INTERNAL)):
        guarded(requires_permission("billing:manage"), "sync")()
        guarded(requires_feature("admin_console"), "sync")()
    assert audit_records(caplog) == []


def test_audit_record_never_carries_claims_or_secrets(caplog: pytest.LogCaptureFixture) -> None:
    """Claims (which may hold tokens) never reach the audit record, its message or attributes."""
    caplog.set_level(logging.INFO, logger="ctxvars_mw.audit")
    secret = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.s3cr3t-signature"
    ctx = context(roles={"user"}, claims={"raw_token": secret, "api_key": "sk_live_51Hx9"})
    with use_context(ctx), pytest.raises(PermissionDeniedError):
        guarded(requires_role("admin"), "sync")()
    [record] = audit_records(caplog)
    dumped = repr(vars(record)) + record.getMessage()
    assert secret not in dumped
    assert "sk_live_51Hx9" not in dumped
