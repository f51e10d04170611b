"""The gateway while its Redis is black-holed or stopped, mid-load (issue 9, defect 2): with the
hand-written client four concurrent requests finished after 2, 4, 6 and 8 s. Now each request
waits at most about one command timeout, the gateway answers as its settings say (per-process
limits, or 503 in our shape), and it goes back to Redis by itself once Redis answers again.

Redis is reached through tests/redis_proxy.py, so the shared test Redis is never stopped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.gateway.gateway_harness import ERROR_KEYS, Gateway, running_gateway
from tests.polling import eventually
from tests.redis_proxy import RedisProxy, assert_no_stall, redis_proxy

TIMEOUT = 0.5  # the configured connect and command timeouts
REDIS = {
    "connect_timeout_seconds": TIMEOUT,
    "command_timeout_seconds": TIMEOUT,
    "fail_fast_seconds": 0.5,
}


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[RedisProxy]:
    async with redis_proxy(redis_url) as running:
        yield running


def fallbacks(gw: Gateway) -> float:
    value = gw.app.state.metrics.registry.get_sample_value(
        "redis_fallback_decisions_total", {"component": "gateway_limits", "mode": "fallback"}
    )
    return value or 0.0


class Load:
    """Eight callers, each with its own key, calling until stopped; every answer is recorded
    with how long it took."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.answers: list[tuple[float, httpx.Response]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        for i in range(8):
            key = self.gw.auth.add_key()
            client = self.gw.client(ip=f"198.51.100.{i + 1}")
            self._tasks.append(asyncio.create_task(self._call(client, key)))
        return self

    async def _call(self, client: httpx.AsyncClient, key: str) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            response = await client.get("/api/v1/tokens/status", headers={"X-Api-Key": key})
            self.answers.append((time.monotonic() - started, response))
            await asyncio.sleep(0.01)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def since(self, n: int) -> list[tuple[float, httpx.Response]]:
        return self.answers[n:]


async def answered_after(load: Load, n: int, count: int) -> None:
    await eventually(lambda: len(load.answers) >= n + count, within=30, what=f"{count} answers")


@pytest.mark.parametrize("outage", ["black hole", "down"])
async def test_an_outage_mid_load_costs_each_request_one_timeout_and_heals_itself(
    proxy: RedisProxy, outage: str
) -> None:
    async with (
        running_gateway(redis_url=proxy.url, redis=REDIS, rate_limit_requests=100_000) as gw,
        Load(gw) as load,
    ):
        await answered_after(load, 0, 16)
        await proxy.set(outage)  # type: ignore[arg-type]
        during = len(load.answers)
        await answered_after(load, during, 40)
        await proxy.set("up")
        back = len(load.answers)

        # Back on Redis by itself: decisions stop falling back within seconds.
        async def decided_in_redis() -> bool:
            before = fallbacks(gw)
            mark = len(load.answers)
            await answered_after(load, mark, 16)
            return fallbacks(gw) == before

        await eventually(decided_in_redis, within=20, what="limits decided in Redis again")

    for _, response in load.since(during):
        assert response.status_code == 200, response.text  # per-process limits meanwhile
    assert_no_stall([seconds for seconds, _ in load.answers[during:back]], TIMEOUT)
    assert fallbacks(gw) > 0
    assert all(r.status_code == 200 for _, r in load.since(back))


async def test_concurrent_requests_in_a_black_hole_do_not_queue_behind_each_other(
    proxy: RedisProxy,
) -> None:
    async with running_gateway(redis_url=proxy.url, redis=REDIS) as gw:
        keys = [gw.auth.add_key() for _ in range(8)]
        await gw.client().get("/api/v1/tokens/status", headers={"X-Api-Key": keys[0]})
        await proxy.set("black hole")
        started = time.monotonic()
        answers = await asyncio.gather(
            *(
                gw.client(ip=f"198.51.100.{i}").get(
                    "/api/v1/tokens/status", headers={"X-Api-Key": key}
                )
                for i, key in enumerate(keys)
            )
        )
        elapsed = time.monotonic() - started

    assert [a.status_code for a in answers] == [200] * 8
    # One after the other they would take 8 timeouts or more.
    assert elapsed < 8 * TIMEOUT


async def test_failing_closed_is_503_in_our_shape_never_500_and_heals(proxy: RedisProxy) -> None:
    closed = {**REDIS, "on_failure": "closed"}
    async with running_gateway(redis_url=proxy.url, redis=closed) as gw:
        key = gw.auth.add_key()
        client = gw.client()
        assert (
            await client.get("/api/v1/tokens/status", headers={"X-Api-Key": key})
        ).status_code == 200
        await proxy.set("down")
        refused = [
            await client.get("/api/v1/tokens/status", headers={"X-Api-Key": key}) for _ in range(5)
        ]
        await proxy.set("up")

        async def answers_again() -> bool:
            response = await client.get("/api/v1/tokens/status", headers={"X-Api-Key": key})
            assert response.status_code in (200, 503), response.text
            return response.status_code == 200

        await eventually(answers_again, within=20, what="the gateway answering again")

    for response in refused:
        assert response.status_code == 503, response.text
        body = response.json()
        assert body.keys() >= ERROR_KEYS
        assert body["code"] == "REDIS_UNAVAILABLE"
        assert response.headers["retry-after"] == "1"
    assert len(gw.upstream.seen) >= 2  # nothing was forwarded while refused: before + after
