"""Assembles the analytics service: its own database, the event consumers, the query routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from leaky_tokens.analytics.consumers import AnalyticsMetrics, start_consumers
from leaky_tokens.analytics.retention import Retention, RetentionConfig
from leaky_tokens.analytics.router import router
from leaky_tokens.analytics.service import AnalyticsService
from leaky_tokens.settings import Settings
from leaky_tokens.shared.app import build_service_app, exposure_of
from leaky_tokens.shared.authn import Authenticator
from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.events import event_ingest_router, finish_task
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.shared.pacing import Pacing

EVENTS_PATH = "/api/v1/analytics/events"


def create_analytics_app(
    settings: Settings, *, authenticator: Authenticator, clock: Clock | None = None
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.database_url("analytics")
        if settings.auto_migrate:
            await upgrade_database(url, "analytics")
        # Not inline: aggregate queries over long windows must not run on the event loop.
        database = Database(url, inline=False)
        the_clock = clock or SystemClock()
        service = AnalyticsService(database, the_clock, metrics)
        app.state.analytics_service = service
        app.state.authenticator = authenticator
        consumers = await start_consumers(settings, service, metrics)
        app.state.event_receiver = consumers.receiver
        app.state.consumers = consumers
        own = settings.analytics
        retention = Retention(
            database,
            the_clock,
            config=RetentionConfig(
                raw_retention_seconds=own.raw_retention_seconds,
                purchase_retention_seconds=own.purchase_retention_seconds,
                dead_letter_retention_seconds=own.dead_letter_retention_seconds,
                batch=own.retention_batch,
                every_seconds=own.retention_every_seconds,
                pacing=Pacing(
                    duty_cycle=own.retention_duty_cycle,
                    pause_seconds=own.retention_pause_seconds,
                    slow_batch_seconds=own.retention_slow_batch_seconds,
                ),
            ),
            metrics=metrics,
        )
        app.state.retention = retention
        sweeping = (
            asyncio.create_task(retention.run(), name="analytics-retention")
            if own.retention_enabled
            else None
        )
        try:
            yield
        finally:
            retention.request_stop()
            if sweeping is not None:
                await finish_task(sweeping, grace_seconds=10.0)
            await consumers.stop()
            aclose = getattr(authenticator, "aclose", None)
            if aclose is not None:
                await aclose()
            await database.dispose()

    app = build_service_app(
        "analytics",
        title="Leaky Tokens — analytics service",
        description="Usage events from the tokens outbox; usage, reports and anomalies.",
        routers=[router, event_ingest_router(EVENTS_PATH)],
        lifespan=lifespan,
        log_access=settings.access_log,
        clock=clock,
        exposure=exposure_of(settings),
    )
    metrics = AnalyticsMetrics(app.state.metrics.registry)
    return app
