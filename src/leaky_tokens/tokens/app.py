"""Assembles the token service: database, leaky buckets (memory or Redis), provider client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from leaky_tokens.settings import PROVIDERS, Settings, TokensSettings
from leaky_tokens.shared.app import build_service_app, exposure_of
from leaky_tokens.shared.authn import Authenticator
from leaky_tokens.shared.circuit_breaker import BreakerConfig
from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.events import resolve_internal_token
from leaky_tokens.shared.http import face_of
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.shared.pacing import Pacing
from leaky_tokens.shared.redis import RedisMetrics, guard_from_settings, redis_from_settings
from leaky_tokens.shared.tokenizer import preload
from leaky_tokens.tokens.flags import FeatureFlags
from leaky_tokens.tokens.idempotency import IdempotencyKeys
from leaky_tokens.tokens.inference.adapters import (
    ProviderHttp,
    build_adapters,
    endpoints_from_settings,
)
from leaky_tokens.tokens.inference.catalogue import Catalogue
from leaky_tokens.tokens.inference.embeddings import EmbeddingAdapters, EmbeddingService
from leaky_tokens.tokens.inference.embeddings_router import router as embeddings_router
from leaky_tokens.tokens.inference.responses import ResponsesService
from leaky_tokens.tokens.inference.responses_router import router as responses_router
from leaky_tokens.tokens.inference.router import router as inference_router
from leaky_tokens.tokens.inference.service import InferenceService
from leaky_tokens.tokens.leaky_bucket import LeakyBucketStore, MemoryLeakyBucket
from leaky_tokens.tokens.leaky_bucket_redis import RedisLeakyBucket
from leaky_tokens.tokens.outbox_relay import outbox_metrics, start_outbox_relay
from leaky_tokens.tokens.outbox_sweeper import OutboxSweeper, SweeperConfig
from leaky_tokens.tokens.payments import StubPaymentGateway
from leaky_tokens.tokens.provider_client import ProviderClient, ProviderSettings
from leaky_tokens.tokens.purchase_saga import PurchaseService, SagaOrchestrator, StepObserver
from leaky_tokens.tokens.router import internal_router, router
from leaky_tokens.tokens.service import TokenService
from leaky_tokens.tokens.session_router import router as session_router
from leaky_tokens.tokens.sessions import AgentSessionService

log = logging.getLogger("leaky_tokens.tokens")


def provider_settings(t: TokensSettings) -> ProviderSettings:
    return ProviderSettings(
        timeout_seconds=t.provider_timeout_seconds,
        attempts=t.provider_attempts,
        max_concurrent=t.provider_max_concurrent,
        breaker=BreakerConfig(
            window_size=t.breaker_window_size,
            minimum_calls=t.breaker_minimum_calls,
            failure_rate_threshold=t.breaker_failure_rate,
            open_seconds=t.breaker_open_seconds,
        ),
    )


async def _sweep_forever(service: TokenService, interval: float) -> None:
    while True:
        try:
            swept = await service.sweep_expired_reservations()
            if swept:
                log.warning("refunded %d abandoned reservations", swept)
        except Exception:
            log.exception("reservation sweep failed")
        await asyncio.sleep(interval)


async def _sweep_sessions_forever(service: AgentSessionService, interval: float) -> None:
    """Agent sessions past their lifetime end (their budget goes back), and tokens settled
    into ended sessions' pools go back too (issue 13)."""
    while True:
        try:
            expired, late = await service.sweep()
            if expired or late:
                log.info("agent sessions: %d expired, %d late returns", expired, late)
        except Exception:
            log.exception("agent session sweep failed")
        await asyncio.sleep(interval)


def create_tokens_app(
    settings: Settings,
    *,
    authenticator: Authenticator,
    clock: Clock | None = None,
    saga_step_committed: StepObserver | None = None,
) -> FastAPI:
    """`saga_step_committed` observes each committed saga step (the crash tests' fault hook)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.database_url("tokens")
        if settings.auto_migrate:
            await upgrade_database(url, "tokens")
        database = Database(url)
        redis = (
            redis_from_settings(settings.redis_url, settings.redis) if settings.redis_url else None
        )
        memory_buckets = MemoryLeakyBucket(clock)
        buckets: LeakyBucketStore = memory_buckets
        if redis is not None:
            guard = guard_from_settings(
                redis, "buckets", settings.redis, RedisMetrics.of(app.state.metrics.registry)
            )
            buckets = RedisLeakyBucket(guard, prefix="lt:bucket:", fallback=memory_buckets)
        providers = ProviderClient(
            {p: settings.url_of(p) for p in PROVIDERS},
            provider_settings(settings.tokens),
            clock=clock,
        )
        the_clock = clock or SystemClock()
        service = TokenService(database, settings.tokens, the_clock, buckets, providers)
        # The catalogue's vocabularies load (about a second of CPU each) before the service
        # reports itself started, off the event loop: else the first /v1 call stalls the rest.
        catalogue = Catalogue(settings.inference.models)
        await asyncio.to_thread(preload, *catalogue.encodings())
        provider_http = ProviderHttp(
            settings.inference, provider_settings(settings.tokens).breaker, clock
        )
        inference = InferenceService(
            service,
            settings.inference,
            catalogue,
            build_adapters(settings, provider_http),
            provider_http,
        )
        app.state.inference_service = inference
        app.state.embedding_service = EmbeddingService(
            inference, EmbeddingAdapters.from_settings(settings, provider_http)
        )
        responses = ResponsesService(
            inference,
            endpoints_from_settings(settings)["openai"],
            provider_http,
            database,
            the_clock,
        )
        app.state.responses_service = responses
        idempotency_keys = IdempotencyKeys(database, settings.inference, the_clock)
        app.state.idempotency_keys = idempotency_keys
        flags = FeatureFlags(database, the_clock)
        await flags.seed(settings.tokens.flags)
        orchestrator = SagaOrchestrator(
            database,
            settings.tokens,
            the_clock,
            flags,
            StubPaymentGateway(database, the_clock, flags),
            step_committed=saga_step_committed,
        )
        app.state.token_service = service
        app.state.purchase_service = PurchaseService(
            database, settings.tokens, the_clock, flags, orchestrator.wake
        )
        app.state.authenticator = authenticator
        app.state.internal_token = resolve_internal_token(
            settings.internal_token, settings.data_dir
        )
        sessions = AgentSessionService(database, settings.tokens, the_clock)
        app.state.session_service = sessions
        background = [
            asyncio.create_task(_sweep_forever(service, settings.tokens.sweep_interval_seconds)),
            asyncio.create_task(
                _sweep_sessions_forever(sessions, settings.tokens.session_sweep_interval_seconds)
            ),
            asyncio.create_task(orchestrator.run_forever()),
            asyncio.create_task(idempotency_keys.sweep_forever(), name="idempotency-sweeper"),
            asyncio.create_task(responses.sweep_forever(), name="stored-response-sweeper"),
        ]
        # outbox -> analytics (issue 5)
        metrics_registry = app.state.metrics.registry
        relay = await start_outbox_relay(settings, database, metrics_registry, clock=clock)
        events = settings.events
        sweeper = OutboxSweeper(
            database,
            config=SweeperConfig(
                retention_seconds=events.outbox_retention_seconds,
                batch=events.outbox_sweep_batch,
                every_seconds=events.outbox_sweep_every_seconds,
                pacing=Pacing(
                    duty_cycle=events.outbox_sweep_duty_cycle,
                    pause_seconds=events.outbox_sweep_pause_seconds,
                    slow_batch_seconds=events.outbox_sweep_slow_batch_seconds,
                ),
            ),
            clock=the_clock,
            metrics=outbox_metrics(metrics_registry),
        )
        if events.outbox_sweep_enabled:
            background.append(asyncio.create_task(sweeper.run(), name="outbox-sweeper"))
        try:
            yield
        finally:
            await relay.stop()  # outbox relay (issue 5)
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await providers.aclose()
            await provider_http.aclose()
            await buckets.close()
            if redis is not None:
                await redis.aclose()
            aclose = getattr(authenticator, "aclose", None)
            if aclose is not None:
                await aclose()
            await database.dispose()

    return build_service_app(
        "tokens",
        title="Leaky Tokens — token service",
        description=(
            "Quota pools, leaky-bucket consumption, provider calls, purchase sagas, the outbox."
        ),
        routers=[
            router,
            inference_router,
            embeddings_router,
            responses_router,
            internal_router,
            session_router,
        ],
        lifespan=lifespan,
        log_access=settings.access_log,
        clock=clock,
        faces=face_of,
        exposure=exposure_of(settings),
    )
