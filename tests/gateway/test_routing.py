"""Which upstream a path goes to, whether it needs credentials, and which limit applies."""

from __future__ import annotations

import pytest

from leaky_tokens.gateway.routing import RouteTable
from leaky_tokens.settings import GatewaySettings, RouteLimit, Settings


@pytest.fixture
def table() -> RouteTable:
    return RouteTable(GatewaySettings())


@pytest.mark.parametrize(
    ("path", "upstream", "label"),
    [
        ("/api/v1/auth/login", "auth", "/api/v1/auth/**"),
        ("/api/v1/auth/api-keys/validate", "auth", "/api/v1/auth/**"),
        ("/oauth2/jwks", "auth", "/oauth2/jwks"),
        ("/api/v1/tokens/status", "tokens", "/api/v1/tokens/**"),
        ("/api/v1/tokens/purchase/abc", "tokens", "/api/v1/tokens/**"),
        ("/api/v1/analytics/usage", "analytics", "/api/v1/analytics/**"),
        ("/api/v1/qwen/chat", "qwen", "/api/v1/qwen/**"),
        ("/api/v1/gemini/chat", "gemini", "/api/v1/gemini/**"),
        ("/api/v1/openai/chat", "openai", "/api/v1/openai/**"),
    ],
)
def test_each_prefix_goes_to_its_upstream(
    table: RouteTable, path: str, upstream: str, label: str
) -> None:
    route = table.match("GET", path)

    assert route is not None
    assert route.upstream == upstream
    assert route.label == label


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api/v1",
        "/api/v1/tokens",  # the prefix itself is no route of the token service
        "/api/v1/unknown/thing",
        "/oauth2/jwks/extra",
        "/api/v1/auth/api-keys/revocations",  # internal: followed by services, not clients
        "/api/v1/analytics/events",  # internal: the outbox relay pushes here
        "/api/v1/tokens/status/../quota",
        "/api/v1/tokens/./status",
        "/api/v1/tokens//status",
    ],
)
def test_unknown_internal_and_unnormalised_paths_have_no_route(
    table: RouteTable, path: str
) -> None:
    assert table.match("GET", path) is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/auth/register"),
        ("POST", "/api/v1/auth/login"),
        ("GET", "/api/v1/auth/api-keys/validate"),
        ("GET", "/api/v1/auth/jwks"),
        ("GET", "/oauth2/jwks"),
        ("HEAD", "/oauth2/jwks"),
        ("GET", "/api/v1/auth/health"),
        ("GET", "/api/v1/tokens/status"),
        ("GET", "/api/v1/analytics/health"),
        ("GET", "/api/v1/openai/health"),
    ],
)
def test_public_routes(table: RouteTable, method: str, path: str) -> None:
    route = table.match(method, path)

    assert route is not None
    assert route.public


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/auth/login"),  # only POST is public
        ("POST", "/api/v1/auth/api-keys"),
        ("GET", "/api/v1/auth/me"),
        ("GET", "/api/v1/tokens/quota"),
        ("POST", "/api/v1/tokens/consume"),
        ("GET", "/api/v1/tokens/status/"),
        ("GET", "/api/v1/analytics/usage"),
        ("POST", "/api/v1/openai/chat"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ],
)
def test_every_other_route_needs_credentials(table: RouteTable, method: str, path: str) -> None:
    route = table.match(method, path)

    assert route is not None
    assert not route.public


def test_the_provider_fault_switch_is_for_admins(table: RouteTable) -> None:
    for method in ("GET", "PUT", "DELETE"):
        route = table.match(method, "/api/v1/qwen/faults")
        assert route is not None
        assert route.admin_only
        assert route.fault_switch


def test_the_raw_provider_routes_are_for_admins_and_v1_for_everyone(table: RouteTable) -> None:
    # Nothing reaches a provider unmetered: a user's chat goes through /v1 (metered).
    chat = table.match("POST", "/api/v1/qwen/chat")
    assert chat is not None
    assert chat.admin_only
    assert not chat.fault_switch
    health = table.match("GET", "/api/v1/qwen/health")
    assert health is not None
    assert health.public
    v1 = table.match("POST", "/v1/chat/completions")
    assert v1 is not None
    assert (v1.upstream, v1.admin_only, v1.public) == ("inference", False, False)
    assert table.match("GET", "/v1/models/openai/gpt-4o-mini") is not None


def test_the_most_specific_route_limit_wins() -> None:
    table = RouteTable(
        GatewaySettings(
            route_limits=[
                RouteLimit(path="/api/v1/auth/**", limit=50, window_seconds=60),
                RouteLimit(path="/api/v1/auth/login", method="post", limit=5, window_seconds=60),
                RouteLimit(path="/api/v1/auth/login", limit=7, window_seconds=30),
            ]
        )
    )

    def policy(method: str, path: str) -> tuple[str, int, int]:
        p = table.policy_for(method, path)
        return p.name, p.limit, p.window_seconds

    assert policy("POST", "/api/v1/auth/login") == ("POST /api/v1/auth/login", 5, 60)
    assert policy("GET", "/api/v1/auth/login") == ("* /api/v1/auth/login", 7, 30)
    assert policy("GET", "/api/v1/auth/me") == ("* /api/v1/auth/**", 50, 60)
    assert policy("GET", "/api/v1/tokens/status") == ("default", 120, 60)


def test_public_routes_and_trusted_proxies_are_checked_when_settings_load() -> None:
    with pytest.raises(ValueError, match="METHOD /path"):
        GatewaySettings(public_routes=["/no-method"])
    with pytest.raises(ValueError):
        Settings(trusted_proxies=["not-an-ip"])
    with pytest.raises(ValueError, match="breaker_minimum_calls"):
        GatewaySettings(breaker_minimum_calls=30, breaker_window_size=20)
    assert Settings(trusted_proxies=["10.0.0.0/8", "::1"]).trusted_proxies
