"""The outbox relay: publishes unpublished `token_outbox` rows, in id order and in batches, and
marks them published; retries with back-off; at-least-once across crashes of either side.

A row is marked published only after the transport took it, so a relay killed between the two
sends those rows again on restart; consumers deduplicate by event id. On PostgreSQL the batch is
claimed with `FOR UPDATE SKIP LOCKED` in the transaction that marks it, so replicas never send the
same rows at the same time. On SQLite the batch is read, sent and then marked in a short write
transaction (holding SQLite's one write lock across a network call would stall every consume);
one relay per database file runs at a time (a lock per Database in the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from leaky_tokens.settings import Settings
from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.events import (
    Event,
    EventPublisher,
    HttpPushPublisher,
    PublishFailed,
    RedisStreamPublisher,
    finish_task,
    resolve_internal_token,
)
from leaky_tokens.shared.redis import redis_client
from leaky_tokens.tokens.outbox_repository import OutboxRepository, OutboxRow

log = logging.getLogger("leaky_tokens.tokens.outbox")

ANALYTICS_EVENTS_PATH = "/api/v1/analytics/events"
_SQLITE_LOCKS: weakref.WeakKeyDictionary[Database, asyncio.Lock] = weakref.WeakKeyDictionary()


class OutboxMetrics:
    """The relay's figures in the token service's /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.backlog = Gauge(
            "tokens_outbox_backlog_events",
            "Outbox rows not yet published",
            registry=registry,
        )
        self.oldest_age = Gauge(
            "tokens_outbox_oldest_unpublished_age_seconds",
            "Age of the oldest unpublished outbox row (0 when none)",
            registry=registry,
        )
        self.published = Counter(
            "tokens_outbox_published_events",
            "Outbox rows published",
            ["stream"],
            registry=registry,
        )
        self.failures = Counter(
            "tokens_outbox_publish_failures",
            "Batches the transport did not take (retried)",
            registry=registry,
        )
        self.purged = Counter(
            "tokens_outbox_purged_events",
            "Published outbox rows purged by the sweeper (older than the retention)",
            registry=registry,
        )
        self.purge_batches = Counter(
            "tokens_outbox_purge_batches",
            "DELETE statements the sweeper ran (each at most events.outbox_sweep_batch rows)",
            registry=registry,
        )


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, OutboxMetrics] = weakref.WeakKeyDictionary()


def outbox_metrics(registry: CollectorRegistry) -> OutboxMetrics:
    """One set per registry (an app's lifespan may run more than once)."""
    found = _METRICS.get(registry)
    if found is None:
        found = _METRICS[registry] = OutboxMetrics(registry)
    return found


def event_of(row: OutboxRow) -> Event:
    return Event.model_construct(
        event_id=row.event_id,
        stream=row.stream,
        type=row.event_type,
        aggregate_id=row.aggregate_id,
        occurred_at=row.created_at,
        payload=row.payload,
    )


@dataclass(frozen=True, slots=True)
class RelayConfig:
    batch_size: int = 200
    poll_seconds: float = 0.025
    min_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 30.0
    metrics_every_seconds: float = 1.0


class OutboxRelay:
    def __init__(
        self,
        database: Database,
        publisher: EventPublisher,
        *,
        config: RelayConfig | None = None,
        clock: Clock | None = None,
        metrics: OutboxMetrics | None = None,
    ) -> None:
        self.db = database
        self.publisher = publisher
        self.config = config or RelayConfig()
        self.clock = clock or SystemClock()
        self.metrics = metrics
        self._lock_rows = not database.is_sqlite
        self._stopping = asyncio.Event()

    def request_stop(self) -> None:
        """`run` returns after the batch in flight (see RunningRelay.stop)."""
        self._stopping.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def relay_once(self) -> int:
        """Publish one batch of the oldest unpublished rows; returns how many were published.
        Raises PublishFailed (nothing marked) when the transport did not take them."""
        if self._lock_rows:
            async with self.db.transaction() as session:
                repo = OutboxRepository(session)
                rows = await repo.unpublished(self.config.batch_size, lock=True)
                if rows:
                    await self._publish(rows)
                    await repo.mark_published([r.id for r in rows], self.clock.now())
        else:
            lock = _SQLITE_LOCKS.setdefault(self.db, asyncio.Lock())
            async with lock:
                async with self.db.read() as session:
                    rows = await OutboxRepository(session).unpublished(
                        self.config.batch_size, lock=False
                    )
                if rows:
                    await self._publish(rows)
                    async with self.db.transaction() as session:
                        await OutboxRepository(session).mark_published(
                            [r.id for r in rows], self.clock.now()
                        )
        if rows and self.metrics is not None:
            for stream in {r.stream for r in rows}:
                self.metrics.published.labels(stream).inc(sum(r.stream == stream for r in rows))
        return len(rows)

    async def _publish(self, rows: Sequence[OutboxRow]) -> None:
        try:
            await self.publisher.publish([event_of(r) for r in rows])
        except PublishFailed:
            if self.metrics is not None:
                self.metrics.failures.inc()
            raise

    async def run(self) -> None:
        """Relay until stopped: full batches back to back, an idle poll when caught up,
        exponential back-off with jitter while the transport or the database fails."""
        failures = 0
        while not self._stopping.is_set():
            try:
                published = await self.relay_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                pause = min(
                    self.config.max_backoff_seconds,
                    self.config.min_backoff_seconds * 2 ** min(failures - 1, 20),
                )
                pause *= random.uniform(0.5, 1.0)  # replicas don't retry in step
                if failures == 1 or failures % 50 == 0:
                    log.warning(
                        "outbox relay: %s (failure %d in a row); retrying in %.2fs",
                        exc if isinstance(exc, PublishFailed) else f"{type(exc).__name__}: {exc}",
                        failures,
                        pause,
                    )
                await self._pause(pause)
                continue
            if failures:
                log.info("outbox relay recovered after %d failed attempts", failures)
                failures = 0
            if published < self.config.batch_size:
                await self._pause(self.config.poll_seconds)

    async def refresh_metrics(self) -> None:
        if self.metrics is None:
            return
        async with self.db.read() as session:
            backlog = await OutboxRepository(session).backlog()
        self.metrics.backlog.set(backlog.unpublished)
        self.metrics.oldest_age.set(_age_seconds(backlog.oldest_created_at, self.clock.now()))

    async def watch_backlog(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.refresh_metrics()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("outbox backlog query failed", exc_info=True)
            await self._pause(self.config.metrics_every_seconds)


def _age_seconds(oldest: datetime | None, now: datetime) -> float:
    if oldest is None:
        return 0.0
    return max(0.0, (now - oldest).total_seconds())


class RunningRelay:
    """A relay and its metrics watcher running in a service's lifespan."""

    def __init__(
        self,
        relay: OutboxRelay,
        tasks: list[asyncio.Task[None]],
        closers: list[object],
        grace_seconds: float,
    ) -> None:
        self.relay = relay
        self._tasks = tasks
        self._closers = closers
        self._grace = grace_seconds

    async def stop(self) -> None:
        """Let the batch in flight finish (bounded by the publish timeout), then stop: a batch
        cut off mid-send is simply sent again by the next relay."""
        self.relay.request_stop()
        for task in self._tasks:
            await finish_task(task, grace_seconds=self._grace)
        for closer in self._closers:
            aclose = getattr(closer, "aclose", None)
            if aclose is not None:
                await aclose()


def publisher_from_settings(settings: Settings) -> tuple[EventPublisher, list[object]]:
    """The transport the settings pick (see Settings.event_transport); returns what to close."""
    events = settings.events
    if settings.event_transport() == "redis":
        redis = redis_client(
            settings.redis_url,
            connect_timeout_seconds=settings.redis.connect_timeout_seconds,
            command_timeout_seconds=min(
                events.publish_timeout_seconds, max(1.0, settings.redis.command_timeout_seconds)
            ),
            max_connections=4,
        )
        publisher = RedisStreamPublisher(
            redis, prefix=events.stream_prefix, maxlen=events.stream_maxlen
        )
        return publisher, [publisher, redis]
    token = resolve_internal_token(settings.internal_token, settings.data_dir)
    http = HttpPushPublisher.over_aiohttp(
        settings.url_of("analytics") + ANALYTICS_EVENTS_PATH,
        token,
        timeout_seconds=events.publish_timeout_seconds,
    )
    return http, [http]


async def start_outbox_relay(
    settings: Settings,
    database: Database,
    registry: CollectorRegistry,
    *,
    clock: Clock | None = None,
) -> RunningRelay:
    """Start the relay (unless events.relay_enabled is off) and the backlog metrics."""
    metrics = outbox_metrics(registry)
    events = settings.events
    if not events.relay_enabled:
        idle = OutboxRelay(database, _NoPublisher(), clock=clock, metrics=metrics)
        return RunningRelay(idle, [asyncio.create_task(idle.watch_backlog())], [], 2.0)
    publisher, closers = publisher_from_settings(settings)
    relay = OutboxRelay(
        database,
        publisher,
        config=RelayConfig(
            batch_size=events.relay_batch_size,
            poll_seconds=events.relay_poll_seconds,
            max_backoff_seconds=events.relay_max_backoff_seconds,
        ),
        clock=clock,
        metrics=metrics,
    )
    tasks = [
        asyncio.create_task(relay.run(), name="outbox-relay"),
        asyncio.create_task(relay.watch_backlog(), name="outbox-backlog"),
    ]
    return RunningRelay(relay, tasks, closers, events.publish_timeout_seconds + 2.0)


class _NoPublisher:
    async def publish(self, batch: Sequence[Event]) -> None:
        raise PublishFailed("the outbox relay is disabled (events.relay_enabled=false)")

    async def aclose(self) -> None:
        return None
