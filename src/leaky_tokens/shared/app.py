"""The one way a service's FastAPI application is assembled."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from leaky_tokens import __version__
from leaky_tokens.shared.http import EnvelopeMiddleware, HttpMetrics, install_error_handlers

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def build_service_app(
    service: str,
    *,
    title: str,
    routers: Sequence[APIRouter],
    lifespan: Lifespan | None = None,
    log_access: bool = True,
    description: str = "",
    **fastapi_kwargs: Any,
) -> FastAPI:
    app = FastAPI(
        title=title,
        version=__version__,
        description=description,
        lifespan=lifespan,
        **fastapi_kwargs,
    )
    metrics = HttpMetrics(service)
    app.state.service_name = service
    app.state.metrics = metrics
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(EnvelopeMiddleware, service=service, metrics=metrics, log_access=log_access)
    return app


async def no_lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
