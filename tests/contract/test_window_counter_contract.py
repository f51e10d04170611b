"""Every WindowCounter backend (memory, Redis) honours the same fixed-window contract."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest
import redis.asyncio as redis

from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.counters import (
    MemoryWindowCounter,
    RedisWindowCounter,
    WindowCounter,
    retry_after_seconds,
)

WINDOW = 60


@dataclass
class Backend:
    name: str
    counter: WindowCounter
    pass_time: Callable[[float], Awaitable[None]]  # let at least this many seconds go by
    # Counters sharing this backend's state, as other replicas would (Redis: own connections).
    replicas: list[WindowCounter] = field(default_factory=list)
    clients: list[redis.Redis] = field(default_factory=list)


@pytest.fixture(params=["memory", "redis"])
def backend_setup(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        counter = MemoryWindowCounter(clock)
        return Backend("memory", counter, advance, replicas=[counter] * 4)
    # Chosen in a synchronous fixture so that redis_url can skip the variant with its reason.
    url = cast("str", request.getfixturevalue("redis_url"))
    prefix = f"lt:test:win:{uuid.uuid4().hex}:"
    clients = [redis.Redis.from_url(url) for _ in range(4)]
    replicas: list[WindowCounter] = [RedisWindowCounter(c, prefix=prefix) for c in clients]
    return Backend("redis", replicas[0], asyncio.sleep, replicas=replicas, clients=clients)


@pytest.fixture
async def backend(backend_setup: Backend) -> AsyncIterator[Backend]:
    yield backend_setup
    if backend_setup.clients:
        first = backend_setup.clients[0]
        prefix = cast("RedisWindowCounter", backend_setup.counter)._prefix
        keys = [key async for key in first.scan_iter(match=f"{prefix}*")]
        if keys:
            await first.delete(*keys)
        for client in backend_setup.clients:
            await client.aclose()


async def test_hits_count_up_within_a_window(backend: Backend) -> None:
    counts = []
    for _ in range(3):
        count, seconds_left = await backend.counter.hit("k", WINDOW)
        counts.append(count)
        assert 0 < seconds_left <= WINDOW

    assert counts == [1, 2, 3]


async def test_keys_are_counted_separately(backend: Backend) -> None:
    await backend.counter.hit("a", WINDOW)
    await backend.counter.hit("a", WINDOW)

    assert (await backend.counter.hit("b", WINDOW))[0] == 1
    assert (await backend.counter.peek("a"))[0] == 2


async def test_peek_reports_without_counting(backend: Backend) -> None:
    assert await backend.counter.peek("k") == (0, 0.0)
    await backend.counter.hit("k", WINDOW)
    await backend.counter.hit("k", WINDOW)

    first, second = await backend.counter.peek("k"), await backend.counter.peek("k")

    assert first[0] == second[0] == 2
    assert 0 < second[1] <= first[1] <= WINDOW
    assert (await backend.counter.hit("k", WINDOW))[0] == 3


async def test_the_window_is_fixed_from_the_first_hit(backend: Backend) -> None:
    _, left_at_first = await backend.counter.hit("k", 2)
    await backend.pass_time(0.5)

    _, left_at_second = await backend.counter.hit("k", 2)

    assert left_at_second <= left_at_first - 0.4


async def test_the_count_starts_again_when_the_window_ends(backend: Backend) -> None:
    await backend.counter.hit("k", 1)
    await backend.counter.hit("k", 1)

    await backend.pass_time(1.05)

    assert await backend.counter.peek("k") == (0, 0.0)
    count, seconds_left = await backend.counter.hit("k", 1)
    assert count == 1
    assert 0.9 < seconds_left <= 1


async def test_clear_forgets_the_count(backend: Backend) -> None:
    for _ in range(3):
        await backend.counter.hit("k", WINDOW)

    await backend.counter.clear("k")
    await backend.counter.clear("never-hit")

    assert await backend.counter.peek("k") == (0, 0.0)
    assert (await backend.counter.hit("k", WINDOW))[0] == 1


async def test_concurrent_hits_are_each_counted_exactly_once(backend: Backend) -> None:
    # 200 hits at once, spread over the replicas (4 Redis connections): none lost, none doubled.
    hits = [backend.replicas[i % 4].hit("hot", WINDOW) for i in range(200)]

    results = await asyncio.gather(*hits)

    assert sorted(count for count, _ in results) == list(range(1, 201))
    assert (await backend.counter.peek("hot"))[0] == 200


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert [retry_after_seconds(s) for s in (0.0, 0.2, 1.0, 3.01, 600.0)] == [1, 1, 1, 4, 600]
