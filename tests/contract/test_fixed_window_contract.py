"""Every backend of the one fixed-window limiter (memory, Redis) keeps the same contract; the
gateway's request limits and the login throttle both stand on it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest
import redis.asyncio as redis

from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.rate_limit import (
    FixedWindowLimiter,
    MemoryFixedWindowLimiter,
    Policy,
    RedisFixedWindowLimiter,
    limit_headers,
)
from leaky_tokens.shared.redis import RedisGuard, RedisUnavailable, redis_client
from tests.live_server import closed_port

WINDOW = 2  # seconds: long enough to count in, short enough to wait out on Redis


@dataclass
class Backend:
    name: str
    limiter: FixedWindowLimiter
    pass_time: Callable[[float], Awaitable[None]]
    now: Callable[[], float]  # the wall clock the backend's Reset is measured against
    # Limiters sharing this backend's state, as replicas would (Redis: own connections).
    replicas: list[FixedWindowLimiter] = field(default_factory=list)
    clients: list[redis.Redis] = field(default_factory=list)
    prefix: str = ""


@pytest.fixture(params=["memory", "redis"])
def backend_setup(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        limiter = MemoryFixedWindowLimiter(clock)
        return Backend(
            "memory", limiter, advance, lambda: clock.now().timestamp(), replicas=[limiter] * 4
        )
    # Chosen in a synchronous fixture so that redis_url can skip the variant with its reason.
    url = cast("str", request.getfixturevalue("redis_url"))
    prefix = f"lt:test:win:{uuid.uuid4().hex}:"
    clients = [redis_client(url) for _ in range(4)]
    replicas: list[FixedWindowLimiter] = [
        RedisFixedWindowLimiter(RedisGuard(c, "test"), prefix=prefix) for c in clients
    ]
    return Backend("redis", replicas[0], asyncio.sleep, time.time, replicas, clients, prefix)


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
    decisions = [await backend.limiter.hit([("key:a", p)]) for _ in range(8)]

    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0, 0]
    assert [d.count for d in decisions] == [1, 2, 3, 4, 5, 5, 5, 5]
    assert {d.limit for d in decisions} == {5}


async def test_reset_is_when_the_window_closes_in_epoch_seconds(backend: Backend) -> None:
    p = policy(limit=1, window=60)
    before = backend.now()
    first = await backend.limiter.hit([("key:a", p)])
    refused = await backend.limiter.hit([("key:a", p)])

    assert before + 59 <= first.reset_at <= before + 62
    assert 59 <= first.reset_after <= 60
    assert not refused.allowed
    assert 1 <= refused.retry_after <= 60
    # A refusal is not counted: it does not move the window either.
    assert refused.reset_at == first.reset_at


async def test_the_window_is_fixed_from_the_first_hit(backend: Backend) -> None:
    p = policy(limit=10)
    first = await backend.limiter.hit([("k", p)])
    await backend.pass_time(0.5)

    second = await backend.limiter.hit([("k", p)])

    assert second.reset_after <= first.reset_after - 0.4


async def test_a_new_window_opens_after_the_old_one_closes(backend: Backend) -> None:
    p = policy(limit=2)
    for _ in range(3):
        await backend.limiter.hit([("key:a", p)])

    await backend.pass_time(WINDOW + 0.1)

    assert (await backend.limiter.peek("key:a", p)).count == 0
    again = await backend.limiter.hit([("key:a", p)])
    assert again.allowed
    assert again.remaining == 1
    assert WINDOW - 0.2 < again.reset_after <= WINDOW


async def test_refused_requests_do_not_count(backend: Backend) -> None:
    p = policy(limit=3)
    for _ in range(3 + 50):
        await backend.limiter.hit([("key:a", p)])
    await backend.pass_time(WINDOW + 0.1)

    allowed = [(await backend.limiter.hit([("key:a", p)])).allowed for _ in range(4)]
    assert allowed == [True, True, True, False]


async def test_keys_and_policies_have_their_own_windows(backend: Backend) -> None:
    default, login = policy(limit=2), policy(limit=1, name="POST /api/v1/auth/login")
    for _ in range(3):
        await backend.limiter.hit([("key:a", default)])

    assert (await backend.limiter.hit([("key:b", default)])).allowed
    assert (await backend.limiter.hit([("ip:203.0.113.7", default)])).allowed
    assert (await backend.limiter.hit([("key:a", login)])).allowed
    assert not (await backend.limiter.hit([("key:a", login)])).allowed


async def test_several_limits_count_together_or_not_at_all(backend: Backend) -> None:
    per_key, per_user = policy(limit=5, name="default"), policy(limit=3, name="user")
    a = [await backend.limiter.hit([("key:a", per_key), ("user:u", per_user)]) for _ in range(2)]
    # Another key of the same user: the user's limit is shared.
    b = [await backend.limiter.hit([("key:b", per_key), ("user:u", per_user)]) for _ in range(3)]

    assert [d.allowed for d in a + b] == [True, True, True, False, False]
    assert b[0].policy.name == "user"  # the tightest limit speaks
    assert b[0].remaining == 0
    # The refused calls were counted nowhere: key:b has used one of its five.
    assert (await backend.limiter.peek("key:b", per_key)).count == 1
    assert (await backend.limiter.peek("user:u", per_user)).count == 3


async def test_peek_reports_without_counting(backend: Backend) -> None:
    p = policy(limit=3, window=60)
    empty = await backend.limiter.peek("k", p)
    assert (empty.count, empty.reset_after, empty.allowed) == (0, 0.0, True)
    await backend.limiter.hit([("k", p)])
    await backend.limiter.hit([("k", p)])

    first, second = await backend.limiter.peek("k", p), await backend.limiter.peek("k", p)

    assert first.count == second.count == 2
    assert first.allowed
    assert 0 < second.reset_after <= first.reset_after <= 60
    await backend.limiter.hit([("k", p)])
    assert not (await backend.limiter.peek("k", p)).allowed


async def test_clear_forgets_the_count(backend: Backend) -> None:
    p = policy(limit=10, window=60)
    for _ in range(3):
        await backend.limiter.hit([("k", p)])

    await backend.limiter.clear("k", p)
    await backend.limiter.clear("never-hit", p)

    assert (await backend.limiter.peek("k", p)).count == 0
    assert (await backend.limiter.hit([("k", p)])).count == 1


async def test_replicas_hammering_one_key_admit_exactly_the_limit(backend: Backend) -> None:
    p = policy(limit=120, window=60)

    async def burst(limiter: FixedWindowLimiter) -> list[bool]:
        return [(await limiter.hit([("key:shared", p)])).allowed for _ in range(60)]

    results = await asyncio.gather(*(burst(r) for r in backend.replicas))

    assert sum(sum(r) for r in results) == 120
    assert (await backend.limiter.peek("key:shared", p)).count == 120


async def test_headers_carry_the_decision(backend: Backend) -> None:
    p = policy(limit=3, window=60)
    decision = await backend.limiter.hit([("key:a", p)])

    headers = limit_headers(decision)

    assert headers["X-RateLimit-Limit"] == "3"
    assert headers["X-RateLimit-Remaining"] == "2"
    assert headers["X-RateLimit-Reset"] == str(decision.reset_at)
    assert headers["RateLimit-Policy"] == '"default";q=3;w=60'
    assert headers["RateLimit"] == f'"default";r=2;t={int(decision.reset_after + 0.999)}'


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    p = policy(limit=1, window=600)
    afters = [0.0, 0.2, 1.0, 3.01, 600.0]
    decisions = [MemoryFixedWindowLimiter().hit_now([(str(s), p)]) for s in afters]
    assert all(d.retry_after >= 1 for d in decisions)
    from leaky_tokens.shared.rate_limit import Decision

    assert [Decision(False, p, 1, s, 0).retry_after for s in afters] == [1, 1, 1, 4, 600]


async def test_redis_replicas_agree_on_the_window_whatever_their_clocks(redis_url: str) -> None:
    prefix = f"lt:test:win:{uuid.uuid4().hex}:"
    clients = [redis_client(redis_url) for _ in "ab"]
    a, b = (RedisFixedWindowLimiter(RedisGuard(c, "test"), prefix=prefix) for c in clients)
    try:
        p = policy(limit=10, window=60)
        first = await a.hit([("key:a", p)])
        second = await b.hit([("key:a", p)])

        assert second.remaining == first.remaining - 1
        assert abs(second.reset_at - first.reset_at) <= 1  # both from Redis TIME + the key's TTL
    finally:
        keys = [k async for k in clients[0].scan_iter(match=f"{prefix}*")]
        if keys:
            await clients[0].delete(*keys)
        for client in clients:
            await client.aclose()


async def test_without_redis_decisions_fall_back_to_this_process() -> None:
    client = redis_client(f"redis://127.0.0.1:{closed_port()}/0")
    limiter = RedisFixedWindowLimiter(
        RedisGuard(client, "test"), prefix="lt:x:", fallback=MemoryFixedWindowLimiter(FakeClock())
    )
    try:
        p = policy(limit=2)
        decisions = [await limiter.hit([("key:a", p)]) for _ in range(3)]
    finally:
        await limiter.aclose()
        await client.aclose()

    assert [d.allowed for d in decisions] == [True, True, False]


async def test_without_redis_a_closed_limiter_refuses_with_503() -> None:
    client = redis_client(f"redis://127.0.0.1:{closed_port()}/0")
    limiter = RedisFixedWindowLimiter(
        RedisGuard(client, "test", on_failure="closed"), prefix="lt:x:"
    )
    try:
        with pytest.raises(RedisUnavailable) as refused:
            await limiter.hit([("key:a", policy())])
    finally:
        await client.aclose()

    assert refused.value.status == 503
    assert refused.value.headers["X-Service-Outage"] == "true"


def test_a_full_memory_limiter_forgets_the_oldest_windows_not_all() -> None:
    clock = FakeClock()
    limiter = MemoryFixedWindowLimiter(clock, max_keys=100)
    p = policy(limit=1, window=60)
    limiter.hit_now([("ip:first", p)])
    for i in range(99):
        limiter.hit_now([(f"ip:{i}", p)])
    limiter.hit_now([("ip:new", p)])  # full: the oldest tenth goes

    assert limiter.hit_now([("ip:first", p)]).allowed  # forgotten, so allowed again
    assert not limiter.hit_now([("ip:98", p)]).allowed  # recent windows are kept
    assert not limiter.hit_now([("ip:new", p)]).allowed
