"""Assembles the API gateway."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from leaky_tokens.gateway.health import HEALTH_PATHS, aggregate
from leaky_tokens.settings import Settings
from leaky_tokens.shared.app import build_service_app
from leaky_tokens.shared.http import error_response

router = APIRouter()


@router.get("/health", tags=["health"])
async def health(request: Request) -> Response:
    report = await aggregate(request.app.state.health_client, request.app.state.upstreams)
    if report["status"] == "UP":
        from starlette.responses import JSONResponse

        return JSONResponse(report)
    return error_response(
        503, "SERVICE_UNAVAILABLE", "one or more upstream services are down", extra=report
    )


def create_gateway_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.upstreams = {name: settings.url_of(name) for name in HEALTH_PATHS}
        app.state.health_client = httpx.AsyncClient(timeout=settings.gateway.health_timeout_seconds)
        try:
            yield
        finally:
            await app.state.health_client.aclose()

    return build_service_app(
        "gateway",
        title="Leaky Tokens — API gateway",
        routers=[router],
        lifespan=lifespan,
        log_access=settings.access_log,
    )
