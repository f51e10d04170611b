"""Assembles the agent API inside the gateway process: its FastAPI application (envelope error
handlers, the routes), its own rate limit per caller, and the two ASGI layers the gateway puts
in front of its edge: `AgentDispatch` (the agent paths go to the agent API) and
`SessionProxyPath` (`/v1/s/<credential>/…`, a session's OpenAI base URL, becomes `/v1/…` with
the credential as its Bearer key)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leaky_tokens.agents.envelope import fail, install_envelope_handlers
from leaky_tokens.agents.router import router
from leaky_tokens.agents.service import AgentService
from leaky_tokens.agents.upstreams import AgentError, Services
from leaky_tokens.settings import Settings
from leaky_tokens.shared.authn import Authenticator
from leaky_tokens.shared.client_ip import TrustedProxies
from leaky_tokens.shared.rate_limit import FixedWindowLimiter, Policy, limit_headers

# The agent API's paths (DESIGN.md, "Three faces"): answered in its envelope, never by the
# edge or in the OpenAI face. Exact paths, and prefixes ending in "/".
AGENT_EXACT: frozenset[str] = frozenset(
    {
        "/v1/health",
        "/v1/auth/token",
        "/v1/products",
        "/v1/sessions",
        "/v1/stats/overview",
    }
)
AGENT_PREFIXES: tuple[str, ...] = (
    "/v1/account/",
    "/v1/billing/",
    "/v1/sessions/",
    "/v1/stats/",
)
SESSION_PROXY_PREFIX = "/v1/s/"


def is_agent_path(path: str) -> bool:
    return path in AGENT_EXACT or path.startswith(AGENT_PREFIXES)


def create_agent_app(
    settings: Settings,
    *,
    authenticator: Authenticator,
    edge_open_providers: Callable[[], set[str]] = set,
) -> FastAPI:
    """The agent API, without an envelope middleware of its own: it runs inside the
    gateway's (request id, security headers, access log, metrics). `edge_open_providers`: the
    providers whose circuit breaker at the gateway is open now."""
    services = Services(
        {name: settings.url_of(name) for name in ("auth", "tokens", "analytics")},
        timeout_seconds=settings.gateway.upstream_timeout_seconds,
    )

    async def open_providers() -> set[str]:
        """Providers a rotation skips: open at the gateway or at the token service (which
        makes the metered calls)."""
        found = set(edge_open_providers())
        try:
            status = await services.call("tokens", "GET", "/api/v1/tokens/status")
        except AgentError:
            return found
        for name, breaker in (status or {}).get("providers", {}).items():
            if isinstance(breaker, dict) and breaker.get("state") == "open":
                found.add(name)
        return found

    app = FastAPI(
        title="Leaky Tokens — agent API",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_envelope_handlers(app)
    app.include_router(router)
    app.state.authenticator = authenticator
    app.state.agent_service = AgentService(settings, services, open_providers)
    app.state.services = services
    return app


def _credential_key(scope: Scope) -> str | None:
    """A request's API key or Bearer token, hashed (whom it counts against), if it sent one."""
    for name, value in scope["headers"]:
        if name in (b"x-api-key", b"authorization") and value.strip():
            return "cred:" + hashlib.sha256(value.strip()).hexdigest()[:32]
    return None


class AgentDispatch:
    """Sends the agent paths to the agent API through its rate limit; everything else on."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        agent_app: ASGIApp,
        limiter: Callable[[], FixedWindowLimiter | None],
        settings: Settings,
    ) -> None:
        self.app = app
        self.agent_app = agent_app
        self.limiter = limiter
        agents = settings.agents
        self.policy = Policy("agent", agents.rate_limit_requests, agents.rate_limit_window_seconds)
        gateway = settings.gateway
        self.address_policy = Policy(
            "agent-address", gateway.address_limit_requests, gateway.address_limit_window_seconds
        )
        self.proxies = TrustedProxies(settings.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_agent_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        limiter = self.limiter()
        if limiter is None:  # not started yet
            await self.agent_app(scope, receive, send)
            return
        peer = (scope.get("client") or ("unknown", 0))[0]
        forwarded = [v.decode("latin-1") for n, v in scope["headers"] if n == b"x-forwarded-for"]
        address = "addr:" + self.proxies.client_of(peer, forwarded)
        decision = await limiter.hit(
            [(_credential_key(scope) or address, self.policy), (address, self.address_policy)]
        )
        headers = limit_headers(decision)
        if not decision.allowed:
            headers["Retry-After"] = str(decision.retry_after)
            answer = fail(
                429,
                "RATE_LIMITED",
                f"rate limit exceeded: {decision.limit} requests per "
                f"{decision.policy.window_seconds} s; retry after {decision.retry_after} s",
                headers=headers,
            )
            await answer(scope, receive, send)
            return
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.agent_app(scope, receive, send_with_limits)


class SessionProxyPath:
    """`/v1/s/<credential>/<rest>` -> `/v1/<rest>` with `Authorization: Bearer <credential>`:
    an agent that can only be given a base URL uses its session through the /v1 API. A
    credential sent another way as well is replaced, so the URL's session is the one charged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(SESSION_PROXY_PREFIX):
            await self.app(scope, receive, send)
            return
        credential, _, rest = path[len(SESSION_PROXY_PREFIX) :].partition("/")
        if not credential:
            await self.app(scope, receive, send)
            return
        new_path = "/v1/" + rest if rest else "/v1"
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name not in (b"authorization", b"x-api-key")
        ]
        headers.append((b"authorization", b"Bearer " + credential.encode("latin-1")))
        # In place, so the layers outside (access log, metrics) never see the credential.
        scope["path"] = new_path
        scope["raw_path"] = new_path.encode("latin-1")
        scope["headers"] = headers
        await self.app(scope, receive, send)
