"""Compiled authorization checks and the audit record of every denial.

A :class:`Requirement` is built once (when a ``requires_*`` decorator or ``depends_*``
factory is called) and its :meth:`~Requirement.enforce` runs per call: one ContextVar read,
one ``is_authenticated`` test, one set operation. Misuse raises :class:`ConfigurationError`
at construction.

Each denial emits one record on the ``ctxvars_mw.audit`` logger (INFO for 401, WARNING for
403) with the attributes ``audit_event``, ``check``, ``match``, ``status``, ``required``,
``held``, the fields of :data:`ctxvars_mw.logging.CONTEXT_FIELDS` (``user_id``,
``request_id``, ``parent_request_id``, ``correlation_id``, ``tier``, ``operation_depth``) and
those of :data:`~ctxvars_mw.request_metadata.REQUEST_METADATA_FIELDS` (``client_ip``,
``user_agent``, ``method``, ``path``, as the middleware sanitised them; ``"-"`` when the
context holds none) — ids, names and the request's own description, never a token, claim or
secret.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

from .context import UserExecutionContext
from .current import get_context_or_none
from .errors import AuthenticationRequiredError, ConfigurationError, PermissionDeniedError
from .logging import CONTEXT_FIELDS, REQUEST_METADATA_FIELDS
from .policy import check_name, check_permission
from .tier import Tier

__all__ = [
    "Requirement",
    "all_of",
    "anonymous_error",
    "audit_denial",
    "audit_record",
    "authenticated_requirement",
    "feature_requirement",
    "permission_requirement",
    "role_requirement",
    "tier_requirement",
]

audit_logger = logging.getLogger("ctxvars_mw.audit")
_get = get_context_or_none


class Requirement:
    """One authorization check, compiled at construction; :meth:`enforce` runs it.

    ``kind`` is ``"authenticated"``, ``"tier"``, ``"role"``, ``"permission"`` or ``"feature"``;
    ``required`` the names asked for (in the order given); ``any_`` whether one is enough;
    ``test`` the per-context test (None when being authenticated is enough).
    """

    __slots__ = ("_held", "any_", "description", "kind", "required", "test")

    def __init__(
        self,
        kind: str,
        required: tuple[str, ...],
        any_: bool,
        allowed: Callable[[UserExecutionContext], bool] | None,
        held: Callable[[UserExecutionContext], list[str]],
        description: str,
    ) -> None:
        self.kind = kind
        self.required = required
        self.any_ = any_
        self.description = description
        self.test = allowed
        self._held = held

    def enforce(self) -> UserExecutionContext:
        """The current context if it passes; else raise (401 anonymous, 403 lacking)."""
        ctx = _get()
        if ctx is None or not ctx.is_authenticated:
            raise anonymous_error(self.kind, self.required, self.any_, ctx)
        allowed = self.test
        if allowed is not None and not allowed(ctx):
            self.deny(ctx)
        return ctx

    def deny(self, ctx: UserExecutionContext) -> NoReturn:
        """Audit and raise the 403 for ``ctx``, which failed this check."""
        audit_denial(ctx, 403, self.kind, self.required, self.any_, self._held(ctx))
        raise PermissionDeniedError(self.description, required=self.required)

    def __repr__(self) -> str:
        match = "any" if self.any_ else "all"
        return f"Requirement({self.kind}, {match} of {list(self.required)})"


# -- compiling requirements ---------------------------------------------------------------


def _unique(fn_name: str, what: str, names: tuple[object, ...], check: Any) -> tuple[str, ...]:
    if not names:
        raise ConfigurationError(f"{fn_name}() needs at least one {what}")
    if any(callable(n) for n in names):
        raise ConfigurationError(f"{fn_name}() takes {what}s: write @{fn_name}(...), with names")
    return tuple(dict.fromkeys(check(f"{fn_name}() {what}s", n) for n in names))


def _check_any(fn_name: str, any_: object) -> bool:
    if not isinstance(any_, bool):
        raise ConfigurationError(f"{fn_name}(any_=...) must be a bool")
    return any_


def _sorted(attr: str) -> Callable[[UserExecutionContext], list[str]]:
    return lambda ctx: sorted(getattr(ctx, attr))


def _set_check(attr: str, names: frozenset[str], any_: bool) -> Callable[[Any], bool]:
    # Plain lambdas per attribute: the per-call test is one attribute read and one set op.
    if attr == "roles":
        if any_:
            return lambda ctx: not names.isdisjoint(ctx.roles)
        return lambda ctx: names <= ctx.roles
    if any_:
        return lambda ctx: not names.isdisjoint(ctx.features)
    return lambda ctx: names <= ctx.features


def _permission_check(names: frozenset[str], any_: bool) -> Callable[[Any], bool]:
    """Exact names first (one set operation); wildcards held (``agents:*``, ``*``) after."""
    if any_:

        def allowed_any(ctx: UserExecutionContext) -> bool:
            if not names.isdisjoint(ctx.permissions):
                return True
            return any(map(ctx.has_permission, names))

        return allowed_any

    def allowed_all(ctx: UserExecutionContext) -> bool:
        if names <= ctx.permissions:
            return True
        return all(map(ctx.has_permission, names))

    return allowed_all


def _words(any_: bool, kind: str, names: tuple[str, ...]) -> str:
    """The client-safe description of a check: only the names the developer wrote."""
    if len(names) == 1:
        return f"This requires the {kind} {names[0]}."
    lead = "one of" if any_ else "all of"
    return f"This requires {lead} the {kind}s: {', '.join(names)}."


def authenticated_requirement() -> Requirement:
    """The check behind :func:`requires_authenticated`."""
    return Requirement("authenticated", (), False, None, lambda ctx: [], "")


def tier_requirement(tier: Tier | str) -> Requirement:
    """The check behind :func:`requires_tier`: the context's tier is ``tier`` or above."""
    try:
        minimum = Tier.parse(tier)
    except ValueError:
        raise ConfigurationError(
            "requires_tier() takes a Tier or one of: " + ", ".join(t.value for t in Tier)
        ) from None
    allowed = frozenset(t for t in Tier if t >= minimum)
    return Requirement(
        "tier",
        (minimum.value,),
        False,
        lambda ctx: ctx.tier in allowed,
        lambda ctx: [ctx.tier.value],
        f"This requires the {minimum.value} tier or above.",
    )


def role_requirement(*roles: str, any_: bool = False) -> Requirement:
    """The check behind :func:`requires_role`."""
    any_ = _check_any("requires_role", any_)
    names = _unique("requires_role", "role", roles, check_name)
    check = _set_check("roles", frozenset(names), any_)
    return Requirement("role", names, any_, check, _sorted("roles"), _words(any_, "role", names))


def permission_requirement(*permissions: str, any_: bool = False) -> Requirement:
    """The check behind :func:`requires_permission` (held wildcards count)."""
    any_ = _check_any("requires_permission", any_)
    names = _unique("requires_permission", "permission", permissions, check_permission)
    check = _permission_check(frozenset(names), any_)
    words = _words(any_, "permission", names)
    return Requirement("permission", names, any_, check, _sorted("permissions"), words)


def feature_requirement(*features: str, any_: bool = False) -> Requirement:
    """The check behind :func:`requires_feature`."""
    any_ = _check_any("requires_feature", any_)
    names = _unique("requires_feature", "feature", features, check_name)
    check = _set_check("features", frozenset(names), any_)
    words = _words(any_, "feature", names)
    return Requirement("feature", names, any_, check, _sorted("features"), words)


def all_of(requirements: tuple[Requirement, ...]) -> Callable[[], UserExecutionContext]:
    """One check for stacked decorators: one context read, then each test, outermost first."""
    first = requirements[0]
    tests = tuple((r, r.test) for r in requirements if r.test is not None)

    def enforce() -> UserExecutionContext:
        ctx = _get()
        if ctx is None or not ctx.is_authenticated:
            raise anonymous_error(first.kind, first.required, first.any_, ctx)
        for requirement, allowed in tests:
            if not allowed(ctx):
                requirement.deny(ctx)
        return ctx

    return enforce


def anonymous_error(
    kind: str, required: tuple[str, ...], any_: bool, ctx: UserExecutionContext | None
) -> AuthenticationRequiredError:
    """Audit a denial for want of authentication and return the 401 error to raise."""
    audit_denial(ctx, 401, kind, required, any_, [])
    return AuthenticationRequiredError()


def audit_denial(
    ctx: UserExecutionContext | None,
    status: int,
    kind: str,
    required: tuple[str, ...],
    any_: bool,
    held: list[str],
) -> None:
    """Emit the one audit record of a denial: ids and names only, never a credential."""
    level = logging.INFO if status == 401 else logging.WARNING
    audit_record(
        ctx,
        level,
        "authorization denied (%(status)s): %(check)s for user %(user_id)s; required %(required)s",
        audit_event="authorization_denied",
        check=kind,
        match="any" if any_ else "all",
        status=status,
        required=list(required),
        held=held,
    )


def audit_record(
    ctx: UserExecutionContext | None,
    level: int,
    message: str,
    **fields: Any,
) -> None:
    """Emit one record on the audit logger: the context's ids and ``fields`` as attributes,
    and ``message`` formatted with them (``%(user_id)s``, ``%(status)s``, ...).

    The record is built first and the context's ids are set on it afterwards, never
    passed through ``extra=``: logging refuses an ``extra`` key the record already has, and
    :func:`ctxvars_mw.logging.install_record_factory` puts exactly those names on every record.
    """
    if not audit_logger.isEnabledFor(level):
        return
    ids = _audit_ids(ctx)
    fn, lno, func, _ = audit_logger.findCaller(stacklevel=3)
    record = audit_logger.makeRecord(
        audit_logger.name,
        level,
        fn,
        lno,
        message,
        ({**ids, **fields},),
        None,
        func,
    )
    record.__dict__.update(ids)
    record.__dict__.update(fields)
    audit_logger.handle(record)


def _audit_ids(ctx: UserExecutionContext | None) -> dict[str, Any]:
    """The ids and request metadata of the denied context (dashes when there is none)."""
    if ctx is None:
        return dict.fromkeys(CONTEXT_FIELDS + REQUEST_METADATA_FIELDS, "-")
    return {
        "user_id": ctx.user_id,
        "request_id": ctx.request_id,
        "parent_request_id": ctx.parent_request_id or "-",
        "correlation_id": ctx.correlation_id,
        "tier": ctx.tier.value,
        "operation_depth": ctx.operation_depth,
        "client_ip": ctx.client_ip or "-",
        "user_agent": ctx.user_agent or "-",
        "method": ctx.method or "-",
        "path": ctx.path or "-",
    }
