"""The redis-py asyncio client of a store that takes ``url_or_client``, made one way.

redis-py is imported here only when a store is constructed, never with ``ctxvars_mw``.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigurationError

__all__ = ["redis_client", "redis_errors"]


def redis_client(
    url_or_client: Any, *, timeout: float, max_connections: int | None = None
) -> tuple[Any, bool]:
    """``(client, owned)``: for a ``redis://`` URL a new client (owned: the store closes it)
    with ``timeout`` seconds for connecting and for each command and one immediate retry on a
    connection error (a pooled connection that died with a Redis restart is reconnected on
    its next command; timeouts are not retried), over a pool of at most ``max_connections``
    that a burst waits on when that is given; a ``redis.asyncio.Redis`` is used as it is.
    Anything else raises :class:`ConfigurationError`."""
    import redis.asyncio as redis_asyncio
    from redis.exceptions import ConnectionError as RedisConnectionError

    if isinstance(url_or_client, redis_asyncio.Redis):
        return url_or_client, False
    if not isinstance(url_or_client, str):
        raise ConfigurationError("url_or_client must be a redis:// URL or a redis.asyncio.Redis")
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry_on_error": [RedisConnectionError],
    }
    try:
        if max_connections is None:
            return redis_asyncio.Redis.from_url(url_or_client, **options), True
        pool: Any = redis_asyncio.BlockingConnectionPool.from_url(
            url_or_client,
            max_connections=max_connections,
            timeout=timeout,  # waiting for a free connection counts against the bound
            **options,
        )
    except ValueError as exc:
        raise ConfigurationError("url_or_client is not a valid Redis URL") from exc
    return redis_asyncio.Redis(connection_pool=pool), True


def redis_errors() -> tuple[type[Exception], ...]:
    """What a failed Redis command raises: redis-py's errors, socket errors and timeouts."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)
