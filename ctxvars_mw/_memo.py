"""The bounded memo behind the hot paths' "seen this exact value before" shortcuts."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["remember"]

K = TypeVar("K")
V = TypeVar("V")


def remember(memo: dict[K, V], key: K, value: V, limit: int) -> V:
    """Store ``value`` under ``key`` and return it; at ``limit`` entries the memo is emptied
    first, so a stream of new keys (a client making values up) only churns it."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value
