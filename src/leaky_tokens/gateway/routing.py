"""Which upstream serves a path, whether it needs credentials, and which rate limit applies."""

from __future__ import annotations

from dataclasses import dataclass

from leaky_tokens.gateway.openai_face import OPENAI_ROUTES
from leaky_tokens.settings import PROVIDERS, GatewaySettings
from leaky_tokens.shared.rate_limit import Policy

# Path prefix -> upstream service. A prefix ending in "/" covers everything below it.
UPSTREAM_PREFIXES: tuple[tuple[str, str], ...] = (
    ("/api/v1/auth/", "auth"),
    ("/oauth2/jwks", "auth"),
    ("/api/v1/tokens/", "tokens"),
    ("/api/v1/analytics/", "analytics"),
    *((f"/api/v1/{p}/", p) for p in PROVIDERS),
    *OPENAI_ROUTES,
)

# Served by upstreams for each other, never for clients: the gateway answers 404.
# Service-to-service endpoints: never routed from the edge (404 there).
INTERNAL_PATHS: frozenset[str] = frozenset(
    {"/api/v1/auth/api-keys/revocations", "/api/v1/analytics/events"}
)

# The provider stubs have no authentication of their own; their fault switch would let any
# caller break every user's provider calls, so at the edge it takes an ADMIN (and the edge adds
# the internal token the stubs ask for).
FAULT_SWITCH_PREFIXES: tuple[str, ...] = tuple(f"/api/v1/{p}/faults" for p in PROVIDERS)
# Nothing reaches a provider unmetered: the raw provider routes (the plan's /chat, the fault
# switch) are for ADMINs at the gateway; users call /v1/chat/completions, which is metered.
# Their health routes stay public (public routes pass whoever calls).
ADMIN_PREFIXES: tuple[str, ...] = tuple(f"/api/v1/{p}/" for p in PROVIDERS)

DEFAULT_POLICY_NAME = "default"
ADDRESS_POLICY_NAME = "address"
USER_POLICY_NAME = "user"


@dataclass(frozen=True, slots=True)
class Route:
    """What the gateway does with one request."""

    upstream: str
    label: str  # the route in metrics: bounded, e.g. "/api/v1/tokens/**"
    public: bool
    admin_only: bool
    policy: Policy
    fault_switch: bool = False  # an ADMIN's call gets the stubs' internal token


@dataclass(frozen=True, slots=True)
class _Pattern:
    method: str  # "*" for any
    path: str
    prefix: bool

    @classmethod
    def parse(cls, method: str, path: str) -> _Pattern:
        if path.endswith("/**"):
            return cls(method.upper(), path[:-2], True)
        return cls(method.upper(), path, False)

    def matches(self, method: str, path: str) -> bool:
        if self.method != "*" and self.method != method:
            return False
        return path.startswith(self.path) if self.prefix else path == self.path

    @property
    def specificity(self) -> tuple[int, int, int]:
        # Exact beats prefix, longer beats shorter, a named method beats "*".
        return (0 if self.prefix else 1, len(self.path), 0 if self.method == "*" else 1)


def is_normalised(path: str) -> bool:
    """No dot segments or empty segments: what the gateway checks is what the upstream sees."""
    if "//" in path:
        return False
    return not any(segment in (".", "..") for segment in path.split("/"))


def upstream_of(path: str) -> tuple[str, str] | None:
    """(upstream, route label) for a path, e.g. ("tokens", "/api/v1/tokens/**")."""
    for prefix, upstream in UPSTREAM_PREFIXES:
        if prefix.endswith("/"):
            if path.startswith(prefix):
                return upstream, prefix + "**"
        elif path == prefix:
            return upstream, prefix
    return None


class RouteTable:
    def __init__(self, settings: GatewaySettings) -> None:
        self.default_policy = Policy(
            DEFAULT_POLICY_NAME, settings.rate_limit_requests, settings.rate_limit_window_seconds
        )
        self.address_policy = Policy(
            ADDRESS_POLICY_NAME,
            settings.address_limit_requests,
            settings.address_limit_window_seconds,
        )
        self.user_policy = Policy(
            USER_POLICY_NAME, settings.user_limit_requests, settings.user_limit_window_seconds
        )
        public: list[_Pattern] = []
        for entry in settings.public_routes:
            method, _, path = entry.partition(" ")
            public.append(_Pattern.parse(method, path.strip()))
        self._public = public
        overrides = [
            (
                _Pattern.parse(r.method, r.path),
                Policy(f"{r.method} {r.path}", r.limit, r.window_seconds),
            )
            for r in settings.route_limits
        ]
        overrides.sort(key=lambda item: item[0].specificity, reverse=True)
        self._overrides = overrides
        self._cache: dict[tuple[str, str], Route | None] = {}

    def policy_for(self, method: str, path: str) -> Policy:
        for pattern, policy in self._overrides:
            if pattern.matches(method, path):
                return policy
        return self.default_policy

    def match(self, method: str, path: str) -> Route | None:
        """The route of a request; None for a path no client may reach (answer 404)."""
        cache_key = (method, path)
        try:
            return self._cache[cache_key]
        except KeyError:
            pass
        route = self._match(method, path)
        if len(self._cache) > 10_000:
            self._cache.clear()  # paths carry ids; only the hot ones stay worth caching
        self._cache[cache_key] = route
        return route

    def _match(self, method: str, path: str) -> Route | None:
        if not is_normalised(path) or path in INTERNAL_PATHS:
            return None
        found = upstream_of(path)
        if found is None:
            return None
        upstream, label = found
        lookup = "GET" if method == "HEAD" else method
        return Route(
            upstream=upstream,
            label=label,
            public=any(p.matches(lookup, path) for p in self._public),
            admin_only=path.startswith(ADMIN_PREFIXES),
            policy=self.policy_for(method, path),
            fault_switch=path.startswith(FAULT_SWITCH_PREFIXES),
        )
