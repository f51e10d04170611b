"""A bounded closed-loop HTTP load (loopback only): N requests, C in flight, latency percentiles."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class LoadResult:
    name: str
    requests: int
    concurrency: int
    seconds: float
    statuses: dict[int, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": self.requests,
            "concurrency": self.concurrency,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p95_ms": round(self.p95_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "statuses": self.statuses,
        }


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run_load(
    name: str,
    base_url: str,
    make_request: Callable[[int], tuple[str, str, dict[str, str], Any]],
    *,
    requests: int,
    concurrency: int,
    warmup: int = 50,
) -> LoadResult:
    """Send `requests` requests with `concurrency` workers; make_request(i) -> (method, path,
    headers, json body or None)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0) as client:
        for i in range(warmup):
            method, path, headers, body = make_request(-1 - i)
            await client.request(method, path, headers=headers, json=body)
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests:
                i = next_index
                next_index += 1
                method, path, headers, body = make_request(i)
                started = time.perf_counter()
                response = await client.request(method, path, headers=headers, json=body)
                latencies.append(time.perf_counter() - started)
                statuses[response.status_code] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(
        name=name,
        requests=requests,
        concurrency=concurrency,
        seconds=elapsed,
        statuses=dict(statuses),
        p50_ms=statistics.median(latencies) * 1000,
        p95_ms=_percentile(latencies, 0.95) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
    )
