"""TS-5 rate limit: the agent API's own limit per caller, in both shapes (memory and Redis):
every answer carries the X-RateLimit-* and RateLimit headers; past the limit, 429
RATE_LIMITED in the envelope with Retry-After; another caller is not affected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.agent_api import agent_stack, failed, ok, register
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

LIMIT = 5


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    extra = {
        "LEAKY_AGENTS__RATE_LIMIT_REQUESTS": str(LIMIT),
        "LEAKY_AGENTS__RATE_LIMIT_WINDOW_SECONDS": "3600",
    }
    with agent_stack(stack_env, extra) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(system: Stack) -> Iterator[httpx.Client]:
    with system.client("gateway") as client:
        yield client


def test_past_the_limit_a_caller_gets_429_with_retry_after_and_the_headers(
    gateway: httpx.Client,
) -> None:
    agent = register(gateway)
    remaining = []
    for _ in range(LIMIT):
        response = gateway.get("/v1/account/info", headers=agent.key)
        ok(response)
        assert response.headers["X-RateLimit-Limit"] == str(LIMIT)
        assert "RateLimit" in response.headers
        assert "RateLimit-Policy" in response.headers
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
    assert remaining == list(range(LIMIT - 1, -1, -1))

    refused = gateway.get("/v1/account/info", headers=agent.key)
    failed(refused, 429, "RATE_LIMITED")
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.headers["X-RateLimit-Reset"]) > 0
    # Also for an endpoint the caller has not used yet: the limit is per caller.
    failed(gateway.get("/v1/sessions", headers=agent.key), 429, "RATE_LIMITED")

    # Another agent has its own allowance.
    other = register(gateway, "other")
    ok(gateway.get("/v1/account/info", headers=other.key))


def test_callers_without_a_credential_count_per_client_address_behind_a_trusted_proxy(
    gateway: httpx.Client,
) -> None:
    # The test client is on 127.0.0.1, a trusted proxy by default: its X-Forwarded-For counts.
    first = {"X-Forwarded-For": "198.51.100.7"}
    for _ in range(LIMIT):
        ok(gateway.get("/v1/health", headers=first))
    failed(gateway.get("/v1/health", headers=first), 429, "RATE_LIMITED")
    ok(gateway.get("/v1/health", headers={"X-Forwarded-For": "198.51.100.8"}))
