"""Every LeakyBucketStore backend (memory, Redis) honours the same contract."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import pytest
import redis.asyncio as redis

from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.tokens.leaky_bucket import (
    BucketConfig,
    BucketDecision,
    LeakyBucketStore,
    MemoryLeakyBucket,
)
from leaky_tokens.tokens.leaky_bucket_redis import EXPIRY_MARGIN_MS, RedisLeakyBucket

SLOW = BucketConfig(capacity=10, leak_per_second=0.001)  # effectively no leak during a test
FAST = BucketConfig(capacity=10, leak_per_second=100.0)  # a token every 10 ms


@dataclass
class Backend:
    name: str
    store: LeakyBucketStore
    pass_time: Callable[[float], Awaitable[None]]  # let at least this many seconds go by
    elapsed_since: Callable[[float], float]  # seconds on the backend's clock since a mark
    mark: Callable[[], float]


def _pooled_client(redis_url: str, max_connections: int = 64) -> redis.Redis:
    # The default pool raises MaxConnectionsError past 100 commands in flight; hammering with
    # 500 needs callers to queue for a connection, as a service's client must too.
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=max_connections)
    return redis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


async def _delete_keys(client: redis.Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)


def _test_prefix() -> str:
    return f"lt:test:bucket:{uuid.uuid4().hex}:"


@pytest.fixture(params=["memory", "redis"])
def backend_setup(request: pytest.FixtureRequest) -> tuple[Backend, redis.Redis | None, str]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        memory = Backend(
            "memory",
            MemoryLeakyBucket(clock),
            advance,
            lambda start: clock.monotonic() - start,
            clock.monotonic,
        )
        return memory, None, ""
    # A synchronous fixture, so the variant can be chosen here: redis_url skips the test with
    # a reason when Redis is down. `backend` closes the client.
    client = _pooled_client(cast("str", request.getfixturevalue("redis_url")))
    prefix = _test_prefix()
    real = Backend(
        "redis",
        RedisLeakyBucket(client, prefix=prefix),
        asyncio.sleep,
        lambda start: time.monotonic() - start,
        time.monotonic,
    )
    return real, client, prefix


@pytest.fixture
async def backend(
    backend_setup: tuple[Backend, redis.Redis | None, str],
) -> AsyncIterator[Backend]:
    chosen, client, prefix = backend_setup
    yield chosen
    await chosen.store.close()
    if client is not None:
        await _delete_keys(client, prefix)
        await client.aclose()


async def test_admits_up_to_capacity_then_refuses(backend: Backend) -> None:
    store = backend.store
    for used in range(1, 11):
        decision = await store.acquire("u1", 1, SLOW)
        assert decision.allowed
        assert (decision.used, decision.remaining) == (used, 10 - used)
        assert decision.wait_seconds == 0
    refused = await store.acquire("u1", 1, SLOW)
    assert not refused.allowed
    assert not refused.exceeds_capacity
    assert refused.wait_seconds > 0
    assert (refused.used, refused.remaining) == (10, 0)


async def test_refusal_leaves_the_bucket_unchanged(backend: Backend) -> None:
    store = backend.store
    assert (await store.acquire("u1", 8, SLOW)).allowed
    refused = await store.acquire("u1", 5, SLOW)
    assert not refused.allowed
    assert refused.wait_seconds == pytest.approx(3 / SLOW.leak_per_second, rel=1e-3)
    assert (await store.peek("u1", SLOW)).used == 8
    assert (await store.acquire("u1", 2, SLOW)).allowed  # exactly the room that was left


async def test_admits_again_once_enough_has_leaked(backend: Backend) -> None:
    store = backend.store
    assert (await store.acquire("u1", 10, FAST)).allowed
    refused = await store.acquire("u1", 9, FAST)  # refused unless 90 ms went by already
    assert not refused.allowed
    assert 0 < refused.wait_seconds <= 0.09
    await backend.pass_time(0.06)  # >= 6 tokens leak at 100/s
    assert (await store.acquire("u1", 5, FAST)).allowed


async def test_release_refunds_admitted_tokens(backend: Backend) -> None:
    store = backend.store
    assert (await store.acquire("u1", 10, SLOW)).allowed
    await store.release("u1", 4, SLOW)
    assert (await store.peek("u1", SLOW)).used == 6
    assert (await store.acquire("u1", 4, SLOW)).allowed
    assert not (await store.acquire("u1", 1, SLOW)).allowed


async def test_release_floors_at_empty(backend: Backend) -> None:
    store = backend.store
    assert (await store.acquire("u1", 3, SLOW)).allowed
    await store.release("u1", 50, SLOW)
    assert (await store.peek("u1", SLOW)).used == 0
    assert (await store.acquire("u1", 10, SLOW)).allowed
    assert not (await store.acquire("u1", 1, SLOW)).allowed


async def test_release_of_an_unknown_key_changes_nothing(backend: Backend) -> None:
    await backend.store.release("nobody", 5, SLOW)
    state = await backend.store.peek("nobody", SLOW)
    assert (state.used, state.remaining) == (0, 10)


async def test_negative_amounts_are_programming_errors(backend: Backend) -> None:
    assert (await backend.store.acquire("u1", 5, SLOW)).allowed
    with pytest.raises(ValueError, match="amount"):
        await backend.store.acquire("u1", -1, SLOW)
    with pytest.raises(ValueError, match="amount"):
        await backend.store.release("u1", -1, SLOW)
    assert (await backend.store.peek("u1", SLOW)).used == 5


async def test_peek_admits_nothing(backend: Backend) -> None:
    store = backend.store
    empty = await store.peek("u1", SLOW)
    assert empty.allowed
    assert (empty.used, empty.remaining, empty.reset_seconds) == (0, 10, 0)
    assert (await store.acquire("u1", 3, SLOW)).allowed
    for _ in range(3):
        state = await store.peek("u1", SLOW)
        assert (state.used, state.remaining) == (3, 7)
        assert state.reset_seconds == pytest.approx(3 / SLOW.leak_per_second, rel=1e-3)
    assert (await store.acquire("u1", 7, SLOW)).allowed


async def test_distinct_keys_are_independent(backend: Backend) -> None:
    store = backend.store
    assert (await store.acquire("alice", 10, SLOW)).allowed
    assert not (await store.acquire("alice", 1, SLOW)).allowed
    bob = await store.acquire("bob", 10, SLOW)
    assert bob.allowed
    assert bob.used == 10


async def test_amount_above_capacity_is_refused_as_never_fitting(backend: Backend) -> None:
    store = backend.store
    assert (await store.acquire("u1", 4, SLOW)).allowed
    decision = await store.acquire("u1", 11, SLOW)
    assert decision.exceeds_capacity
    assert not decision.allowed
    assert decision.wait_seconds == 0
    assert (await store.peek("u1", SLOW)).used == 4
    fresh = await store.acquire("fresh", 11, SLOW)
    assert fresh.exceeds_capacity
    assert (await store.peek("fresh", SLOW)).used == 0


async def test_concurrent_acquires_admit_exactly_what_fits(backend: Backend) -> None:
    config = BucketConfig(capacity=100, leak_per_second=0.001)
    decisions = await asyncio.gather(*(backend.store.acquire("hot", 2, config) for _ in range(500)))
    assert sum(d.allowed for d in decisions) == 50  # 100 / 2; 0.001/s leaks nothing whole
    assert (await backend.store.peek("hot", config)).used == 100


async def test_concurrent_acquires_never_exceed_capacity_plus_leak(backend: Backend) -> None:
    config = BucketConfig(capacity=50, leak_per_second=200.0)
    start = backend.mark()
    decisions = await asyncio.gather(*(backend.store.acquire("hot", 1, config) for _ in range(500)))
    elapsed = backend.elapsed_since(start)
    admitted = sum(d.allowed for d in decisions)
    assert config.capacity <= admitted <= config.capacity + config.leak_per_second * elapsed
    _assert_refusals_are_coherent(decisions)


def _assert_refusals_are_coherent(decisions: list[BucketDecision]) -> None:
    for decision in decisions:
        if decision.allowed:
            assert decision.wait_seconds == 0
        else:
            assert decision.wait_seconds > 0
            assert not decision.exceeds_capacity


# Redis only: what makes it the multi-replica backend.


async def _replica_stores(
    redis_url: str, prefix: str, replicas: int
) -> tuple[list[redis.Redis], list[RedisLeakyBucket]]:
    clients = [_pooled_client(redis_url, max_connections=32) for _ in range(replicas)]
    return clients, [RedisLeakyBucket(client, prefix=prefix) for client in clients]


@pytest.mark.parametrize(
    ("config", "amount"),
    [
        (BucketConfig(capacity=100, leak_per_second=0.001), 2),
        (BucketConfig(capacity=50, leak_per_second=200.0), 1),
    ],
)
async def test_redis_replicas_share_one_bucket(
    redis_url: str, config: BucketConfig, amount: int
) -> None:
    prefix = _test_prefix()
    clients, stores = await _replica_stores(redis_url, prefix, replicas=4)
    try:
        start = time.monotonic()
        decisions = await asyncio.gather(
            *(stores[i % 4].acquire("hot", amount, config) for i in range(500))
        )
        elapsed = time.monotonic() - start
        admitted_tokens = amount * sum(d.allowed for d in decisions)
        if config.leak_per_second < 1:
            assert admitted_tokens == config.capacity
        else:
            assert admitted_tokens >= config.capacity
            assert admitted_tokens <= config.capacity + config.leak_per_second * elapsed
        _assert_refusals_are_coherent(decisions)
    finally:
        await _delete_keys(clients[0], prefix)
        for client in clients:
            await client.aclose()


async def test_redis_bucket_expires_once_drained(redis_client: redis.Redis) -> None:
    prefix = _test_prefix()
    store = RedisLeakyBucket(redis_client, prefix=prefix)
    config = BucketConfig(capacity=10, leak_per_second=2.0)
    try:
        assert (await store.acquire("u1", 4, config)).allowed
        ttl_ms = await redis_client.pttl(f"{prefix}u1")
        assert 2_000 < ttl_ms <= 2_000 + EXPIRY_MARGIN_MS  # 4 tokens drain in 2 s
        await store.release("u1", 4, config)
        assert await redis_client.exists(f"{prefix}u1") == 0  # empty bucket, no key
    finally:
        await _delete_keys(redis_client, prefix)
