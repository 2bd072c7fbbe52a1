"""The Limiter: a policy's limits applied to callers, against a store.

Who counts as one caller (:meth:`Limiter.caller_key`): an authenticated user by user id (or
by session id, with ``key="session"``, for tokens that carry one); an anonymous caller by
client address (:func:`client_address`), so every anonymous caller from one address shares
the free tier's limits.

What a request meets (:meth:`Limiter.check_request`): the rates of its caller's tier, or,
on a path named in ``route_limits``, that route's own rates (its own counters) for the
tiers the route's table covers. A tier without rates costs nothing: no store call, no
headers. Answers carry the IETF ``RateLimit-Policy`` and ``RateLimit`` fields
(draft-ietf-httpapi-ratelimit-headers): one item per rate, named by its window, with
``q`` / ``w`` (the rate and its window in seconds) and ``r`` / ``t`` (requests admitted now,
and the seconds until the rate is back to its full burst — or, at ``r=0``, until the next
request is admitted). A refusal is a 429 (:class:`~ctxvars_mw.RateLimitedError`) with
``Retry-After``, and one audit record.

When the store cannot answer: ``failure="closed"`` refuses with a 503 and ``Retry-After``
(:class:`~ctxvars_mw.ServiceUnavailableError`); ``failure="open"`` lets the request through
unmetered. Either way the outage is logged when it starts (then at most once a minute while
it lasts, with the count of requests that met it) and when it ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Coroutine, Mapping
from typing import Any, NamedTuple

from ..context import UserExecutionContext
from ..errors import (
    ConfigurationError,
    QuotaExceededError,
    RateLimitedError,
    ServiceUnavailableError,
)
from ..policy import Policy
from ..requirements import audit_record
from ..tier import Tier
from ..types import Scope
from .declarations import Quota, Rate, compile_rate_table
from .store import InMemoryLimitStore, LimitStore, RateVerdict

__all__ = ["Limiter", "Plan", "QuotaUsage", "client_address", "plans_for"]

logger = logging.getLogger("ctxvars_mw.ratelimit")
_FAILURE = ("closed", "open")
_KEYS = ("user", "session")
_WARN_EVERY = 60.0  # seconds between two warnings of one outage


def client_address(ctx: UserExecutionContext, scope: Scope | None = None) -> str:
    """The address anonymous callers are counted by: the context's ``client_ip`` (the peer,
    or the client that trusted proxies name: :mod:`ctxvars_mw.proxies`), else the ASGI
    ``client`` host of ``scope`` (a middleware that does not record ``client_ip``), else
    ``"unknown"``.
    """
    if ctx.client_ip is not None:
        return ctx.client_ip
    client = None if scope is None else scope.get("client")
    return str(client[0]) if client else "unknown"


class Plan(NamedTuple):
    """The rates one tier meets in one place, with what each check needs made in advance:
    the key suffixes (one per rate, naming its counter), the rates, the ``RateLimit-Policy``
    header, and each rate's ``RateLimit`` item as a format (``b'"minute";r=%d;t=%d'``)."""

    suffixes: tuple[str, ...]
    rates: tuple[Rate, ...]
    policy: tuple[bytes, bytes]
    formats: tuple[bytes, ...]


def plans_for(bucket: str, rates_by_tier: Mapping[Tier, tuple[Rate, ...]]) -> dict[Tier, Plan]:
    """A :class:`Plan` per tier with rates, counting in ``bucket``; tiers without are left out."""
    plans = {}
    for tier, rates in rates_by_tier.items():
        if rates:
            header = ",".join(f'"{r.name}";q={r.limit};w={r.seconds}' for r in rates)
            suffixes = tuple(f"|{bucket}|{r.seconds}" for r in rates)
            formats = tuple(f'"{r.name}";r=%d;t=%d'.encode("ascii") for r in rates)
            policy = (b"ratelimit-policy", header.encode("ascii"))
            plans[tier] = Plan(suffixes, rates, policy, formats)
    return plans


class QuotaUsage(NamedTuple):
    """What a consumption left: the quota's ``name``, its ``limit`` (None: unlimited), the
    units ``used`` and ``remaining`` in the period, and when it ``resets`` (Unix time; None
    when unlimited)."""

    name: str
    limit: int | None
    used: int
    remaining: int | None
    resets: float | None


class Limiter:
    """A policy's ``tier_limits`` applied to callers, with state in ``store`` (default: an
    :class:`~ctxvars_mw.InMemoryLimitStore`).

    ContextMiddleware builds one from its options when its policy declares limits (or
    ``route_limits`` are given). Build one yourself to meter work outside a request, e.g. in
    a worker: ``await consume("agent_runs", limiter=limiter)`` inside ``use_context(ctx)``.
    Options (checked here, :class:`ConfigurationError` otherwise): ``failure`` (``"closed"``
    or ``"open"``, see the module docstring), ``retry_after`` (seconds, on the 503),
    ``key`` (``"user"`` or ``"session"``) and ``route_limits`` (path → tier → rates; a path
    ending in ``*`` is a prefix).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        store: LimitStore | None = None,
        failure: str = "closed",
        retry_after: int = 5,
        key: str = "user",
        route_limits: Mapping[str, Mapping[Any, Any]] | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            raise ConfigurationError("policy must be a Policy")
        if store is not None and not callable(getattr(store, "hit", None)):
            raise ConfigurationError("the limit store must be a LimitStore (memory or Redis)")
        if failure not in _FAILURE:
            raise ConfigurationError("the limit failure mode must be 'closed' or 'open'")
        if key not in _KEYS:
            raise ConfigurationError("the limit key must be 'user' or 'session'")
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 1:
            raise ConfigurationError("retry_after must be a positive int (seconds)")
        self.policy = policy
        self.store: LimitStore = store if store is not None else InMemoryLimitStore()
        self.fail_open = failure == "open"
        self.retry_after = retry_after
        self.by_session = key == "session"
        self.plans = plans_for("", {t: policy.limits_for_tier(t).rates for t in Tier})
        self.quotas = {t: policy.limits_for_tier(t).quotas for t in Tier}
        self.quota_names = frozenset(self.quotas[Tier.FREE])
        self.route_exact, self.route_prefixes = _routes(route_limits or {}, self.plans)
        self.routed = bool(self.route_exact or self.route_prefixes)
        self._outage = 0  # checks that met the store unavailable since it last answered
        self._warned = 0.0

    def caller_key(self, ctx: UserExecutionContext, scope: Scope | None) -> str:
        """Who ``ctx``'s limits count against: ``u:<user id>``, ``s:<session id>`` (with
        ``key="session"``) or, for an anonymous caller, ``ip:<address>`` (see
        :func:`client_address`)."""
        if ctx.is_authenticated:
            if self.by_session and ctx.session_id is not None:
                return "s:" + ctx.session_id
            return "u:" + ctx.user_id
        return "ip:" + client_address(ctx, scope)

    def plan(self, path: str, tier: Tier) -> Plan | None:
        """The rates a request to ``path`` by a ``tier`` caller meets (None: none)."""
        if self.route_exact:
            route = self.route_exact.get(path)
            if route is not None:
                return route.get(tier)
        for prefix, route in self.route_prefixes:
            if path.startswith(prefix):
                return route.get(tier)
        return self.plans.get(tier)

    def check_request(
        self, scope: Scope, ctx: UserExecutionContext
    ) -> Coroutine[Any, Any, list[tuple[bytes, bytes]]] | None:
        """The check of one request: None when its caller's tier has no rate there (nothing
        to count, nothing to await); else the :meth:`hit` to await, which returns the
        RateLimit headers for the answer, or raises :class:`RateLimitedError` (429) or, when
        the store is down and failing closed, :class:`ServiceUnavailableError` (503)."""
        if self.routed:
            plan = self.plan(scope.get("path", ""), ctx.tier)
        else:
            plan = self.plans.get(ctx.tier)
        if plan is None:
            return None
        return self.hit(self.caller_key(ctx, scope), plan, ctx)

    async def hit(self, caller: str, plan: Plan, ctx: UserExecutionContext) -> list[Any]:
        """Count one request of ``caller`` against ``plan``; the RateLimit headers, or raise."""
        suffixes = plan.suffixes
        keys = [caller + suffixes[0]] if len(suffixes) == 1 else [caller + s for s in suffixes]
        try:
            verdict = await self.store.hit(keys, plan.rates)
        except ServiceUnavailableError as exc:
            self._unavailable(exc)
            return []
        if self._outage:
            self._recovered()
        states = verdict.states
        if len(states) == 1:  # the common case: _state_header() written out
            remaining, reset_us = states[0]
            if remaining < 1:  # until the next request is admitted
                reset_us += plan.rates[0].interval_us - plan.rates[0].capacity_us
            state = plan.formats[0] % (remaining, -(-reset_us // 1_000_000))
            headers = [plan.policy, (b"ratelimit", state)]
        else:
            headers = [plan.policy, _state_header(plan, verdict)]
        if verdict.allowed:
            return headers
        retry_after = max(1, math.ceil(verdict.retry_after_us / 1_000_000))
        names = [r.name for r, s in zip(plan.rates, verdict.states, strict=True) if s[0] < 1]
        _audit(ctx, "rate", names, retry_after)
        raise RateLimitedError(
            f"The {ctx.tier.value} tier's rate limit is used up; retry in {retry_after} s.",
            retry_after=retry_after,
            headers=headers,
        )

    def quota_for(self, tier: Tier, name: str) -> Quota | None:
        """The quota ``name`` at ``tier`` (None: unlimited); a name the policy does not
        declare raises :class:`ConfigurationError`."""
        if name not in self.quota_names:
            raise ConfigurationError(
                f"the policy declares no quota {name!r}: add it to its tier_limits"
            )
        return self.quotas[tier][name]

    async def consume(
        self, ctx: UserExecutionContext, caller: str, name: str, amount: int
    ) -> QuotaUsage:
        """Consume ``amount`` of quota ``name`` for ``caller`` (whose context is ``ctx``);
        raises :class:`QuotaExceededError` (429) when it would pass the limit."""
        quota = self.quota_for(ctx.tier, name)
        if quota is None:
            return QuotaUsage(name, None, 0, None, None)
        now = self.store.clock()
        period, start, end = quota.bounds(now)
        try:
            verdict = await self.store.consume(
                f"{caller}|{name}|{period}", quota.limit, amount, end
            )
        except ServiceUnavailableError as exc:
            self._unavailable(exc)
            return QuotaUsage(name, quota.limit, 0, None, end)  # failing open: unmetered
        if self._outage:
            self._recovered()
        if verdict.allowed:
            return QuotaUsage(name, quota.limit, verdict.used, quota.limit - verdict.used, end)
        retry_after = max(1, math.ceil(end - now))
        headers = [
            (b"ratelimit-policy", f'"{name}";q={quota.limit};w={round(end - start)}'.encode()),
            (b"ratelimit", f'"{name}";r={quota.limit - verdict.used};t={retry_after}'.encode()),
        ]
        _audit(ctx, "quota", [name], retry_after)
        raise QuotaExceededError(
            f"The {ctx.tier.value} tier's {name} quota is used up for this {quota.period}.",
            retry_after=retry_after,
            headers=headers,
        )

    def _unavailable(self, exc: ServiceUnavailableError) -> None:
        """A check met the store unavailable: log (rate-limited), then raise the 503 when
        failing closed."""
        self._outage += 1
        now = time.monotonic()
        if self._outage == 1 or now - self._warned >= _WARN_EVERY:
            self._warned = now
            cause = type(exc.__cause__ or exc).__name__
            verdict = "letting requests through unmetered" if self.fail_open else "refusing"
            logger.warning(
                "rate limit store unavailable (%s); %s as configured (%d check(s) so far)",
                cause,
                verdict,
                self._outage,
            )
        if not self.fail_open:
            raise ServiceUnavailableError(
                "The rate limit service is temporarily unavailable.", retry_after=self.retry_after
            ) from None

    def _recovered(self) -> None:
        logger.warning("rate limit store answers again; %d check(s) met the outage", self._outage)
        self._outage = 0


def _state_header(plan: Plan, verdict: RateVerdict) -> tuple[bytes, bytes]:
    """The ``RateLimit`` field: each rate's ``r`` and ``t`` (see the module docstring): at
    ``r=0``, ``t`` is the time until the next request is admitted."""
    items = []
    for rate, fmt, (remaining, reset_us) in zip(
        plan.rates, plan.formats, verdict.states, strict=True
    ):
        if remaining < 1:
            reset_us += rate.interval_us - rate.capacity_us
        items.append(fmt % (remaining, -(-reset_us // 1_000_000)))
    return b"ratelimit", b",".join(items)


def _audit(ctx: UserExecutionContext, check: str, names: list[str], retry_after: int) -> None:
    audit_record(
        ctx,
        logging.WARNING,
        "rate limited (429): %(check)s %(required)s for user %(user_id)s; retry in "
        "%(retry_after)s s",
        audit_event="rate_limited",
        check=check,
        status=429,
        required=names,
        retry_after=retry_after,
    )


def _routes(
    table: Mapping[str, Mapping[Any, Any]], defaults: dict[Tier, Plan]
) -> tuple[dict[str, dict[Tier, Plan]], tuple[tuple[str, dict[Tier, Plan]], ...]]:
    """``route_limits`` compiled: exact paths, and prefixes (longest first), each with a plan
    per tier (its own for the tiers its table covers, the policy's for the others)."""
    if not isinstance(table, Mapping):
        raise ConfigurationError("route_limits must be a mapping of path to tier limits")
    exact: dict[str, dict[Tier, Plan]] = {}
    prefixes: list[tuple[str, dict[Tier, Plan]]] = []
    for path, limits in table.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError("route_limits paths must start with '/'")
        rates = compile_rate_table(f"route_limits[{path}]", limits)
        own = plans_for(path, rates)
        plans = {t: own[t] for t in Tier if t in own}
        plans.update({t: p for t, p in defaults.items() if t not in rates})
        if path.endswith("*"):
            prefixes.append((path[:-1], plans))
        else:
            exact[path] = plans
    prefixes.sort(key=lambda item: -len(item[0]))
    return exact, tuple(prefixes)
