"""The one way a service opens Redis (redis-py's asyncio client, with hiredis when installed),
and `RedisGuard`, which keeps a Redis that refuses or hangs from stalling requests.

Every connection gives up after the configured connect and command timeouts, and waiting for a
free pooled connection is bounded the same way, so no call waits on Redis longer than about one
timeout. A refused or reset connection is retried once at once on a fresh connection (a Redis
that restarted leaves every pooled connection dead; without this the first call on each would
fail after Redis is back); a timeout is never retried.

`RedisGuard` runs calls for one component (rate limits, buckets, the login throttle): after a
failure it fails fast for `fail_fast_seconds` (nothing waits on a Redis known to be down), then
lets one call through as a probe while the others still fail fast, and closes the pool's idle
connections, so recovery needs no restart and costs at most one timeout per interval. What a
failure means (fall back to per-process state, or answer 503) is the component's choice;
`redis_fallback_decisions_total{component}` counts decisions made without Redis.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from leaky_tokens.shared.errors import ServiceUnavailable

if TYPE_CHECKING:
    from leaky_tokens.settings import RedisSettings

log = logging.getLogger("leaky_tokens.redis")

T = TypeVar("T")
OnFailure = Literal["fallback", "closed"]


class RedisUnavailable(ServiceUnavailable):
    """Redis did not answer in time (or is known to be down) and the component fails closed.
    A 503 that marks the service's own unavailability (see ARCHITECTURE.md, contract 16)."""

    code = "REDIS_UNAVAILABLE"
    default_message = "a shared store (Redis) is unavailable; retry shortly"
    outage = True

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


def redis_client(
    url: str,
    *,
    connect_timeout_seconds: float = 0.5,
    command_timeout_seconds: float = 0.5,
    max_connections: int = 64,
) -> Redis:
    """A client whose every call is bounded: connecting, each command, and the wait for a free
    connection. Blocking commands (XREADGROUP BLOCK) must block for less than the command
    timeout."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=command_timeout_seconds,
        socket_timeout=command_timeout_seconds,
        socket_connect_timeout=connect_timeout_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    # from_pool: the client owns the pool, so `aclose()` closes its connections too
    # (`Redis(connection_pool=...)` leaves them open: one leaked socket per pooled connection).
    return Redis.from_pool(pool)


def is_redis_failure(exc: BaseException) -> bool:
    return isinstance(exc, RedisError | OSError | TimeoutError)


class RedisMetrics:
    """Made once per metrics registry (`RedisMetrics.of`)."""

    _made: weakref.WeakKeyDictionary[CollectorRegistry, RedisMetrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.fallbacks = Counter(
            "redis_fallback_decisions",
            "Decisions made without Redis (per-process state, or refused) because it failed",
            ["component", "mode"],
            registry=registry,
        )

    @classmethod
    def of(cls, registry: CollectorRegistry) -> RedisMetrics:
        found = cls._made.get(registry)
        if found is None:
            found = cls._made[registry] = cls(registry)
        return found


class RedisGuard:
    """Runs one component's Redis calls; see the module docstring."""

    def __init__(
        self,
        client: Redis,
        component: str,
        *,
        fail_fast_seconds: float = 1.0,
        on_failure: OnFailure = "fallback",
        metrics: RedisMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.component = component
        self.on_failure: OnFailure = on_failure
        self._fail_fast = fail_fast_seconds
        self._metrics = metrics
        self._monotonic = monotonic
        self._down_until = 0.0  # fail fast until then (monotonic); 0: healthy
        self._failing = False
        self._probing = False

    @property
    def failing(self) -> bool:
        return self._failing

    async def run(self, call: Callable[[Redis], Awaitable[T]]) -> T:
        """`call(client)`, or RedisUnavailable at once while Redis is known to be down."""
        probe = False
        if self._failing:
            if self._probing or self._monotonic() < self._down_until:
                raise RedisUnavailable()
            self._probing = probe = True
        try:
            result = await call(self.client)
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            await self._failed(exc)
            raise RedisUnavailable() from exc
        finally:
            if probe:
                self._probing = False
        if self._failing:
            self._failing = False
            self._down_until = 0.0
            log.warning("redis is back for %s", self.component)
        return result

    def count_fallback(self) -> None:
        if self._metrics is not None:
            self._metrics.fallbacks.labels(self.component, self.on_failure).inc()

    async def _failed(self, exc: BaseException) -> None:
        self._down_until = self._monotonic() + self._fail_fast
        if not self._failing:
            self._failing = True
            what = "per-process state" if self.on_failure == "fallback" else "refusing (503)"
            log.warning(
                "redis failed for %s (%s: %s); %s until it answers again",
                self.component,
                type(exc).__name__,
                exc,
                what,
            )
        # Connections opened before Redis went away are dead; the next probe starts afresh.
        # (Best effort: they are being given up anyway.)
        with contextlib.suppress(Exception):
            await self.client.connection_pool.disconnect(inuse_connections=False)


def redis_from_settings(url: str, settings: RedisSettings) -> Redis:
    return redis_client(
        url,
        connect_timeout_seconds=settings.connect_timeout_seconds,
        command_timeout_seconds=settings.command_timeout_seconds,
        max_connections=settings.max_connections,
    )


def guard_from_settings(
    client: Redis, component: str, settings: RedisSettings, metrics: RedisMetrics | None
) -> RedisGuard:
    return RedisGuard(
        client,
        component,
        fail_fast_seconds=settings.fail_fast_seconds,
        on_failure=settings.on_failure,
        metrics=metrics,
    )
