"""Where analytics takes its events from, and the figures it reports about them.

HTTP push is always open to holders of the internal token (the embedded default, and a way in
for any producer); Redis Streams is added when the settings pick it (REDIS_URL set, or
events.transport = "redis")."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio import Redis

from leaky_tokens.analytics.service import PURCHASE, USAGE, AnalyticsService, IngestObserver
from leaky_tokens.settings import Settings
from leaky_tokens.shared.events import (
    EventConsumer,
    HttpPushConsumer,
    RedisStreamConsumer,
    finish_task,
    resolve_internal_token,
)
from leaky_tokens.shared.redis import redis_client

_BLOCK_SECONDS = 1.0  # how long one XREADGROUP waits for new entries

log = logging.getLogger("leaky_tokens.analytics")

STREAMS = (USAGE, PURCHASE)


class AnalyticsMetrics(IngestObserver):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "analytics_events_received", "Events received", ["stream"], registry=registry
        )
        self.stored = Counter(
            "analytics_events_stored",
            "Events stored (first delivery)",
            ["stream"],
            registry=registry,
        )
        self.rejected = Counter(
            "analytics_events_rejected",
            "Events dropped as unreadable",
            ["stream"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "analytics_events_dead_lettered",
            "Events kept in event_dead_letter instead of being counted, by reason: invalid "
            "(unreadable payload), failed (refused by the database), late (before the "
            "rolled-up horizon)",
            ["stream", "reason"],
            registry=registry,
        )
        self.rolled_up = Counter(
            "analytics_rollup_events",
            "Raw usage events summed into per-minute rollups and deleted (retention)",
            registry=registry,
        )
        self.rollup_batches = Counter(
            "analytics_rollup_batches",
            "Roll-up transactions (each bounded by analytics.retention_batch raw events)",
            registry=registry,
        )
        self.purchases_purged = Counter(
            "analytics_purchase_events_purged",
            "Purchase events deleted past analytics.purchase_retention_seconds",
            registry=registry,
        )
        self.horizon = Gauge(
            "analytics_rollup_horizon_timestamp_seconds",
            "Raw usage events before this instant live in rollups only (0: none rolled up)",
            registry=registry,
        )
        self.lag = Gauge(
            "analytics_consumer_lag_events",
            "Events the transport holds that analytics has not stored yet (Redis Streams: "
            "undelivered + pending; HTTP push holds none, see tokens_outbox_backlog_events)",
            ["stream"],
            registry=registry,
        )
        self._delay = Histogram(
            "analytics_event_delay_seconds",
            "From the event's creation in the outbox to its arrival here",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )

    def batch(self, stream: str, received: int, stored: int, rejected: int) -> None:
        if received:
            self.received.labels(stream).inc(received)
        if stored:
            self.stored.labels(stream).inc(stored)
        if rejected:
            self.rejected.labels(stream).inc(rejected)

    def delay(self, seconds: float) -> None:
        self._delay.observe(seconds)

    def dead_lettered(self, stream: str, reason: str, count: int) -> None:
        self.dead_letters.labels(stream, reason).inc(count)


class RunningConsumers:
    def __init__(
        self,
        receiver: HttpPushConsumer,
        consumers: list[EventConsumer],
        redis: Redis | None,
        metrics: AnalyticsMetrics,
        lag_every_seconds: float = 1.0,
    ) -> None:
        self.receiver = receiver
        self.consumers = consumers
        self._redis = redis
        self._metrics = metrics
        self._lag_every = lag_every_seconds
        self._stopping = asyncio.Event()
        self._lag_task = asyncio.create_task(self._watch_lag(), name="analytics-lag")

    @property
    def transports(self) -> tuple[str, ...]:
        return ("http", "redis") if self._redis is not None else ("http",)

    async def lag(self) -> dict[str, int]:
        """Per stream name (usage, purchase): events held in transit, over every transport."""
        found: dict[str, int] = {}
        for consumer in self.consumers:
            for key, lag in (await consumer.lag()).items():
                stream = key.rsplit(":", 1)[-1]
                found[stream] = found.get(stream, 0) + lag
        return found

    async def _watch_lag(self) -> None:
        while not self._stopping.is_set():
            try:
                for stream, lag in (await self.lag()).items():
                    self._metrics.lag.labels(stream).set(lag)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("consumer lag query failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._lag_every)

    async def stop(self) -> None:
        self._stopping.set()  # not cancelled mid-command (see RedisStreamConsumer.stop)
        await finish_task(self._lag_task, grace_seconds=5.0)
        for consumer in reversed(self.consumers):
            await consumer.stop()
        if self._redis is not None:
            # The client was built on a pool of its own (shared/redis.py): close it too, or its
            # sockets outlive the service (a ResourceWarning at the next garbage collection).
            await self._redis.aclose(close_connection_pool=True)


async def start_consumers(
    settings: Settings, service: AnalyticsService, metrics: AnalyticsMetrics
) -> RunningConsumers:
    receiver = HttpPushConsumer(resolve_internal_token(settings.internal_token, settings.data_dir))
    await receiver.start(service.store_events)
    consumers: list[EventConsumer] = [receiver]
    redis: Redis | None = None
    if settings.event_transport() == "redis":
        events = settings.events
        # Reads block for 1 s at most; a command timeout past that is a Redis in trouble.
        redis = redis_client(
            settings.redis_url,
            connect_timeout_seconds=settings.redis.connect_timeout_seconds,
            command_timeout_seconds=_BLOCK_SECONDS + settings.redis.command_timeout_seconds,
            max_connections=8,
        )
        stream_consumer = RedisStreamConsumer(
            redis,
            streams=STREAMS,
            prefix=events.stream_prefix,
            group=events.consumer_group,
            reclaim_idle_seconds=events.reclaim_idle_seconds,
            block_ms=int(_BLOCK_SECONDS * 1000),
        )
        try:
            await stream_consumer.start(service.store_events)
        except BaseException:
            await redis.aclose(close_connection_pool=True)
            raise
        consumers.append(stream_consumer)
    return RunningConsumers(receiver, consumers, redis, metrics)
