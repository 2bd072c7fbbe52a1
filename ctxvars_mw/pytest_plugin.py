"""The ctxvars_mw pytest plugin (entry point ``pytest11``): markers and fixtures.

A thin layer over :mod:`ctxvars_mw.testing`, which is imported only when a fixture is first
used; loading the plugin imports no web framework.

Fixtures:

- ``clean_context_registry`` — the process-wide :class:`~ctxvars_mw.testing.ContextRegistry`,
  cleared and enabled for the test, disabled after.
- ``realistic_user_context`` — an authenticated enterprise context.
- ``multi_user_contexts`` — ``{tier value: context}`` for the five tiers, five users.
- ``concurrent_context_factory`` — ``(count, base_name) -> list`` of distinct users' contexts.
- ``context_hierarchy_builder`` — ``.chain(depth) -> list`` of a root and its children.
- ``websocket_context_scenarios`` — named lists of websocket connection contexts.
- ``performance_test_contexts`` — 100 contexts, 20 per tier.
- ``async_context_manager`` — ``(ctx=None, **make_context_kwargs)`` → makes a context current
  with ``with`` or ``async with``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .context import UserExecutionContext
    from .current import use_context
    from .testing import ContextRegistry, HierarchyBuilder

MARKERS = {
    "integration": "tests that drive a real framework app or server",
    "user_context": "tests about the current UserExecutionContext",
    "auth_validation": "tests about authentication and token validation",
    "real_services": "tests that need real services (Redis) on 127.0.0.1",
    "multi_user": "tests that run several users side by side",
}

#: How many contexts ``performance_test_contexts`` holds (spread evenly over the tiers).
PERFORMANCE_CONTEXT_COUNT = 100


def pytest_configure(config: pytest.Config) -> None:
    """Register the plugin's markers (so ``--strict-markers`` accepts them)."""
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@pytest.fixture
def clean_context_registry() -> Iterator[ContextRegistry]:
    """The process-wide context registry, cleared and enabled; disabled after the test."""
    from .testing import context_registry

    with context_registry as registry:
        yield registry


@pytest.fixture
def realistic_user_context() -> UserExecutionContext:
    """An authenticated enterprise context (admin role) with realistic ids."""
    from .testing import make_context
    from .tier import Tier

    return make_context(Tier.ENTERPRISE)


@pytest.fixture
def multi_user_contexts() -> dict[str, UserExecutionContext]:
    """One context per tier (five different users), keyed by the tier's value."""
    from .testing import tier_contexts

    return tier_contexts()


@pytest.fixture
def concurrent_context_factory() -> Callable[..., list[UserExecutionContext]]:
    """A callable ``(count, base_name="user") -> list`` of ``count`` distinct users' contexts."""
    from .testing import concurrent_contexts

    return concurrent_contexts


@pytest.fixture
def context_hierarchy_builder() -> HierarchyBuilder:
    """A builder whose ``.chain(depth)`` returns a root context and its descendants."""
    from .testing import HierarchyBuilder

    return HierarchyBuilder()


@pytest.fixture
def websocket_context_scenarios() -> dict[str, list[UserExecutionContext]]:
    """Named lists of websocket connection contexts (see ``testing.websocket_scenarios``)."""
    from .testing import websocket_scenarios

    return websocket_scenarios()


@pytest.fixture
def performance_test_contexts() -> list[UserExecutionContext]:
    """100 contexts for load-style tests: 20 per tier, all different users."""
    from .testing import make_context
    from .tier import Tier

    tiers = list(Tier)
    return [make_context(tiers[i % len(tiers)]) for i in range(PERFORMANCE_CONTEXT_COUNT)]


@pytest.fixture
def async_context_manager() -> Callable[..., use_context]:
    """``(ctx=None, **make_context_kwargs)`` → a ``with``/``async with`` that makes it current."""
    from .testing import context_scope

    return context_scope
