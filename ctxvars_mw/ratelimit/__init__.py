"""Per-tier metering: request rates checked by ContextMiddleware, quotas consumed by code.

- :mod:`~ctxvars_mw.ratelimit.declarations` — :class:`Rate`, :class:`Quota` and the per-tier
  tables of a :class:`~ctxvars_mw.Policy` (``tier_limits``).
- :mod:`~ctxvars_mw.ratelimit.store` — the store protocol and :class:`InMemoryLimitStore`;
  :mod:`~ctxvars_mw.ratelimit.redis_store` — :class:`RedisLimitStore`, for many processes.
"""

from __future__ import annotations

from .declarations import Quota, Rate, TierLimits
from .store import InMemoryLimitStore, LimitStore

__all__ = ["InMemoryLimitStore", "LimitStore", "Quota", "Rate", "TierLimits"]
