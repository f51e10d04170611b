"""The provider client against fake providers served by httpx.MockTransport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import pytest

from leaky_tokens.shared.circuit_breaker import BreakerConfig
from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.tokens.provider_client import ProviderCallFailed, ProviderClient, ProviderSettings
from tests.httpx_outbound import HttpxOutbound

BASE_URLS = {"openai": "http://openai-stub:8093", "qwen": "http://qwen-stub:8091/"}
PAYLOAD = {"prompt": "Hello, AI!", "tokens": 50}
BREAKER = BreakerConfig(
    window_size=10,
    minimum_calls=3,
    failure_rate_threshold=0.5,
    open_seconds=30.0,
    half_open_max_calls=1,
)
# No back-off: the tests check what is retried, test_resilience checks the delays.
SETTINGS = ProviderSettings(
    timeout_seconds=1.0, attempts=2, base_delay=0.0, max_delay=0.0, breaker=BREAKER
)

Handler = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]


def stub_answer(request: httpx.Request) -> httpx.Response:
    provider = request.url.path.split("/")[3]
    return httpx.Response(
        200,
        json={
            "id": f"{provider}-0b6c1f7e",
            "provider": provider,
            "received": json.loads(request.content),
            "created": "2026-01-01T00:00:00Z",
            "message": f"Stubbed {provider} response",
            "usage": {"promptTokens": 3, "completionTokens": 5, "totalTokens": 8},
        },
    )


class FakeProvider:
    """Answers with the scripted responses in order, then like the stub; counts requests."""

    def __init__(self, *script: httpx.Response | Exception) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return step
        return stub_answer(request)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_client(
    clock: FakeClock,
) -> AsyncIterator[Callable[..., ProviderClient]]:
    clients: list[ProviderClient] = []

    def make(handler: Handler, settings: ProviderSettings = SETTINGS) -> ProviderClient:
        client = ProviderClient(
            BASE_URLS, settings, clock=clock, outbound=HttpxOutbound(httpx.MockTransport(handler))
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def server_error(status: int = 500) -> httpx.Response:
    return httpx.Response(status, json={"error": "injected fault"})


async def test_returns_the_providers_json_answer(
    make_client: Callable[..., ProviderClient],
) -> None:
    provider = FakeProvider()
    client = make_client(provider)

    answer = await client.chat("openai", PAYLOAD)

    assert answer["provider"] == "openai"
    assert answer["message"] == "Stubbed openai response"
    assert answer["received"] == PAYLOAD
    assert answer["usage"]["totalTokens"] == 8
    [request] = provider.requests
    assert request.method == "POST"
    assert str(request.url) == "http://openai-stub:8093/api/v1/openai/chat"


async def test_builds_the_url_from_a_base_url_with_trailing_slash(
    make_client: Callable[..., ProviderClient],
) -> None:
    provider = FakeProvider()
    await make_client(provider).chat("qwen", PAYLOAD)
    assert str(provider.requests[0].url) == "http://qwen-stub:8091/api/v1/qwen/chat"


async def test_retries_a_server_error_and_succeeds(
    make_client: Callable[..., ProviderClient],
) -> None:
    provider = FakeProvider(server_error(500))
    client = make_client(provider)

    answer = await client.chat("openai", PAYLOAD)

    assert answer["provider"] == "openai"
    assert len(provider.requests) == 2
    assert client.breaker_snapshots()["openai"]["failedCallsInWindow"] == 0


async def test_persistent_503_fails_after_all_attempts(
    make_client: Callable[..., ProviderClient],
) -> None:
    provider = FakeProvider(*[server_error(503)] * 5)
    client = make_client(provider)

    with pytest.raises(ProviderCallFailed) as caught:
        await client.chat("openai", PAYLOAD)

    assert len(provider.requests) == SETTINGS.attempts
    error = caught.value
    assert (error.status, error.code, error.message) == (
        502,
        "PROVIDER_ERROR",
        "provider call failed",
    )
    assert error.details == [{"provider": "openai", "reason": "provider answered 503"}]
    assert error.upstream_status == 503
    # All tries of one call are one breaker failure.
    snapshot = client.breaker_snapshots()["openai"]
    assert (snapshot["callsInWindow"], snapshot["failedCallsInWindow"]) == (1, 1)


async def test_connection_refused_is_a_retried_failure(
    make_client: Callable[..., ProviderClient],
) -> None:
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    provider = FakeProvider(refused, refused)
    client = make_client(provider)

    with pytest.raises(ProviderCallFailed) as caught:
        await client.chat("openai", PAYLOAD)

    assert len(provider.requests) == 2
    assert caught.value.reason == "provider unreachable"
    assert "openai-stub" not in json.dumps(caught.value.details)


async def test_transport_timeout_is_a_retried_failure(
    make_client: Callable[..., ProviderClient],
) -> None:
    provider = FakeProvider(httpx.ReadTimeout("timed out"), httpx.ReadTimeout("timed out"))
    client = make_client(provider)

    with pytest.raises(ProviderCallFailed) as caught:
        await client.chat("openai", PAYLOAD)

    assert len(provider.requests) == 2
    assert caught.value.reason == "no answer within 1s"


async def test_a_provider_slower_than_the_timeout_is_cut_off(
    make_client: Callable[..., ProviderClient],
) -> None:
    calls = 0

    async def slow_then_fast(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(10)
        return stub_answer(request)

    settings = ProviderSettings(timeout_seconds=0.05, attempts=2, base_delay=0.0, max_delay=0.0)
    client = make_client(slow_then_fast, settings)

    answer = await asyncio.wait_for(client.chat("openai", PAYLOAD), timeout=5)

    assert answer["provider"] == "openai"
    assert calls == 2


async def test_a_body_that_is_not_json_is_a_failure(
    make_client: Callable[..., ProviderClient],
) -> None:
    html = httpx.Response(200, text="<html>Bad gateway</html>")
    provider = FakeProvider(html, html)
    client = make_client(provider)

    with pytest.raises(ProviderCallFailed) as caught:
        await client.chat("openai", PAYLOAD)

    assert len(provider.requests) == 2
    assert caught.value.reason == "provider answered a body that is not JSON"
    assert client.breaker_snapshots()["openai"]["failedCallsInWindow"] == 1


async def test_a_client_error_is_neither_retried_nor_a_breaker_failure(
    make_client: Callable[..., ProviderClient],
) -> None:
    provider = FakeProvider(*[httpx.Response(400, json={"error": "bad prompt"})] * 5)
    client = make_client(provider)

    for _ in range(BREAKER.minimum_calls):
        with pytest.raises(ProviderCallFailed) as caught:
            await client.chat("openai", PAYLOAD)
        assert caught.value.upstream_status == 400
        assert caught.value.reason == "provider rejected the request (400)"

    assert len(provider.requests) == BREAKER.minimum_calls
    snapshot = client.breaker_snapshots()["openai"]
    assert snapshot["state"] == "closed"
    assert snapshot["failedCallsInWindow"] == 0


async def test_breaker_opens_then_fails_fast_then_half_opens(
    make_client: Callable[..., ProviderClient], clock: FakeClock
) -> None:
    provider = FakeProvider(*[server_error(503)] * (BREAKER.minimum_calls * SETTINGS.attempts))
    client = make_client(provider)

    for _ in range(BREAKER.minimum_calls):
        with pytest.raises(ProviderCallFailed):
            await client.chat("openai", PAYLOAD)
    assert client.breaker_snapshots()["openai"]["state"] == "open"
    tries_so_far = len(provider.requests)

    clock.advance(10)
    with pytest.raises(ProviderCallFailed) as caught:
        await client.chat("openai", PAYLOAD)
    assert caught.value.reason == "circuit breaker open"
    assert caught.value.retry_after_seconds == pytest.approx(20.0)
    assert len(provider.requests) == tries_so_far  # failed fast, nothing sent
    # Each provider has its own breaker.
    assert (await client.chat("qwen", PAYLOAD))["provider"] == "qwen"

    clock.advance(20)
    assert client.breaker_snapshots()["openai"]["state"] == "half_open"
    answer = await client.chat("openai", PAYLOAD)  # the script is used up: the stub answers
    assert answer["provider"] == "openai"
    assert client.breaker_snapshots()["openai"]["state"] == "closed"


async def test_failed_probe_reopens_the_breaker(
    make_client: Callable[..., ProviderClient], clock: FakeClock
) -> None:
    provider = FakeProvider(*[server_error(503)] * ((BREAKER.minimum_calls + 1) * 2))
    client = make_client(provider)
    for _ in range(BREAKER.minimum_calls):
        with pytest.raises(ProviderCallFailed):
            await client.chat("openai", PAYLOAD)
    clock.advance(BREAKER.open_seconds)

    with pytest.raises(ProviderCallFailed) as caught:
        await client.chat("openai", PAYLOAD)

    assert caught.value.reason == "provider answered 503"
    assert client.breaker_snapshots()["openai"]["state"] == "open"


async def test_a_full_bulkhead_refuses_without_calling_the_provider(
    make_client: Callable[..., ProviderClient],
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()
    requests = 0

    async def held(request: httpx.Request) -> httpx.Response:
        nonlocal requests
        requests += 1
        entered.set()
        await release.wait()
        return stub_answer(request)

    settings = ProviderSettings(
        timeout_seconds=5.0, attempts=1, max_concurrent=1, max_wait_seconds=0.01
    )
    client = make_client(held, settings)
    first = asyncio.create_task(client.chat("openai", PAYLOAD))
    await entered.wait()

    with pytest.raises(ProviderCallFailed) as caught:
        await client.chat("openai", PAYLOAD)
    assert caught.value.reason == "too many concurrent calls"
    assert requests == 1

    release.set()
    assert (await first)["provider"] == "openai"
    snapshot = client.breaker_snapshots()["openai"]
    assert (snapshot["callsInWindow"], snapshot["failedCallsInWindow"]) == (1, 0)


async def test_an_unknown_provider_is_a_programming_error(
    make_client: Callable[..., ProviderClient],
) -> None:
    provider = FakeProvider()
    with pytest.raises(ValueError):
        await make_client(provider).chat("mistral", PAYLOAD)
    assert provider.requests == []


async def test_snapshots_cover_every_provider(make_client: Callable[..., ProviderClient]) -> None:
    snapshots: dict[str, dict[str, Any]] = make_client(FakeProvider()).breaker_snapshots()
    assert set(snapshots) == {"openai", "qwen"}
    assert snapshots["qwen"]["state"] == "closed"


async def test_closes_its_http_client() -> None:
    async with ProviderClient(
        BASE_URLS, SETTINGS, outbound=HttpxOutbound(httpx.MockTransport(stub_answer))
    ) as client:
        assert (await client.chat("openai", PAYLOAD))["provider"] == "openai"
    with pytest.raises(RuntimeError):
        await client.chat("openai", PAYLOAD)
