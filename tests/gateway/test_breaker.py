"""A circuit breaker per upstream: what opens it, what the caller gets while it is open, and
how it closes again."""

from __future__ import annotations

from tests.gateway.gateway_harness import Reply, assert_error, running_gateway
from tests.live_server import closed_port

FALLBACK_KEYS = {"service", "status", "message", "timestamp", "code", "requestId"}
OUTAGE = [(b"content-type", b"application/json"), (b"x-service-outage", b"true")]
BREAKER = {
    "breaker_window_size": 4,
    "breaker_minimum_calls": 3,
    "breaker_failure_rate": 0.5,
    "breaker_open_seconds": 5,
    "breaker_half_open_calls": 2,
}


async def test_a_stopped_upstream_opens_its_breaker_and_the_fallback_answers() -> None:
    async with running_gateway(upstream_url=f"http://127.0.0.1:{closed_port()}", **BREAKER) as gw:
        client = gw.client()
        failures = [await client.get("/api/v1/tokens/status") for _ in range(3)]
        fallback = await client.get("/api/v1/tokens/status")
        health = await client.get("/health")
        metrics = (await client.get("/metrics")).text

    for response in failures:
        body = assert_error(response, 503, "SERVICE_UNAVAILABLE")
        assert body["message"] == "token-service unreachable"
        assert body["service"] == "token-service"
    body = assert_error(fallback, 503, "SERVICE_UNAVAILABLE")
    assert set(body) == FALLBACK_KEYS
    assert body["service"] == "token-service"
    assert body["status"] == "unavailable"
    assert body["message"] == "Circuit breaker open"
    assert body["timestamp"].endswith("Z")
    assert 1 <= int(fallback.headers["retry-after"]) <= 5
    breakers = health.json()["circuitBreakers"]
    assert breakers["tokens"]["state"] == "open"
    assert breakers["auth"]["state"] == "closed"  # one breaker per upstream
    assert 'gateway_circuit_breaker_state{upstream="tokens"} 2.0' in metrics
    assert 'gateway_circuit_breaker_state{upstream="auth"} 0.0' in metrics
    assert 'gateway_upstream_failures_total{reason="open",upstream="tokens"} 1.0' in metrics


async def test_outage_503_answers_count_as_failures_but_pass_through_unchanged() -> None:
    async with running_gateway(**BREAKER) as gw:
        for _ in range(3):
            gw.upstream.reply(
                Reply(status=503, body=b'{"message":"database unavailable"}', headers=OUTAGE)
            )
        client = gw.client()
        passed = [await client.get("/api/v1/tokens/status") for _ in range(3)]
        refused = await client.get("/api/v1/tokens/status")

    assert [r.status_code for r in passed] == [503] * 3
    assert all(r.content == b'{"message":"database unavailable"}' for r in passed)
    assert refused.json()["message"] == "Circuit breaker open"
    assert len(gw.upstream.seen) == 3  # nothing reached the upstream while open


async def test_the_breaker_closes_after_the_open_wait_and_successful_probes() -> None:
    async with running_gateway(**BREAKER) as gw:
        for _ in range(3):
            gw.upstream.reply(Reply(status=503, headers=OUTAGE))
        client = gw.client()
        for _ in range(3):
            await client.get("/api/v1/tokens/status")
        assert (await client.get("/api/v1/tokens/status")).json()["message"] == (
            "Circuit breaker open"
        )

        gw.clock.advance(5)  # the open wait
        probes = [await client.get("/api/v1/tokens/status") for _ in range(2)]
        state = gw.app.state.edge.upstreams["tokens"].breaker.snapshot()["state"]
        after = await client.get("/api/v1/tokens/status")

    assert [p.status_code for p in probes] == [200, 200]
    assert state == "closed"
    assert after.status_code == 200


async def test_a_failed_probe_opens_the_breaker_again() -> None:
    async with running_gateway(**BREAKER) as gw:
        gw.upstream.reply(*[Reply(status=503, headers=OUTAGE)] * 4)
        client = gw.client()
        for _ in range(3):
            await client.get("/api/v1/tokens/status")
        gw.clock.advance(5)

        probe = await client.get("/api/v1/tokens/status")
        refused = await client.get("/api/v1/tokens/status")

    assert probe.status_code == 503  # the upstream's own answer
    assert refused.json()["message"] == "Circuit breaker open"


async def test_a_slow_upstream_is_a_timeout_and_counts() -> None:
    async with running_gateway(upstream_timeout_seconds=0.2, **BREAKER) as gw:
        gw.upstream.reply(*[Reply(delay=1.0)] * 3)
        client = gw.client()
        slow = [await client.get("/api/v1/tokens/status") for _ in range(3)]
        refused = await client.get("/api/v1/tokens/status")

    for response in slow:
        body = assert_error(response, 504, "GATEWAY_TIMEOUT")
        assert body["service"] == "token-service"
    assert refused.json()["message"] == "Circuit breaker open"


async def test_an_open_breaker_of_one_upstream_leaves_the_others_alone() -> None:
    async with running_gateway(**BREAKER) as gw:
        gw.upstream.reply(*[Reply(status=503, headers=OUTAGE)] * 3)
        client = gw.client()
        for _ in range(3):
            await client.get("/api/v1/tokens/status")

        tokens = await client.get("/api/v1/tokens/status")
        auth = await client.get("/api/v1/auth/health")

    assert tokens.json()["message"] == "Circuit breaker open"
    assert auth.status_code == 200


async def test_business_503s_about_one_callers_request_never_open_the_breaker() -> None:
    """Issue 9, defect 6: with purchases switched off, one user's PURCHASES_DISABLED answers
    opened the token service's breaker and cut every other user off for 30 s."""
    body = b'{"code":"PURCHASES_DISABLED","message":"purchases are switched off"}'
    async with running_gateway(**BREAKER) as gw:
        buyer, other = gw.auth.add_key(), gw.auth.add_key()
        for _ in range(10):
            gw.upstream.reply(Reply(status=503, body=body))
        refused = [
            await gw.client().post("/api/v1/tokens/purchase", headers={"X-Api-Key": buyer})
            for _ in range(10)
        ]
        others = [
            await gw.client(ip="198.51.100.77").get(
                "/api/v1/tokens/quota", headers={"X-Api-Key": other}
            )
            for _ in range(3)
        ]
        state = gw.app.state.edge.upstreams["tokens"].breaker.snapshot()

    assert [r.status_code for r in refused] == [503] * 10
    assert all(r.content == body for r in refused)  # passed through unchanged
    assert [r.status_code for r in others] == [200, 200, 200]
    assert state["state"] == "closed"
    assert state["failedCallsInWindow"] == 0
