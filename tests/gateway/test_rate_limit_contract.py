"""Every gateway rate-limiter backend (memory, Redis) keeps the same contract."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest
import redis.asyncio as redis

from leaky_tokens.gateway.rate_limit import (
    HIT_SCRIPT,
    MemoryRateLimiter,
    Policy,
    RateLimiter,
    RedisRateLimiter,
    limit_headers,
)
from leaky_tokens.gateway.redis_script import ScriptClient
from leaky_tokens.shared.clock import FakeClock
from tests.live_server import closed_port

WINDOW = 2  # seconds: long enough to count in, short enough to wait out on Redis


@dataclass
class Backend:
    name: str
    limiter: RateLimiter
    pass_time: Callable[[float], Awaitable[None]]
    now: Callable[[], float]  # the wall clock the backend's Reset is measured against
    # Limiters sharing this backend's state, as gateway replicas would (Redis: own connections).
    replicas: list[RateLimiter] = field(default_factory=list)
    clients: list[redis.Redis] = field(default_factory=list)
    prefix: str = ""


@pytest.fixture(params=["memory", "redis", "redis-py"])
def backend_setup(request: pytest.FixtureRequest) -> Backend:
    """memory; Redis through the gateway's own pipelined client (what runs); Redis through
    redis-py's registered script (the reference the script is also correct with)."""
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        limiter = MemoryRateLimiter(clock)
        return Backend(
            "memory", limiter, advance, lambda: clock.now().timestamp(), replicas=[limiter] * 4
        )
    url = cast("str", request.getfixturevalue("redis_url"))
    prefix = f"lt:test:gw:{uuid.uuid4().hex}:"
    clients = [redis.Redis.from_url(url) for _ in range(4)]
    replicas: list[RateLimiter] = [
        RedisRateLimiter(
            ScriptClient(url, HIT_SCRIPT)
            if request.param == "redis"
            else client.register_script(HIT_SCRIPT),
            prefix=prefix,
        )
        for client in clients
    ]
    return Backend(
        request.param, replicas[0], asyncio.sleep, time.time, replicas, clients, prefix=prefix
    )


@pytest.fixture
async def backend(backend_setup: Backend) -> AsyncIterator[Backend]:
    yield backend_setup
    for limiter in backend_setup.replicas:
        await limiter.aclose()
    if backend_setup.clients:
        first = backend_setup.clients[0]
        keys = [key async for key in first.scan_iter(match=f"{backend_setup.prefix}*")]
        if keys:
            await first.delete(*keys)
        for client in backend_setup.clients:
            await client.aclose()


def policy(limit: int = 5, window: int = WINDOW, name: str = "default") -> Policy:
    return Policy(name, limit, window)


async def test_a_window_allows_exactly_the_limit(backend: Backend) -> None:
    p = policy(limit=5)
    decisions = [await backend.limiter.hit("key:a", p) for _ in range(8)]

    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0, 0]
    assert {d.limit for d in decisions} == {5}


async def test_reset_is_when_the_window_closes_in_epoch_seconds(backend: Backend) -> None:
    p = policy(limit=1, window=60)
    before = backend.now()
    first = await backend.limiter.hit("key:a", p)
    refused = await backend.limiter.hit("key:a", p)

    assert before + 59 <= first.reset_at <= before + 62
    assert 59 <= first.reset_after <= 60
    assert not refused.allowed
    assert 1 <= refused.retry_after <= 60
    # A refusal is not counted: it does not move the window either.
    assert refused.reset_at == first.reset_at


async def test_a_new_window_opens_after_the_old_one_closes(backend: Backend) -> None:
    p = policy(limit=2)
    for _ in range(3):
        await backend.limiter.hit("key:a", p)

    await backend.pass_time(WINDOW + 0.1)

    again = await backend.limiter.hit("key:a", p)
    assert again.allowed
    assert again.remaining == 1


async def test_refused_requests_do_not_count(backend: Backend) -> None:
    p = policy(limit=3)
    for _ in range(3 + 50):
        await backend.limiter.hit("key:a", p)
    await backend.pass_time(WINDOW + 0.1)

    allowed = [(await backend.limiter.hit("key:a", p)).allowed for _ in range(4)]
    assert allowed == [True, True, True, False]


async def test_principals_and_policies_have_their_own_windows(backend: Backend) -> None:
    default, login = policy(limit=2), policy(limit=1, name="POST /api/v1/auth/login")
    for _ in range(3):
        await backend.limiter.hit("key:a", default)

    assert (await backend.limiter.hit("key:b", default)).allowed
    assert (await backend.limiter.hit("ip:203.0.113.7", default)).allowed
    assert (await backend.limiter.hit("key:a", login)).allowed
    assert not (await backend.limiter.hit("key:a", login)).allowed


async def test_replicas_hammering_one_key_admit_exactly_the_limit(backend: Backend) -> None:
    p = policy(limit=120, window=60)

    async def burst(limiter: RateLimiter) -> list[bool]:
        return [(await limiter.hit("key:shared", p)).allowed for _ in range(60)]

    results = await asyncio.gather(*(burst(r) for r in backend.replicas))

    assert sum(sum(r) for r in results) == 120


async def test_headers_carry_the_decision(backend: Backend) -> None:
    p = policy(limit=3, window=60)
    decision = await backend.limiter.hit("key:a", p)

    headers = limit_headers(decision, p)

    assert headers["X-RateLimit-Limit"] == "3"
    assert headers["X-RateLimit-Remaining"] == "2"
    assert headers["X-RateLimit-Reset"] == str(decision.reset_at)
    assert headers["RateLimit-Policy"] == '"default";q=3;w=60'
    assert headers["RateLimit"] == f'"default";r=2;t={int(decision.reset_after + 0.999)}'


async def test_redis_replicas_agree_on_the_window_whatever_their_clocks(redis_url: str) -> None:
    prefix = f"lt:test:gw:{uuid.uuid4().hex}:"
    a, b = (RedisRateLimiter(ScriptClient(redis_url, HIT_SCRIPT), prefix=prefix) for _ in "ab")
    cleanup = redis.Redis.from_url(redis_url)
    try:
        p = policy(limit=10, window=60)
        first = await a.hit("key:a", p)
        second = await b.hit("key:a", p)

        assert second.remaining == first.remaining - 1
        assert abs(second.reset_at - first.reset_at) <= 1  # both from Redis TIME + the key's TTL
    finally:
        await a.aclose()
        await b.aclose()
        keys = [k async for k in cleanup.scan_iter(match=f"{prefix}*")]
        if keys:
            await cleanup.delete(*keys)
        await cleanup.aclose()


async def test_without_redis_decisions_fall_back_to_this_process() -> None:
    script = ScriptClient(f"redis://127.0.0.1:{closed_port()}/0", HIT_SCRIPT)
    limiter = RedisRateLimiter(script, fallback=MemoryRateLimiter(FakeClock()))
    try:
        p = policy(limit=2)
        decisions = [await limiter.hit("key:a", p) for _ in range(3)]
    finally:
        await limiter.aclose()

    assert [d.allowed for d in decisions] == [True, True, False]


def test_a_full_memory_limiter_forgets_the_oldest_windows_not_all() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock, max_keys=100)
    p = policy(limit=1, window=60)
    limiter.hit_now("ip:first", p)
    for i in range(99):
        limiter.hit_now(f"ip:{i}", p)
    limiter.hit_now("ip:new", p)  # full: the oldest tenth goes

    assert limiter.hit_now("ip:first", p).allowed  # forgotten, so allowed again
    assert not limiter.hit_now("ip:98", p).allowed  # recent windows are kept
    assert not limiter.hit_now("ip:new", p).allowed
