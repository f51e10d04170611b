"""Assembles the analytics service."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI

from leaky_tokens.settings import Settings
from leaky_tokens.shared.app import build_service_app
from leaky_tokens.shared.authn import RemoteAuthenticator
from leaky_tokens.shared.schemas import HealthRead

router = APIRouter()


@router.get("/api/v1/analytics/health", tags=["health"])
async def health() -> HealthRead:
    return HealthRead(service="analytics", status="UP")


def create_analytics_app(settings: Settings, *, authenticator: RemoteAuthenticator) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.authenticator = authenticator
        try:
            yield
        finally:
            await authenticator.aclose()

    return build_service_app(
        "analytics",
        title="Leaky Tokens — analytics service",
        routers=[router],
        lifespan=lifespan,
        log_access=settings.access_log,
    )
