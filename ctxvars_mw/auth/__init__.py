"""Authentication: the authenticator protocol, JWT and OAuth2 introspection, sessions."""

from __future__ import annotations

from .base import Authenticator, Connection, Headers, Identity
from .discovery import DiscoveryError, ProviderMetadata
from .introspection import OAuth2IntrospectionAuthenticator
from .jwt import JWTAuthenticator
from .redis_sessions import RedisSessionStore
from .sessions import InMemorySessionStore, Session, SessionStore

__all__ = [
    "Authenticator",
    "Connection",
    "DiscoveryError",
    "Headers",
    "Identity",
    "InMemorySessionStore",
    "JWTAuthenticator",
    "OAuth2IntrospectionAuthenticator",
    "ProviderMetadata",
    "RedisSessionStore",
    "Session",
    "SessionStore",
]
