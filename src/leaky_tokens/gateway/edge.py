"""The gateway's edge: every routed request is checked, limited, identified, limited again,
authorised and forwarded.

Order per request, cheapest first so that floods never reach the auth service:
1. the message itself: header count and size (431), framing the upstream could read otherwise
   (an unknown transfer coding 501, Transfer-Encoding with Content-Length or several lengths
   400) — refused before anything else;
2. the client address's own limit (in this process's memory, no network), before any
   credential is looked at;
3. identify the caller from X-Api-Key or Authorization: Bearer (API keys validated by the auth
   service and cached until revoked; unknown keys remembered briefly, edge/identity.py);
4. one rate-limit decision for the principal (API key, else user, else client IP) and, for a
   known user, the user's own limit across all their keys;
5. refuse (401/403/404/429) or forward.
Public routes are forwarded whatever the credentials say (the upstream decides), but a valid
credential still makes its owner the principal that is limited. Every answer the edge gives
carries the rate-limit fields. Only the credential the edge checked goes upstream.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import Receive, Scope, Send

from leaky_tokens.gateway.openai_face import INFERENCE_UPSTREAM, openai_request_limits
from leaky_tokens.gateway.proxy import (
    ClientTooSlow,
    ClientWentAway,
    Upstream,
    UpstreamBrokeOff,
    UpstreamOpen,
    UpstreamSaturated,
    UpstreamTimeout,
    UpstreamUnreachable,
    request_is_dropped,
)
from leaky_tokens.gateway.routing import Route, RouteTable
from leaky_tokens.shared.authn import Authenticator
from leaky_tokens.shared.circuit_breaker import BreakerState
from leaky_tokens.shared.client_ip import TrustedProxies
from leaky_tokens.shared.errors import (
    AppError,
    Forbidden,
    InvalidApiKey,
    InvalidToken,
)
from leaky_tokens.shared.http import error_response
from leaky_tokens.shared.principal import Principal
from leaky_tokens.shared.rate_limit import (
    Decision,
    FixedWindowLimiter,
    Limit,
    MemoryFixedWindowLimiter,
    Policy,
    limit_headers,
)
from leaky_tokens.shared.request_context import current_request_id

log = logging.getLogger("leaky_tokens.gateway")

_STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_CREDENTIAL_HEADERS = (b"x-api-key", b"authorization")


@dataclass(frozen=True, slots=True)
class RouteLabel:
    """What the envelope's metrics and logs see as the route (bounded cardinality)."""

    path: str


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.rate_limited = Counter(
            "gateway_rate_limited_requests",
            "Requests refused by the gateway's rate limit",
            ["policy"],
            registry=registry,
        )
        self.refused = Counter(
            "gateway_authentication_refusals",
            "Requests refused at the edge for their credentials",
            ["code"],
            registry=registry,
        )
        self.upstream_failures = Counter(
            "gateway_upstream_failures",
            "Requests the gateway could not get an upstream answer for",
            ["upstream", "reason"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "gateway_circuit_breaker_state",
            "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
            ["upstream"],
            registry=registry,
        )

    def watch(self, upstream: Upstream) -> None:
        breaker = upstream.breaker
        self.breaker_state.labels(upstream.name).set_function(lambda: _STATE_VALUES[breaker.state])


class GatewayEdge:
    """ASGI endpoint behind every path the gateway does not answer itself."""

    def __init__(
        self,
        routes: RouteTable,
        metrics: GatewayMetrics,
        *,
        trusted_proxies: list[str],
        max_headers: int = 100,
        max_header_bytes: int = 32 * 1024,
        address_limiter: MemoryFixedWindowLimiter | None = None,
        internal_token: str = "",
    ) -> None:
        self.routes = routes
        # Sent on to the provider stubs' fault switch (ADMIN-only here), which needs it.
        self._internal_token = internal_token.encode("latin-1")
        self.metrics = metrics
        self._trusted = TrustedProxies(trusted_proxies)  # the one rule, shared with login
        self._any_trusted = bool(trusted_proxies)
        self._labels: dict[str, RouteLabel] = {}
        self._unmatched = RouteLabel("unmatched")
        self._max_headers = max_headers
        self._max_header_bytes = max_header_bytes
        self._address_limiter = address_limiter or MemoryFixedWindowLimiter()
        self.authenticator: Authenticator | None = None
        self.limiter: FixedWindowLimiter | None = None
        self.upstreams: dict[str, Upstream] = {}

    def attach(
        self,
        authenticator: Authenticator,
        limiter: FixedWindowLimiter,
        upstreams: Mapping[str, Upstream],
    ) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.upstreams = dict(upstreams)
        for upstream in self.upstreams.values():
            self.metrics.watch(upstream)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.limiter is not None, "GatewayEdge.attach() was not called"
        method: str = scope["method"]
        path: str = scope["path"]
        route = self.routes.match(method, path)
        scope["route"] = self._label(route.label) if route else self._unmatched

        api_key: bytes | None = None
        authorization: bytes | None = None
        forwarded_for: list[bytes] = []
        forwarded_proto: bytes | None = None
        host: bytes | None = None
        connection: bytes | None = None
        lengths: list[bytes] = []
        codings: list[bytes] = []
        header_bytes = 0
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        for name, value in raw_headers:
            header_bytes += len(name) + len(value)
            if name == b"x-api-key":
                if api_key is None:
                    api_key = value
            elif name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
            elif name == b"x-forwarded-proto":
                forwarded_proto = value
            elif name == b"host":
                host = value
            elif name == b"connection":
                connection = value
            elif name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.append(value)

        problem = self._message_problem(len(raw_headers), header_bytes, lengths, codings)
        if problem is not None:
            await problem(scope, receive, send)
            return
        peer = scope["client"][0] if scope.get("client") else "unknown"
        trusted_peer = self._any_trusted and self._trusted.trusts(peer)
        client_ip = (
            self._trusted.client_of(peer, [v.decode("latin-1") for v in forwarded_for])
            if trusted_peer
            else peer
        )

        # The address's own limit comes before any credential is looked at: a flood of junk
        # credentials from one address costs the auth service nothing past this limit.
        address = self._address_limiter.hit_now([(client_ip, self.routes.address_policy)])
        if not address.allowed:
            await self._too_many(address, limit_headers(address))(scope, receive, send)
            return

        principal: Principal | None = None
        refusal: AppError | None = None
        try:
            principal = await self._identify(api_key, authorization)
        except AppError as exc:
            refusal = exc
        policy = route.policy if route else self.routes.policy_for(method, path)
        try:
            decision = await self.limiter.hit(self._limits(principal, client_ip, policy))
        except AppError as exc:  # the shared limiter is down and fails closed
            await _render(exc, {})(scope, receive, send)
            return
        limits = limit_headers(decision)
        if route is not None and route.upstream == INFERENCE_UPSTREAM:
            limits.update(openai_request_limits(decision))  # OpenAI's names, on /v1

        if not decision.allowed:
            await self._too_many(decision, limits)(scope, receive, send)
            return
        if route is None:
            await error_response(404, "NOT_FOUND", "no such route", headers=limits)(
                scope, receive, send
            )
            return
        if not route.public:
            if refusal is None:
                if principal is None:
                    refusal = InvalidApiKey(
                        "missing credentials: send Authorization: Bearer <jwt> or X-Api-Key",
                        headers={"WWW-Authenticate": 'Bearer, ApiKey header="X-Api-Key"'},
                    )
                elif route.admin_only and not principal.is_admin:
                    refusal = Forbidden(
                        "the raw provider routes are for ADMINs; call the metered "
                        "/v1/chat/completions instead"
                    )
                elif principal.session_id is not None and not _session_may_use(route, path):
                    # An agent session's credential spends its budget and nothing else: it
                    # never reads or manages its user's account (quotas, usage, keys).
                    refusal = Forbidden(
                        "an agent session's credential is for /v1 inference and "
                        "/api/v1/tokens/consume only"
                    )
            if refusal is not None:
                self.metrics.refused.labels(refusal.code).inc()
                await _render(refusal, limits)(scope, receive, send)
                return

        upstream = self.upstreams[route.upstream]
        headers = _upstream_headers(
            raw_headers,
            connection,
            checked=b"x-api-key" if api_key is not None else b"authorization",
            client_ip=client_ip,
            proto=(
                forwarded_proto.decode("latin-1")
                if trusted_peer and forwarded_proto
                else scope.get("scheme", "http")
            ),
            host=host,
        )
        if route.fault_switch and self._internal_token:
            headers = [h for h in headers if h[0] != b"x-internal-token"]
            headers.append((b"x-internal-token", self._internal_token))
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in limits.items()]
        length = int(lengths[0]) if lengths and not codings else None
        try:
            await upstream.forward(scope, receive, send, headers, extra, length)
        except UpstreamOpen as exc:
            self.metrics.upstream_failures.labels(upstream.name, "open").inc()
            retry = {"Retry-After": str(max(1, int(exc.retry_after_seconds + 0.999)))}
            await _unavailable(upstream, 503, "Circuit breaker open", {**limits, **retry})(
                scope, receive, send
            )
        except UpstreamSaturated:
            self.metrics.upstream_failures.labels(upstream.name, "busy").inc()
            message = f"{upstream.service_name} is busy; retry shortly"
            await _unavailable(upstream, 503, message, {**limits, "Retry-After": "1"})(
                scope, receive, send
            )
        except UpstreamUnreachable:
            self.metrics.upstream_failures.labels(upstream.name, "unreachable").inc()
            message = f"{upstream.service_name} unreachable"
            await _unavailable(upstream, 503, message, limits)(scope, receive, send)
        except UpstreamTimeout:
            self.metrics.upstream_failures.labels(upstream.name, "timeout").inc()
            message = f"{upstream.service_name} did not answer in time"
            await error_response(
                504,
                "GATEWAY_TIMEOUT",
                message,
                headers=limits,
                extra={"service": upstream.service_name},
            )(scope, receive, send)
        except ClientTooSlow:
            await error_response(
                408,
                "REQUEST_TIMEOUT",
                "the request body did not arrive in time",
                headers={**limits, "Connection": "close"},
            )(scope, receive, send)
        except ClientWentAway:
            pass  # nobody to answer
        except UpstreamBrokeOff:
            self.metrics.upstream_failures.labels(upstream.name, "broke_off").inc()
            message = f"{upstream.service_name} answer broke off"
            service = {"service": upstream.service_name}
            await error_response(502, "BAD_GATEWAY", message, headers=limits, extra=service)(
                scope, receive, send
            )

    def _message_problem(
        self, count: int, size: int, lengths: list[bytes], codings: list[bytes]
    ) -> Any:
        """An answer refusing a message whose headers are too many or too large, or whose body
        framing the upstream could read differently; None for a sound message."""
        close = {"Connection": "close"}
        if count > self._max_headers or size > self._max_header_bytes:
            return error_response(
                431,
                "HEADERS_TOO_LARGE",
                f"request headers too large (at most {self._max_headers} headers, "
                f"{self._max_header_bytes} bytes)",
                headers=close,
            )
        if codings:
            coding = b",".join(codings).strip().lower()
            if coding != b"chunked":
                return error_response(
                    501,
                    "TRANSFER_CODING_UNSUPPORTED",
                    "only Transfer-Encoding: chunked is understood",
                    headers=close,
                )
            if lengths:
                return error_response(
                    400,
                    "INVALID_FRAMING",
                    "Transfer-Encoding and Content-Length must not both be sent",
                    headers=close,
                )
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return error_response(
                400, "INVALID_FRAMING", "exactly one numeric Content-Length", headers=close
            )
        return None

    def _limits(self, principal: Principal | None, client_ip: str, policy: Policy) -> list[Limit]:
        if principal is None:
            return [(f"ip:{client_ip}", policy)]
        user = f"user:{principal.user_id}"
        subject = f"key:{principal.api_key_id}" if principal.api_key_id is not None else user
        # A user's own limit spans all their API keys (and tokens): more keys, no more calls.
        return [(subject, policy), (user, self.routes.user_policy)]

    async def _identify(
        self, api_key: bytes | None, authorization: bytes | None
    ) -> Principal | None:
        """The caller's principal; None without credentials; AppError for bad ones (and 503
        when the auth service cannot tell). Same rules as `shared.authn.credentials_of`."""
        assert self.authenticator is not None
        if api_key is not None:
            raw = api_key.decode("latin-1").strip()
            if not raw:
                raise InvalidApiKey("empty X-Api-Key header")
            return await self.authenticator.from_api_key(raw)
        if authorization is None:
            return None
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken("Authorization header must be 'Bearer <token>'")
        return await self.authenticator.from_bearer(token.strip())

    def _too_many(self, decision: Decision, limits: dict[str, str]) -> Any:
        self.metrics.rate_limited.labels(decision.policy.name).inc()
        return error_response(
            429,
            "RATE_LIMITED",
            "rate limit exceeded",
            headers={**limits, "Retry-After": str(decision.retry_after)},
            extra={"retryAfterSeconds": decision.retry_after},
        )

    def _label(self, path: str) -> RouteLabel:
        label = self._labels.get(path)
        if label is None:
            label = self._labels[path] = RouteLabel(path)
        return label


def _upstream_headers(
    raw: list[tuple[bytes, bytes]],
    connection: bytes | None,
    *,
    checked: bytes,
    client_ip: str,
    proto: str,
    host: bytes | None,
) -> list[tuple[bytes, bytes]]:
    """What goes upstream. Of the credential headers only the one the edge checked, and only
    its first occurrence: never a second one behind it, never the other kind (which the edge
    did not look at), and `Connection` cannot name it away."""
    named_hop_by_hop: set[bytes] = set()
    if connection:
        named_hop_by_hop = {t.strip().lower() for t in connection.split(b",")}
        named_hop_by_hop.difference_update(_CREDENTIAL_HEADERS)
    sent_credential = False
    headers: list[tuple[bytes, bytes]] = []
    for name, value in raw:
        if name in _CREDENTIAL_HEADERS:
            if name != checked or sent_credential:
                continue
            sent_credential = True
        elif request_is_dropped(name) or name in named_hop_by_hop:
            continue
        headers.append((name, value))
    headers.append((b"x-forwarded-for", client_ip.encode("latin-1")))
    headers.append((b"x-forwarded-proto", proto.encode("latin-1")))
    if host:
        headers.append((b"x-forwarded-host", host))
    request_id = current_request_id()
    if request_id:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
    return headers


SESSION_SPEND_PATHS = frozenset({"/api/v1/tokens/consume"})


def _session_may_use(route: Route, path: str) -> bool:
    return route.upstream == INFERENCE_UPSTREAM or path in SESSION_SPEND_PATHS


def _render(error: AppError, limits: dict[str, str]) -> Any:
    return error_response(
        error.status,
        error.code,
        error.message,
        details=error.details,
        headers={**error.headers, **limits},
        extra=error.extra,
    )


def _unavailable(upstream: Upstream, status: int, message: str, headers: dict[str, str]) -> Any:
    """The plan's fallback body, {service, status: "unavailable", message, timestamp}, in our
    error shape (code, requestId)."""
    return error_response(
        status,
        "SERVICE_UNAVAILABLE",
        message,
        headers=headers,
        extra={"service": upstream.service_name, "status": "unavailable"},
    )
