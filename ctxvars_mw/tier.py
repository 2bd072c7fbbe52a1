"""Subscription tiers, ordered ``FREE < EARLY < BUSINESS < ENTERPRISE < INTERNAL``.

A tier is named by its exact lowercase value (``"business"``), everywhere: in token claims, in
policy files, in decorators and in comparisons. ``"Business"`` or ``"INTERNAL"`` is not a tier:
a claim's value is what the issuer signed, and reading ``"INTERNAL"`` as the most privileged tier
would let a spelling the issuer never meant grant it.
"""

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
    # alphabetical str ordering. A string must be a tier's exact value; any other is a TypeError.
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
        """Return the tier for a Tier or its exact value (``"business"``); ValueError otherwise."""
        if isinstance(value, Tier):
            return value
        if isinstance(value, str):
            tier = _BY_VALUE.get(value)
            if tier is not None:
                return tier
        raise ValueError("unknown tier")


_RANK: dict[str, int] = {tier: rank for rank, tier in enumerate(Tier)}
_BY_VALUE = {tier.value: tier for tier in Tier}


def _rank_of(other: object) -> int:
    if isinstance(other, str):
        rank = _RANK.get(other)  # a Tier, or its exact value
        if rank is not None:
            return rank
    raise TypeError("a Tier compares only with another Tier or a tier name")
