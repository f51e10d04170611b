"""Per-principal request limits at the gateway: fixed windows opened by a principal's first
request, in memory (one process) or in Redis (shared by every gateway replica).

A window allows `limit` requests and closes `window_seconds` after it opened; the next request
opens a new one. A refused request is not counted anywhere, so it never pushes a principal's
recovery further away nor uses up any other limit. In Redis each decision is one Lua script
that reads Redis's own clock, so replicas with skewed clocks still agree on every window.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from leaky_tokens.shared.clock import Clock, SystemClock

log = logging.getLogger("leaky_tokens.gateway")


@dataclass(frozen=True, slots=True)
class Policy:
    """`limit` requests per `window_seconds`; `name` tells policies apart in keys and headers."""

    name: str
    limit: int
    window_seconds: int

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window_seconds < 1:
            raise ValueError("a rate-limit policy needs limit >= 1 and window_seconds >= 1")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_after: float  # seconds until the window closes
    reset_at: int  # the same moment, epoch seconds (rounded up)

    @property
    def retry_after(self) -> int:
        """Whole seconds a refused client should wait (at least 1)."""
        return max(1, math.ceil(self.reset_after))


class RateLimiter(Protocol):
    async def hit(self, key: str, policy: Policy) -> Decision:
        """Count one request of `key` under `policy` if the window has room; say whether."""
        ...

    async def aclose(self) -> None: ...


def _decision(allowed: bool, limit: int, count: int, reset_after: float, now: float) -> Decision:
    reset_after = max(0.0, reset_after)
    return Decision(
        allowed=allowed,
        limit=limit,
        remaining=max(0, limit - count),
        reset_after=reset_after,
        reset_at=math.ceil(now + reset_after),
    )


class MemoryRateLimiter:
    """Windows in a dict; a decision has no `await`, so it cannot interleave with another."""

    def __init__(self, clock: Clock | None = None, *, max_keys: int = 100_000) -> None:
        self._clock = clock or SystemClock()
        # key -> [count, closes at (monotonic)]; insertion order is the order windows opened.
        self._windows: dict[str, list[float]] = {}
        self._max_keys = max_keys

    async def hit(self, key: str, policy: Policy) -> Decision:
        return self.hit_now(key, policy)

    def hit_now(self, key: str, policy: Policy) -> Decision:
        now = self._clock.monotonic()
        full_key = f"{policy.name}\x00{key}"
        window = self._windows.get(full_key)
        if window is None or window[1] <= now:
            if window is not None:
                del self._windows[full_key]  # re-inserted below: keeps the dict in opening order
            elif len(self._windows) >= self._max_keys:
                self._evict(now)
            window = [0, now + policy.window_seconds]
            self._windows[full_key] = window
        count = int(window[0])
        allowed = count < policy.limit
        if allowed:
            count += 1
            window[0] = count
        return _decision(
            allowed, policy.limit, count, window[1] - now, self._clock.now().timestamp()
        )

    def _evict(self, now: float) -> None:
        for stale in [k for k, (_, closes) in self._windows.items() if closes <= now]:
            del self._windows[stale]
        # Still full: drop the oldest tenth (the windows closest to closing anyway) rather than
        # everything, so a flood of new clients cannot reset everyone's limits at once.
        excess = len(self._windows) - self._max_keys + max(1, self._max_keys // 10)
        if excess > 0:
            for oldest in list(self._windows)[:excess]:
                del self._windows[oldest]

    async def aclose(self) -> None:
        self._windows.clear()


# KEYS[1] window counter; ARGV[1] limit; ARGV[2] window (ms).
# Returns {allowed, count, ms until the window closes, Redis time s, Redis time us}.
HIT_SCRIPT = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local now = redis.call('TIME')
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then
  count = 0
  ttl = window
end
local allowed = 0
if count < limit then
  allowed = 1
  count = count + 1
  if count == 1 then
    redis.call('SET', KEYS[1], 1, 'PX', window)
  else
    redis.call('INCR', KEYS[1])
  end
end
return {allowed, count, ttl, tonumber(now[1]), tonumber(now[2])}
"""


class Script(Protocol):
    """HIT_SCRIPT, ready to run: redis_script.ScriptClient, or redis-py's register_script."""

    async def __call__(self, *, keys: Sequence[str], args: Sequence[int | str]) -> Any: ...


class RedisRateLimiter:
    """Windows in Redis, one script call per decision.

    When Redis fails, decisions fall back to this process's memory (each replica then limits
    on its own) instead of refusing every request or letting every request through."""

    def __init__(
        self, script: Script, *, prefix: str = "lt:gw:", fallback: MemoryRateLimiter | None = None
    ) -> None:
        self._prefix = prefix
        self._script = script
        self._fallback = fallback or MemoryRateLimiter()
        self._failing = False

    async def hit(self, key: str, policy: Policy) -> Decision:
        try:
            allowed, count, ttl_ms, seconds, micros = await self._script(
                keys=[f"{self._prefix}{policy.name}:{key}"],
                args=[policy.limit, policy.window_seconds * 1000],
            )
        except RedisError as exc:
            if not self._failing:
                self._failing = True
                log.warning("rate limits fall back to this process's memory: Redis: %s", exc)
            return self._fallback.hit_now(key, policy)
        if self._failing:
            self._failing = False
            log.info("rate limits are shared through Redis again")
        now = int(seconds) + int(micros) / 1_000_000
        return _decision(bool(allowed), policy.limit, int(count), int(ttl_ms) / 1000, now)

    async def aclose(self) -> None:
        await self._fallback.aclose()
        aclose = getattr(self._script, "aclose", None)
        if aclose is not None:
            await aclose()


def limit_headers(decision: Decision, policy: Policy) -> dict[str, str]:
    """The de-facto X-RateLimit-* fields (Reset in epoch seconds) and the IETF RateLimit /
    RateLimit-Policy fields (draft-ietf-httpapi-ratelimit-headers: quota, window, remaining,
    seconds until reset)."""
    reset_in = math.ceil(decision.reset_after)
    return {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(decision.reset_at),
        "RateLimit-Policy": f'"{policy.name}";q={policy.limit};w={policy.window_seconds}',
        "RateLimit": f'"{policy.name}";r={decision.remaining};t={reset_in}',
    }
