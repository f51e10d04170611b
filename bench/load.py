"""The figures of one bounded load run (wrk drives the load; see bench/wrk.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
