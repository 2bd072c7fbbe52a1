"""Subscription tiers, ordered ``FREE < EARLY < BUSINESS < ENTERPRISE < INTERNAL``."""

from __future__ import annotations

import enum

__all__ = ["Tier"]


class Tier(enum.StrEnum):
    """A subscription tier; compares by rank, parses from its value (``Tier("business")``)."""

    FREE = "free"
    EARLY = "early"
    BUSINESS = "business"
    ENTERPRISE = "enterprise"
    INTERNAL = "internal"

    @property
    def rank(self) -> int:
        """The position in the tier order, 0 for FREE."""
        return _RANK[self]

    # A Tier is also a str: without these, ``Tier.BUSINESS < "early"`` would fall back to
    # alphabetical str ordering. Strings are parsed as tiers; an unknown one is a TypeError.
    def __lt__(self, other: object) -> bool:
        return _RANK[self] < _rank_of(other)

    def __le__(self, other: object) -> bool:
        return _RANK[self] <= _rank_of(other)

    def __gt__(self, other: object) -> bool:
        return _RANK[self] > _rank_of(other)

    def __ge__(self, other: object) -> bool:
        return _RANK[self] >= _rank_of(other)

    @classmethod
    def parse(cls, value: Tier | str) -> Tier:
        """Return the tier for a Tier or its value (case-insensitive); ValueError otherwise."""
        if isinstance(value, Tier):
            return value
        if isinstance(value, str):
            tier = _BY_VALUE.get(value.lower())
            if tier is not None:
                return tier
        raise ValueError("unknown tier")


_RANK: dict[str, int] = {tier: rank for rank, tier in enumerate(Tier)}
_BY_VALUE = {tier.value: tier for tier in Tier}


def _rank_of(other: object) -> int:
    if isinstance(other, str):
        rank = _RANK.get(other)  # a Tier, or its exact value
        if rank is None:
            rank = _RANK.get(other.lower())
        if rank is not None:
            return rank
    raise TypeError("a Tier compares only with another Tier or a tier name")
