"""Assembles the token service."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI

from leaky_tokens.settings import Settings
from leaky_tokens.shared.app import build_service_app
from leaky_tokens.shared.authn import RemoteAuthenticator
from leaky_tokens.shared.clock import SystemClock, utc_iso

router = APIRouter()
_clock = SystemClock()


@router.get("/api/v1/tokens/status", tags=["health"])
async def status() -> dict[str, str]:
    return {"service": "token-service", "status": "UP", "timestamp": utc_iso(_clock.now())}


def create_tokens_app(settings: Settings, *, authenticator: RemoteAuthenticator) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.authenticator = authenticator
        try:
            yield
        finally:
            await authenticator.aclose()

    return build_service_app(
        "tokens",
        title="Leaky Tokens — token service",
        routers=[router],
        lifespan=lifespan,
        log_access=settings.access_log,
    )
