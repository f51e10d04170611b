"""Rate limits at the edge: per principal, on every answer, 429 with Retry-After, per route."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from leaky_tokens.shared.errors import ServiceUnavailable
from tests.gateway.gateway_harness import LIMIT_HEADERS, Gateway, assert_error, running_gateway


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with running_gateway(rate_limit_requests=5, rate_limit_window_seconds=60) as gateway:
        yield gateway


async def test_every_answer_says_where_the_caller_stands(gw: Gateway) -> None:
    key = gw.auth.add_key()
    client = gw.client()
    now = gw.clock.now().timestamp()

    answers = [
        await client.get("/api/v1/tokens/status", headers={"X-Api-Key": key}) for _ in range(3)
    ]

    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [r.headers["x-ratelimit-limit"] for r in answers] == ["5", "5", "5"]
    assert [r.headers["x-ratelimit-remaining"] for r in answers] == ["4", "3", "2"]
    reset = int(answers[0].headers["x-ratelimit-reset"])
    assert now + 59 <= reset <= now + 61  # epoch seconds, not seconds-from-now
    assert answers[0].headers["ratelimit-policy"] == '"default";q=5;w=60'
    assert answers[2].headers["ratelimit"] == '"default";r=2;t=60'


async def test_refusals_and_errors_carry_the_headers_too(gw: Gateway) -> None:
    gw.auth.keys["leaky_down"] = ServiceUnavailable("auth down")
    answers = [
        await gw.client().get("/api/v1/tokens/quota"),  # 401
        await gw.client().get("/nowhere"),  # 404
        await gw.client().get("/api/v1/tokens/quota", headers={"X-Api-Key": "leaky_down"}),
    ]

    assert [r.status_code for r in answers] == [401, 404, 503]
    for response in answers:
        for name in LIMIT_HEADERS:
            assert name in response.headers
    # all three were charged to the caller's address, one each
    assert [r.headers["x-ratelimit-remaining"] for r in answers] == ["4", "3", "2"]


async def test_past_the_limit_it_is_429_with_retry_after_and_nothing_is_forwarded(
    gw: Gateway,
) -> None:
    key = gw.auth.add_key()
    client = gw.client()
    answers = [
        await client.get("/api/v1/tokens/status", headers={"X-Api-Key": key}) for _ in range(8)
    ]

    assert [r.status_code for r in answers] == [200] * 5 + [429] * 3
    assert len(gw.upstream.seen) == 5
    refused = answers[-1]
    body = assert_error(refused, 429, "RATE_LIMITED")
    assert body["message"] == "rate limit exceeded"
    assert body["retryAfterSeconds"] == int(refused.headers["retry-after"])
    assert 1 <= body["retryAfterSeconds"] <= 60
    assert refused.headers["x-ratelimit-remaining"] == "0"


async def test_the_limit_recovers_when_the_window_closes(gw: Gateway) -> None:
    key = gw.auth.add_key()
    client = gw.client()
    for _ in range(6):
        await client.get("/api/v1/tokens/status", headers={"X-Api-Key": key})
    refused = await client.get("/api/v1/tokens/status", headers={"X-Api-Key": key})
    assert refused.status_code == 429

    gw.clock.advance(int(refused.headers["retry-after"]))

    again = await client.get("/api/v1/tokens/status", headers={"X-Api-Key": key})
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining"] == "4"


async def test_each_principal_has_its_own_limit(gw: Gateway) -> None:
    user = uuid.uuid4()
    key_a, key_b = gw.auth.add_key(user_id=user), gw.auth.add_key(user_id=user)
    token = gw.auth.add_token(user_id=user)
    for _ in range(5):
        await gw.client().get("/api/v1/tokens/status", headers={"X-Api-Key": key_a})

    exhausted = await gw.client().get("/api/v1/tokens/status", headers={"X-Api-Key": key_a})
    other_key = await gw.client().get("/api/v1/tokens/status", headers={"X-Api-Key": key_b})
    same_user_by_jwt = await gw.client().get(
        "/api/v1/tokens/status", headers={"Authorization": f"Bearer {token}"}
    )
    anonymous = await gw.client().get("/api/v1/tokens/status")

    assert exhausted.status_code == 429
    assert other_key.headers["x-ratelimit-remaining"] == "4"
    assert same_user_by_jwt.headers["x-ratelimit-remaining"] == "4"
    assert anonymous.headers["x-ratelimit-remaining"] == "4"


async def test_anonymous_callers_are_limited_by_address_whatever_their_port_or_claims(
    gw: Gateway,
) -> None:
    answers = [
        await gw.client(ip="198.51.100.5", port=10_000 + i).get(
            "/api/v1/tokens/status", headers={"X-Forwarded-For": f"10.0.0.{i}"}
        )
        for i in range(6)
    ]
    elsewhere = await gw.client(ip="198.51.100.6").get("/api/v1/tokens/status")

    assert [r.status_code for r in answers] == [200] * 5 + [429]
    assert elsewhere.status_code == 200


async def test_bad_credentials_are_charged_to_the_address_not_to_the_key(gw: Gateway) -> None:
    key = gw.auth.add_key()  # "leaky_guess" is no key at all
    for _ in range(5):
        await gw.client(ip="198.51.100.66").get(
            "/api/v1/tokens/quota", headers={"X-Api-Key": "leaky_guess"}
        )

    guessing = await gw.client(ip="198.51.100.66").get(
        "/api/v1/tokens/quota", headers={"X-Api-Key": "leaky_guess"}
    )
    owner = await gw.client(ip="198.51.100.66").get(
        "/api/v1/tokens/quota", headers={"X-Api-Key": key}
    )

    assert guessing.status_code == 429  # the guesser's address ran out
    assert owner.status_code == 200  # the key's owner did not pay for it
    assert owner.headers["x-ratelimit-remaining"] == "4"


async def test_a_route_override_replaces_the_default() -> None:
    login = {"path": "/api/v1/auth/login", "method": "POST", "limit": 2, "window_seconds": 30}
    async with running_gateway(route_limits=[login]) as gw:
        client = gw.client()
        logins = [await client.post("/api/v1/auth/login", json={}) for _ in range(3)]
        other = await client.get("/api/v1/tokens/status")

    assert [r.status_code for r in logins] == [200, 200, 429]
    assert logins[0].headers["ratelimit-policy"] == '"POST /api/v1/auth/login";q=2;w=30'
    assert other.status_code == 200
    assert other.headers["x-ratelimit-limit"] == "120"
    assert other.headers["x-ratelimit-remaining"] == "119"


async def test_the_gateways_own_health_and_metrics_are_not_limited(gw: Gateway) -> None:
    for _ in range(10):
        metrics = await gw.client().get("/metrics")
        assert metrics.status_code == 200
    assert "x-ratelimit-limit" not in metrics.headers
    assert 'gateway_rate_limited_requests_total{policy="default"}' not in metrics.text


async def test_refusals_are_counted_in_metrics(gw: Gateway) -> None:
    for _ in range(7):
        await gw.client().get("/api/v1/tokens/status")
    await gw.client().get("/api/v1/tokens/quota", headers={"X-Api-Key": "leaky_x"})

    metrics = (await gw.client(ip="192.0.2.1").get("/metrics")).text

    assert 'gateway_rate_limited_requests_total{policy="default"} 3.0' in metrics
    route = 'route="/api/v1/tokens/**",service="gateway",status="429"'
    assert f'http_requests_total{{method="GET",{route}}} 3.0' in metrics


async def test_gateways_on_one_redis_share_one_limit(redis_url: str) -> None:
    prefix = f"lt:test:gw:{uuid.uuid4().hex}:"
    settings = {"rate_limit_requests": 6, "rate_limit_key_prefix": prefix}
    async with (
        running_gateway(redis_url=redis_url, **settings) as first,
        running_gateway(redis_url=redis_url, **settings) as second,
    ):
        answers = [
            await gateway.client(ip="198.51.100.77").get("/api/v1/tokens/status")
            for gateway in (first, second) * 5
        ]

    assert [r.status_code for r in answers] == [200] * 6 + [429] * 4
    assert [r.headers["x-ratelimit-remaining"] for r in answers[:6]] == [
        "5",
        "4",
        "3",
        "2",
        "1",
        "0",
    ]
