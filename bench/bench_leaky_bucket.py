"""Micro-benchmark of leaky-bucket decisions: µs per acquire, memory and Redis backends.

    .venv/bin/python -m bench.bench_leaky_bucket [--runs 5] [--redis-url redis://...]

Memory: `await store.acquire(...)` in a tight loop over 1,000 keys, so the figure includes the
coroutine call every caller pays; once with buckets that always admit, once with full buckets
that always refuse. Redis: sequential (one round trip per decision: latency) and 64 in flight
(throughput of one event loop). Every figure is the median of --runs runs. Redis is skipped
with a message when it does not answer. Run on a quiet machine: figures move with load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

from leaky_tokens.tokens.leaky_bucket import (
    BucketConfig,
    LeakyBucketStore,
    MemoryLeakyBucket,
    decide,
)

ADMITS = BucketConfig(capacity=100, leak_per_second=1e9)  # empty again by the next visit
REFUSES = BucketConfig(capacity=100, leak_per_second=0.001)  # full after the warm-up
KEYS = [f"user-{i}:openai" for i in range(1_000)]


def bench_decide(calls: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(calls):
        decide(42.0, 1, ADMITS)
    return (time.perf_counter_ns() - started) / calls / 1_000


async def bench_sequential(
    store: LeakyBucketStore, config: BucketConfig, calls: int, expect_allowed: bool
) -> float:
    acquire = store.acquire
    keys = KEYS
    n_keys = len(keys)
    admitted = 0
    started = time.perf_counter_ns()
    for i in range(calls):
        admitted += (await acquire(keys[i % n_keys], 1, config)).allowed
    elapsed_ns = time.perf_counter_ns() - started
    if admitted != (calls if expect_allowed else 0):
        raise RuntimeError(f"workload drifted: {admitted}/{calls} admitted")
    return elapsed_ns / calls / 1_000


async def bench_in_flight(
    store: LeakyBucketStore, config: BucketConfig, calls: int, in_flight: int
) -> float:
    async def worker(offset: int) -> None:
        for i in range(offset, calls, in_flight):
            await store.acquire(KEYS[i % len(KEYS)], 1, config)

    started = time.perf_counter_ns()
    await asyncio.gather(*(worker(w) for w in range(in_flight)))
    return (time.perf_counter_ns() - started) / calls / 1_000


async def report(label: str, runs: int, once: Callable[[], Awaitable[float]]) -> None:
    figures = [await once() for _ in range(runs)]
    listed = " ".join(f"{f:.2f}" for f in figures)
    print(f"{label:<30} {statistics.median(figures):8.2f} µs/decision  (runs: {listed})")


class _NoOpStore:
    async def acquire(self, key: str, amount: int, config: BucketConfig) -> bool:
        return True


async def bench_floor(calls: int) -> float:
    acquire = _NoOpStore().acquire
    keys = KEYS
    n_keys = len(keys)
    started = time.perf_counter_ns()
    for i in range(calls):
        await acquire(keys[i % n_keys], 1, ADMITS)
    return (time.perf_counter_ns() - started) / calls / 1_000


async def bench_memory(runs: int, calls: int) -> None:
    async def pure() -> float:
        return bench_decide(calls)

    # What any `await store.acquire(...)` costs on this interpreter and load, for comparison.
    await report("floor: await a no-op acquire", runs, lambda: bench_floor(calls))
    await report("decide() alone", runs, pure)
    store = MemoryLeakyBucket()
    await bench_sequential(store, ADMITS, 10_000, expect_allowed=True)  # warm-up
    await report(
        "memory acquire, admitted",
        runs,
        lambda: bench_sequential(store, ADMITS, calls, expect_allowed=True),
    )
    for _ in range(REFUSES.capacity):
        for key in KEYS:
            await store.acquire(key, 1, REFUSES)
    await report(
        "memory acquire, refused",
        runs,
        lambda: bench_sequential(store, REFUSES, calls, expect_allowed=False),
    )
    await store.close()


async def bench_redis(runs: int, calls: int, url: str) -> None:
    import redis.asyncio as redis

    from leaky_tokens.tokens.leaky_bucket_redis import RedisLeakyBucket

    # A blocking pool: callers queue for one of 64 connections instead of failing past 100.
    client = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(url, max_connections=64)
    )
    try:
        await client.ping()
    except (redis.ConnectionError, OSError) as exc:
        print(f"redis: skipped, not answering at {url} ({exc})")
        await client.aclose()
        return
    prefix = f"lt:bench:bucket:{uuid.uuid4().hex}:"
    store = RedisLeakyBucket(client, prefix=prefix)
    try:
        await bench_sequential(store, ADMITS, 500, expect_allowed=True)  # loads the scripts
        await report(
            "redis acquire, sequential",
            runs,
            lambda: bench_sequential(store, ADMITS, calls, expect_allowed=True),
        )
        await report(
            "redis acquire, 64 in flight",
            runs,
            lambda: bench_in_flight(store, ADMITS, calls * 4, in_flight=64),
        )
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median counts")
    parser.add_argument("--memory-calls", type=int, default=200_000)
    parser.add_argument("--redis-calls", type=int, default=2_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    await bench_memory(args.runs, args.memory_calls)
    await bench_redis(args.runs, args.redis_calls, args.redis_url)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
