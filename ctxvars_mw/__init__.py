"""ctxvars_mw: one immutable user context per request, in a ContextVar, for any ASGI app."""

from __future__ import annotations

from .auth.base import Authenticator, Connection, Identity
from .auth.introspection import OAuth2IntrospectionAuthenticator
from .auth.jwt import JWTAuthenticator
from .auth.redis_sessions import RedisSessionStore
from .auth.sessions import InMemorySessionStore, Session, SessionStore
from .context import UserExecutionContext
from .current import (
    bind,
    child_context,
    get_context,
    get_context_or_none,
    run_in_thread,
    use_context,
)
from .errors import (
    AuthenticationError,
    AuthenticationRequiredError,
    ConfigurationError,
    ContextNotSetError,
    CtxvarsError,
    ExpiredTokenError,
    HTTPError,
    InvalidContextError,
    InvalidRequestError,
    InvalidTokenError,
    MaxDepthExceededError,
    PermissionDeniedError,
    PermissionEscalationError,
    QuotaExceededError,
    RateLimitedError,
    ServiceUnavailableError,
)
from .executors import ContextThreadPoolExecutor
from .ids import IdRules, set_id_rules, use_id_rules
from .middleware import ContextMiddleware
from .permissions import (
    authorize,
    depends_authenticated,
    depends_feature,
    depends_permission,
    depends_role,
    depends_tier,
    requires_authenticated,
    requires_feature,
    requires_permission,
    requires_role,
    requires_tier,
)
from .policy import Policy
from .ratelimit.declarations import Quota, Rate
from .ratelimit.guards import consume, quota, rate_limit
from .ratelimit.limiter import Limiter
from .ratelimit.redis_store import RedisLimitStore
from .ratelimit.store import InMemoryLimitStore
from .resources import attach_resource, managed_context, resource_scope
from .tier import Tier

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "AuthenticationRequiredError",
    "Authenticator",
    "ConfigurationError",
    "Connection",
    "ContextMiddleware",
    "ContextNotSetError",
    "ContextThreadPoolExecutor",
    "CtxvarsError",
    "ExpiredTokenError",
    "HTTPError",
    "IdRules",
    "Identity",
    "InMemoryLimitStore",
    "InMemorySessionStore",
    "InvalidContextError",
    "InvalidRequestError",
    "InvalidTokenError",
    "JWTAuthenticator",
    "Limiter",
    "MaxDepthExceededError",
    "OAuth2IntrospectionAuthenticator",
    "PermissionDeniedError",
    "PermissionEscalationError",
    "Policy",
    "Quota",
    "QuotaExceededError",
    "Rate",
    "RateLimitedError",
    "RedisLimitStore",
    "RedisSessionStore",
    "ServiceUnavailableError",
    "Session",
    "SessionStore",
    "Tier",
    "UserExecutionContext",
    "attach_resource",
    "authorize",
    "bind",
    "child_context",
    "consume",
    "depends_authenticated",
    "depends_feature",
    "depends_permission",
    "depends_role",
    "depends_tier",
    "get_context",
    "get_context_or_none",
    "managed_context",
    "quota",
    "rate_limit",
    "requires_authenticated",
    "requires_feature",
    "requires_permission",
    "requires_role",
    "requires_tier",
    "resource_scope",
    "run_in_thread",
    "set_id_rules",
    "use_context",
    "use_id_rules",
]
