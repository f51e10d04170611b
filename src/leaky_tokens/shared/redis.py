"""The one way a service opens Redis: a pool that makes callers wait for a free connection
(the default pool raises once 100 are in use, which turned load into 503s)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis


def redis_client(url: str, *, max_connections: int = 64, wait_seconds: float = 5.0) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=wait_seconds
    )
    return Redis(connection_pool=pool)
