"""Fixed-window counters behind one interface: in memory (one process) or Redis (shared by
replicas; one atomic script per hit). Used for login throttling and other per-window limits."""

from __future__ import annotations

import math
from typing import Protocol

from redis.asyncio import Redis

from leaky_tokens.shared.clock import Clock, SystemClock


class WindowCounter(Protocol):
    async def hit(self, key: str, window_seconds: int) -> tuple[int, float]:
        """Count one event; returns (count in the current window, seconds until it resets)."""
        ...

    async def peek(self, key: str) -> tuple[int, float]:
        """(count, seconds until reset) without counting; (0, 0.0) when no window is open."""
        ...

    async def clear(self, key: str) -> None: ...


class MemoryWindowCounter:
    def __init__(self, clock: Clock | None = None, max_keys: int = 100_000) -> None:
        self._clock = clock or SystemClock()
        self._windows: dict[str, tuple[int, float]] = {}
        self._max_keys = max_keys

    async def hit(self, key: str, window_seconds: int) -> tuple[int, float]:
        now = self._clock.monotonic()
        count, ends = self._windows.get(key, (0, 0.0))
        if ends <= now:
            count, ends = 0, now + window_seconds
            if len(self._windows) >= self._max_keys:
                self._evict(now)
        count += 1
        self._windows[key] = (count, ends)
        return count, ends - now

    async def peek(self, key: str) -> tuple[int, float]:
        now = self._clock.monotonic()
        count, ends = self._windows.get(key, (0, 0.0))
        if ends <= now:
            return 0, 0.0
        return count, ends - now

    async def clear(self, key: str) -> None:
        self._windows.pop(key, None)

    def _evict(self, now: float) -> None:
        for stale in [k for k, (_, ends) in self._windows.items() if ends <= now]:
            del self._windows[stale]
        if len(self._windows) >= self._max_keys:
            self._windows.clear()


_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {count, ttl}
"""


class RedisWindowCounter:
    def __init__(self, client: Redis, *, prefix: str = "lt:win:") -> None:
        self._client = client
        self._prefix = prefix
        self._hit = client.register_script(_HIT)

    async def hit(self, key: str, window_seconds: int) -> tuple[int, float]:
        count, ttl_ms = await self._hit(keys=[self._prefix + key], args=[window_seconds * 1000])
        return int(count), max(int(ttl_ms), 0) / 1000.0

    async def peek(self, key: str) -> tuple[int, float]:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(self._prefix + key)
            pipe.pttl(self._prefix + key)
            raw, ttl_ms = await pipe.execute()
        if raw is None or ttl_ms is None or int(ttl_ms) <= 0:
            return 0, 0.0
        return int(raw), int(ttl_ms) / 1000.0

    async def clear(self, key: str) -> None:
        await self._client.delete(self._prefix + key)


def retry_after_seconds(seconds_left: float) -> int:
    return max(1, math.ceil(seconds_left))
