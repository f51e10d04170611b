"""Assembles the auth service: database, migrations, signing keys, admin bootstrap, routes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from leaky_tokens.auth.router import internal_router, router
from leaky_tokens.auth.service import AuthService
from leaky_tokens.settings import Settings
from leaky_tokens.shared.app import build_service_app, exposure_of
from leaky_tokens.shared.authn import announce_principal_change, announce_revocation
from leaky_tokens.shared.client_ip import TrustedProxies
from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.events import resolve_internal_token
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.rate_limit import (
    FixedWindowLimiter,
    MemoryFixedWindowLimiter,
    RedisFixedWindowLimiter,
)
from leaky_tokens.shared.redis import RedisMetrics, guard_from_settings, redis_from_settings

log = logging.getLogger("leaky_tokens.auth")
PRINCIPAL_REFRESH_SECONDS = 0.25


class LocalAuthenticator:
    """The auth service verifies its own callers without a network hop."""

    def __init__(self, service: AuthService) -> None:
        self._service = service

    async def from_bearer(self, token: str) -> Principal:
        return self._service.principal_from_bearer(token)

    async def from_api_key(self, raw_key: str) -> Principal:
        return await self._service.principal_from_api_key(raw_key)


async def _follow_principal_changes(service: AuthService) -> None:
    """This replica's view of principal changes follows the feed (other replicas' changes
    within a quarter second; its own are applied as they commit)."""
    while True:
        await asyncio.sleep(PRINCIPAL_REFRESH_SECONDS)
        try:
            await service.refresh_principal_changes()
        except Exception:
            log.exception("principal-change refresh failed")


async def _refresh_keys_forever(service: AuthService, interval: float) -> None:
    """Replicas pick up a rotation made by another replica (or the CLI) within `interval`."""
    while True:
        await asyncio.sleep(interval)
        try:
            await service.ensure_signing_key()
        except Exception:
            log.exception("signing key refresh failed")


def create_auth_app(settings: Settings, *, clock: Clock | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The data directory is private before any file is made in it (internal token, SQLite).
        app.state.internal_token = resolve_internal_token(
            settings.internal_token, settings.data_dir
        )
        app.state.trusted_proxies = TrustedProxies(settings.trusted_proxies)
        url = settings.database_url("auth")
        if settings.auto_migrate:
            await upgrade_database(url, "auth")
        # Whatever the start opened is closed again when a later step fails (a locked signing
        # key, say), not left for the garbage collector.
        resources = contextlib.AsyncExitStack()
        database = Database(url)
        resources.push_async_callback(database.dispose)
        redis = (
            redis_from_settings(settings.redis_url, settings.redis) if settings.redis_url else None
        )
        if redis is not None:
            resources.push_async_callback(redis.aclose)
        service_clock = clock or SystemClock()
        # The in-memory login windows run on the service's clock, so tests can move time.
        memory = MemoryFixedWindowLimiter(service_clock)
        throttle: FixedWindowLimiter = memory
        if redis is not None:
            guard = guard_from_settings(
                redis, "login_throttle", settings.redis, RedisMetrics.of(app.state.metrics.registry)
            )
            throttle = RedisFixedWindowLimiter(
                guard, prefix=settings.auth.throttle_key_prefix, fallback=memory
            )
        service = AuthService(database, settings.auth, service_clock, throttle)
        if redis is not None:
            service.announce_revocation = functools.partial(announce_revocation, redis)
            service.announce_change = functools.partial(announce_principal_change, redis)
        async with resources:
            await service.ensure_signing_key()
            await service.refresh_principal_changes()
            if settings.admin_username and settings.admin_password:
                email = settings.admin_email or f"{settings.admin_username}@localhost.localdomain"
                await service.ensure_admin(settings.admin_username, email, settings.admin_password)
            resources = resources.pop_all()
        app.state.auth_service = service
        app.state.authenticator = LocalAuthenticator(service)
        background = [
            asyncio.create_task(
                _refresh_keys_forever(service, settings.auth.signing_key_refresh_seconds)
            ),
            asyncio.create_task(_follow_principal_changes(service)),
        ]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await resources.aclose()

    return build_service_app(
        "auth",
        title="Leaky Tokens — auth service",
        description="Users, roles, organisations, RS256 JWTs (JWKS) and API keys.",
        routers=[router, internal_router],
        lifespan=lifespan,
        log_access=settings.access_log,
        clock=clock,
        exposure=exposure_of(settings),
    )
