"""The one way a service's FastAPI application is assembled."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from leaky_tokens import __version__
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.http import (
    EnvelopeMiddleware,
    Face,
    HttpMetrics,
    error_response,
    install_error_handlers,
)

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from leaky_tokens.settings import Settings

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]
INTERNAL_HEADER = b"x-internal-token"  # shared/events.INTERNAL_TOKEN_HEADER, as ASGI sees it


@dataclass(frozen=True)
class Exposure:
    """Who may read /metrics and the API docs: "open", "local" (loopback peers; others with
    the internal token), "internal" (the internal token only) or "off" (not served)."""

    metrics: str = "open"
    docs: str = "open"
    internal_token: str = ""


def exposure_of(settings: Settings) -> Exposure:
    from leaky_tokens.shared.events import resolve_internal_token

    guarded = {settings.metrics_exposure, settings.docs_exposure} & {"local", "internal"}
    token = resolve_internal_token(settings.internal_token, settings.data_dir) if guarded else ""
    return Exposure(settings.metrics_exposure, settings.docs_exposure, token)


class _ExposureGuard:
    """Answers 401 for a guarded path unless the peer or its X-Internal-Token may read it."""

    def __init__(self, app: ASGIApp, *, paths: dict[str, str], token: str) -> None:
        self.app = app
        self._paths = paths
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        mode = self._paths.get(scope["path"]) if scope["type"] == "http" else None
        if mode is None or self._allowed(mode, scope):
            await self.app(scope, receive, send)
            return
        await error_response(
            401,
            "AUTH_INVALID_INTERNAL_TOKEN",
            "this endpoint needs X-Internal-Token",
        )(scope, receive, send)

    def _allowed(self, mode: str, scope: Scope) -> bool:
        if mode == "local" and _is_loopback((scope.get("client") or ("", 0))[0]):
            return True
        offered = next((v for k, v in scope["headers"] if k == INTERNAL_HEADER), None)
        return (
            bool(self._token) and offered is not None and hmac.compare_digest(offered, self._token)
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_service_app(
    service: str,
    *,
    title: str,
    routers: Sequence[APIRouter],
    lifespan: Lifespan | None = None,
    log_access: bool = True,
    description: str = "",
    clock: Clock | None = None,
    faces: Callable[[str], Face] | None = None,
    exposure: Exposure | None = None,
    **fastapi_kwargs: Any,
) -> FastAPI:
    """`faces`: which API face each path belongs to (shared/http.py `face_of`), for services
    that serve more than the plan's; None renders every error in the plan's shape. `exposure`:
    who may read /metrics and the docs (settings `metrics_exposure` / `docs_exposure`)."""
    exposure = exposure or Exposure()
    if exposure.docs == "off":
        fastapi_kwargs |= {"docs_url": None, "redoc_url": None, "openapi_url": None}
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

    if exposure.metrics != "off":

        @app.get("/metrics", include_in_schema=False)
        async def prometheus_metrics() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi_with_our_errors(app, faces)  # type: ignore[method-assign]
    guarded: dict[str, str] = {}
    if exposure.metrics in ("local", "internal"):
        guarded["/metrics"] = exposure.metrics
    if exposure.docs in ("local", "internal"):
        docs_paths = (
            app.docs_url,
            app.redoc_url,
            app.openapi_url,
            app.swagger_ui_oauth2_redirect_url,
        )
        guarded |= {path: exposure.docs for path in docs_paths if path}
    if guarded:
        app.add_middleware(_ExposureGuard, paths=guarded, token=exposure.internal_token)
    app.add_middleware(
        EnvelopeMiddleware,
        service=service,
        metrics=metrics,
        log_access=log_access,
        clock=clock,
        faces=faces,
    )
    return app


async def no_lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield


ERROR_BODY_SCHEMA: dict[str, Any] = {
    "title": "ErrorBody",
    "type": "object",
    "required": ["message", "timestamp", "code", "requestId"],
    "properties": {
        "message": {"type": "string"},
        "timestamp": {"type": "string", "format": "date-time"},
        "code": {"type": "string", "examples": ["INVALID_REQUEST", "AUTH_INVALID_TOKEN"]},
        "requestId": {"type": "string"},
        "details": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}


# The OpenAI face's errors (/v1/..., shared/http.py face_of).
OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OpenAIErrorBody",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _openapi_with_our_errors(app: FastAPI, faces: Callable[[str], Face] | None) -> dict[str, Any]:
    """FastAPI documents validation failures as 422 with its own body; ours are 400 ErrorBody."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["ErrorBody"] = ERROR_BODY_SCHEMA
    plan_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    openai_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIErrorBody"}}}
    for path, path_item in schema.get("paths", {}).items():
        # Each face documents the error body it answers with (what a client's SDK parses).
        ref = plan_ref
        if faces is not None and faces(path) == "openai":
            components["OpenAIErrorBody"] = OPENAI_ERROR_SCHEMA
            ref = openai_ref
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "Invalid request"})
            for code, response in responses.items():
                if code[0] in "45":
                    response["content"] = ref
            responses.setdefault("default", {"description": "Error", "content": ref})
    app.openapi_schema = schema
    return schema
