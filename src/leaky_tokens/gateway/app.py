"""Assembles the API gateway: its own /health and /metrics, and the edge behind every other path.

Everything the edge holds for the life of the process (one connection pool and one circuit
breaker per upstream, the rate limiter, the authenticator) is opened in the lifespan.
Another API face (the OpenAI-compatible /v1 paths) plugs in as further routes in routing.py
and its own error renderer; the dispatch below sends every path but the gateway's own there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from leaky_tokens.agents.app import AgentDispatch, SessionProxyPath, create_agent_app
from leaky_tokens.agents.observe import SessionObserver, drain, dropped_counter
from leaky_tokens.gateway.dashboard import DashboardFiles
from leaky_tokens.gateway.edge import GatewayEdge, GatewayMetrics
from leaky_tokens.gateway.health import HEALTH_PATHS, aggregate
from leaky_tokens.gateway.identity import EdgeAuthenticator
from leaky_tokens.gateway.openai_face import INFERENCE_UPSTREAM, SERVED_BY
from leaky_tokens.gateway.proxy import Upstream
from leaky_tokens.gateway.routing import RouteTable
from leaky_tokens.settings import GatewaySettings, Settings
from leaky_tokens.shared.app import build_service_app, exposure_of
from leaky_tokens.shared.authn import Authenticator
from leaky_tokens.shared.circuit_breaker import BreakerConfig
from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.events import resolve_internal_token
from leaky_tokens.shared.http import error_response, face_of
from leaky_tokens.shared.outbound import client_session
from leaky_tokens.shared.rate_limit import (
    FixedWindowLimiter,
    MemoryFixedWindowLimiter,
    RedisFixedWindowLimiter,
)
from leaky_tokens.shared.redis import RedisMetrics, guard_from_settings, redis_from_settings

router = APIRouter()


@router.get("/health", tags=["health"])
async def health(request: Request) -> Response:
    """Every upstream's own health, asked in parallel, and each upstream's circuit breaker."""
    report = await aggregate(
        request.app.state.health_client,
        request.app.state.upstream_urls,
        request.app.state.health_timeout_seconds,
    )
    edge: GatewayEdge = request.app.state.edge
    report["circuitBreakers"] = {name: u.snapshot() for name, u in edge.upstreams.items()}
    if report["status"] == "UP":
        return JSONResponse(report)
    return error_response(
        503, "SERVICE_UNAVAILABLE", "one or more upstream services are down", extra=report
    )


def breaker_config(gateway: GatewaySettings) -> BreakerConfig:
    return BreakerConfig(
        window_size=gateway.breaker_window_size,
        minimum_calls=gateway.breaker_minimum_calls,
        failure_rate_threshold=gateway.breaker_failure_rate,
        open_seconds=gateway.breaker_open_seconds,
        half_open_max_calls=gateway.breaker_half_open_calls,
    )


class EdgeDispatch:
    """Sends every path but the gateway's own straight to the edge, inside the envelope (request
    id, metrics, access log) but past FastAPI's router and exception layers, which would only
    add time to each proxied request."""

    def __init__(self, app: ASGIApp, *, edge: GatewayEdge, own_paths: frozenset[str]) -> None:
        self.app = app
        self.edge = edge
        self.own_paths = own_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.own_paths:
            await self.edge(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_gateway_app(
    settings: Settings, *, authenticator: Authenticator, clock: Clock | None = None
) -> FastAPI:
    clock = clock or SystemClock()
    gateway = settings.gateway
    edge_authenticator = EdgeAuthenticator(
        authenticator, clock=clock, negative_seconds=gateway.negative_cache_seconds
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        internal = [settings.url_of(name) for name in HEALTH_PATHS]
        upstreams = {
            name: Upstream(
                name,
                settings.url_of(name),
                breaker=breaker_config(gateway),
                clock=clock,
                connect_seconds=gateway.connect_timeout_seconds,
                headers_seconds=gateway.upstream_timeout_seconds,
                answer_seconds=gateway.answer_timeout_seconds,
                pool_wait_seconds=gateway.pool_wait_seconds,
                client_body_seconds=gateway.client_body_timeout_seconds,
                max_connections=gateway.max_connections_per_upstream,
                internal_origins=internal,
            )
            for name in HEALTH_PATHS
        }
        upstreams[INFERENCE_UPSTREAM] = Upstream(
            INFERENCE_UPSTREAM,
            settings.url_of(SERVED_BY[INFERENCE_UPSTREAM]),
            breaker=breaker_config(gateway),
            clock=clock,
            connect_seconds=gateway.connect_timeout_seconds,
            headers_seconds=gateway.inference_upstream_timeout_seconds,
            answer_seconds=gateway.inference_answer_timeout_seconds,
            pool_wait_seconds=gateway.pool_wait_seconds,
            client_body_seconds=gateway.client_body_timeout_seconds,
            max_connections=gateway.max_connections_per_upstream,
            internal_origins=internal,
        )
        memory = MemoryFixedWindowLimiter(clock)
        limiter: FixedWindowLimiter = memory
        redis = (
            redis_from_settings(settings.redis_url, settings.redis) if settings.redis_url else None
        )
        if redis is not None:
            guard = guard_from_settings(
                redis, "gateway_limits", settings.redis, RedisMetrics.of(app.state.metrics.registry)
            )
            limiter = RedisFixedWindowLimiter(
                guard, prefix=gateway.rate_limit_key_prefix, fallback=memory
            )
        app.state.upstream_urls = {
            name: u.base_url for name, u in upstreams.items() if name in HEALTH_PATHS
        }
        app.state.health_timeout_seconds = gateway.health_timeout_seconds
        app.state.health_client = client_session(
            max_connections=len(upstreams) * 2, connect_seconds=gateway.health_timeout_seconds
        )
        app.state.agent_limiter = limiter
        try:
            edge.attach(edge_authenticator, limiter, upstreams)
            yield
        finally:
            await drain(observations)
            await agent_app.state.services.aclose()
            for upstream in upstreams.values():
                await upstream.aclose()
            await app.state.health_client.close()
            await limiter.aclose()
            if redis is not None:
                await redis.aclose()
            await edge_authenticator.aclose()

    app = build_service_app(
        "gateway",
        title="Leaky Tokens — API gateway",
        description=(
            "One entry point: /api/v1/{auth,tokens,analytics,qwen,gemini,openai}/** with "
            "authentication at the edge, per-principal rate limits and per-upstream circuit "
            "breakers. Only the gateway's own endpoints are listed here."
        ),
        routers=[router],
        lifespan=lifespan,
        log_access=settings.access_log,
        clock=clock,
        faces=face_of,
        exposure=exposure_of(settings),
    )
    edge = GatewayEdge(
        RouteTable(gateway),
        GatewayMetrics(app.state.metrics.registry),
        trusted_proxies=settings.trusted_proxies,
        max_headers=gateway.max_headers,
        max_header_bytes=gateway.max_header_bytes,
        address_limiter=MemoryFixedWindowLimiter(clock),
        internal_token=resolve_internal_token(settings.internal_token, settings.data_dir),
    )
    app.state.edge = edge
    own_paths = frozenset(
        path
        for path in (
            "/health",
            "/metrics",
            app.openapi_url,
            app.docs_url,
            app.redoc_url,
            app.swagger_ui_oauth2_redirect_url,
        )
        if path
    )
    # Innermost user middleware: right inside the envelope (which `add_middleware` would not do).
    # The dashboard's files first: /dashboard/** is the gateway's own, never an upstream's.
    app.user_middleware.append(Middleware(DashboardFiles))
    # The agent API (issue 13): its paths answer in its envelope; a session's proxy base URL
    # /v1/s/<credential>/… becomes the /v1 API with that credential.
    agent_app = create_agent_app(
        settings,
        authenticator=authenticator,
        edge_open_providers=lambda: {
            name for name, u in edge.upstreams.items() if u.breaker.state.value == "open"
        },
    )
    app.state.agent_app = agent_app
    app.user_middleware.append(
        Middleware(
            AgentDispatch,
            agent_app=agent_app,
            limiter=lambda: getattr(app.state, "agent_limiter", None),
            settings=settings,
        )
    )
    app.user_middleware.append(Middleware(SessionProxyPath))
    observations: set[asyncio.Task[None]] = set()
    app.user_middleware.append(
        Middleware(
            SessionObserver,
            authenticator=authenticator,
            services=agent_app.state.services,
            pending=observations,
            dropped=dropped_counter(app.state.metrics.registry),
        )
    )
    app.user_middleware.append(Middleware(EdgeDispatch, edge=edge, own_paths=own_paths))
    return app
