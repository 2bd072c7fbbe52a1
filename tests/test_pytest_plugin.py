"""The pytest plugin, driven through pytester: every fixture and marker API.md §7 names."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

INI = """
[pytest]
addopts = --strict-markers -p no:cacheprovider
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    """Write ``source`` as a test module in a fresh project and run pytest on it."""
    pytester.makeini(INI)
    pytester.makepyfile(test_inner=textwrap.dedent(source))
    # Unrelated heavy plugins are switched off: re-loading them per inner run costs ~1.5 s.
    quiet = ("-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:cov")
    return pytester.runpytest(*quiet, *args)


def test_markers_are_registered_and_accepted_under_strict_markers(
    pytester: pytest.Pytester,
) -> None:
    """All five markers pass ``--strict-markers`` and are listed by ``pytest --markers``."""
    result = run(
        pytester,
        """
        import pytest

        @pytest.mark.integration
        @pytest.mark.user_context
        @pytest.mark.auth_validation
        @pytest.mark.real_services
        @pytest.mark.multi_user
        def test_marked():
            pass
        """,
    )
    result.assert_outcomes(passed=1)
    listing = pytester.runpytest("--markers").stdout.str()
    for name in ("integration", "user_context", "auth_validation", "real_services", "multi_user"):
        assert f"@pytest.mark.{name}:" in listing


def test_clean_context_registry_is_enabled_cleared_and_disabled_after(
    pytester: pytest.Pytester,
) -> None:
    """The registry starts empty and enabled, counts live contexts, and is off after the test."""
    result = run(
        pytester,
        """
        import gc
        from ctxvars_mw import UserExecutionContext
        from ctxvars_mw.testing import context_registry

        def test_tracks(clean_context_registry):
            assert clean_context_registry is context_registry
            assert clean_context_registry.enabled
            assert clean_context_registry.active_count() == 0
            ctx = UserExecutionContext(user_id="auth0|5f7c8ec7c33c6c004bbafe82")
            assert clean_context_registry.active_count("auth0|5f7c8ec7c33c6c004bbafe82") == 1
            del ctx
            gc.collect()
            assert clean_context_registry.active_count() == 0

        def test_disabled_afterwards():
            assert not context_registry.enabled
        """,
    )
    result.assert_outcomes(passed=2)


def test_realistic_and_multi_user_contexts_follow_the_default_policy(
    pytester: pytest.Pytester,
) -> None:
    """The enterprise context and the five tier contexts carry the default policy's grants."""
    result = run(
        pytester,
        """
        from ctxvars_mw import Policy, Tier

        def test_realistic(realistic_user_context):
            ctx = realistic_user_context
            assert ctx.tier is Tier.ENTERPRISE and ctx.is_authenticated
            assert ctx.user_id.startswith("auth0|") and len(ctx.user_id) == 30
            assert ctx.features == Policy.default().features_for_tier(Tier.ENTERPRISE)
            assert len(ctx.features) == 16 and ctx.has_permission("users:manage")

        def test_multi(multi_user_contexts):
            tiers = ["free", "early", "business", "enterprise", "internal"]
            assert list(multi_user_contexts) == tiers
            assert len({c.user_id for c in multi_user_contexts.values()}) == 5
            sizes = [len(c.features) for c in multi_user_contexts.values()]
            assert sizes == [3, 5, 7, 16, 18]
            assert multi_user_contexts["free"].has_permission("agents:execute")
            assert not multi_user_contexts["free"].has_permission("users:manage")
        """,
    )
    result.assert_outcomes(passed=2)


def test_concurrent_factory_and_hierarchy_builder(pytester: pytest.Pytester) -> None:
    """The factory gives distinct users; ``chain(depth)`` reaches depth 10 and no further."""
    result = run(
        pytester,
        """
        import pytest
        from ctxvars_mw import MaxDepthExceededError

        def test_factory(concurrent_context_factory):
            contexts = concurrent_context_factory(25, "tenant")
            assert len(contexts) == 25
            assert len({c.user_id for c in contexts}) == 25
            assert all(c.user_id.startswith("tenant-") for c in contexts)

        def test_chain(context_hierarchy_builder):
            chain = context_hierarchy_builder.chain(10)
            assert [c.operation_depth for c in chain] == list(range(11))
            assert len({c.correlation_id for c in chain}) == 1
            for parent, child in zip(chain, chain[1:]):
                assert child.parent_request_id == parent.request_id
            with pytest.raises(MaxDepthExceededError):
                context_hierarchy_builder.chain(11)
        """,
    )
    result.assert_outcomes(passed=2)


def test_websocket_and_performance_fixtures(pytester: pytest.Pytester) -> None:
    """Websocket scenarios carry distinct client ids; the performance set spans the tiers."""
    result = run(
        pytester,
        """
        from collections import Counter

        def test_ws(websocket_context_scenarios):
            s = websocket_context_scenarios
            assert set(s) == {"one_user_one_connection", "one_user_two_connections",
                              "two_users", "anonymous"}
            a, b = s["one_user_two_connections"]
            assert a.user_id == b.user_id and a.websocket_client_id != b.websocket_client_id
            u1, u2 = s["two_users"]
            assert u1.user_id != u2.user_id
            assert not s["anonymous"][0].is_authenticated

        def test_perf(performance_test_contexts):
            assert len(performance_test_contexts) == 100
            counts = Counter(c.tier.value for c in performance_test_contexts)
            assert set(counts.values()) == {20}
        """,
    )
    result.assert_outcomes(passed=2)


def test_async_context_manager_keeps_each_task_on_its_own_context(
    pytester: pytest.Pytester,
) -> None:
    """Two tasks entering their own contexts still read their own after awaiting."""
    result = run(
        pytester,
        """
        import asyncio
        from ctxvars_mw import get_context, get_context_or_none

        async def test_isolated(async_context_manager, multi_user_contexts):
            async def worker(ctx):
                async with async_context_manager(ctx):
                    await asyncio.sleep(0.01)
                    return get_context().user_id

            contexts = list(multi_user_contexts.values())
            seen = await asyncio.gather(*(worker(c) for c in contexts))
            assert seen == [c.user_id for c in contexts]
            assert get_context_or_none() is None

        def test_builds_one_when_none_given(async_context_manager):
            with async_context_manager(tier="business") as ctx:
                assert get_context() is ctx and ctx.tier.value == "business"
            assert get_context_or_none() is None
        """,
    )
    result.assert_outcomes(passed=2)


def test_loading_the_plugin_imports_no_web_framework() -> None:
    """Importing the plugin (and using its helpers) leaves every web framework unimported."""
    code = textwrap.dedent(
        """
        import sys
        import ctxvars_mw.pytest_plugin
        import ctxvars_mw.testing
        ctxvars_mw.testing.tier_contexts()
        frameworks = {"starlette", "fastapi", "django", "uvicorn", "flask", "aiohttp"}
        print(sorted(m for m in sys.modules if m.split(".")[0] in frameworks))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "[]"
