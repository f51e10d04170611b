"""The one fixed-window limiter: in memory (one process) or in Redis (shared by every replica),
behind one interface and one contract suite (tests/contract/test_fixed_window_contract.py).
It serves the gateway's request limits and the auth service's login throttle.

A window is opened by the first counted event of a key under a policy, allows `policy.limit`
events and closes `policy.window_seconds` later; the next event opens a new one. `hit` counts
one event under every (key, policy) given only if all of them have room: a refused event is
counted nowhere, so it never pushes a caller's recovery further away nor uses up another limit.
`peek` reads without counting, `clear` forgets a window. In Redis each call is one Lua script
(EVALSHA) reading Redis's own clock, so replicas with skewed clocks agree on every window.

When Redis fails (RedisGuard: bounded by the configured timeouts, failing fast after a failure)
the Redis limiter either decides from this process's memory instead (each replica then limits on
its own; counted in `redis_fallback_decisions_total`) or raises RedisUnavailable (503), as its
`on_failure` setting says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.redis import RedisGuard, RedisUnavailable


@dataclass(frozen=True, slots=True)
class Policy:
    """`limit` events per `window_seconds`; `name` tells policies apart in keys and headers."""

    name: str
    limit: int
    window_seconds: int

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window_seconds < 1:
            raise ValueError("a rate-limit policy needs limit >= 1 and window_seconds >= 1")


Limit = tuple[str, Policy]  # (key, policy)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one (key, policy): the refusing one, else the one with least room."""

    allowed: bool
    policy: Policy
    count: int  # events counted in the window (after this one, when allowed)
    reset_after: float  # seconds until the window closes (0 when none is open)
    reset_at: int  # the same moment, epoch seconds (rounded up)

    @property
    def limit(self) -> int:
        return self.policy.limit

    @property
    def remaining(self) -> int:
        return max(0, self.policy.limit - self.count)

    @property
    def retry_after(self) -> int:
        """Whole seconds a refused client should wait (at least 1)."""
        return max(1, math.ceil(self.reset_after))


class FixedWindowLimiter(Protocol):
    async def hit(self, limits: Sequence[Limit]) -> Decision:
        """Count one event under every limit if all have room; say whether, and how it stands."""
        ...

    async def peek(self, key: str, policy: Policy) -> Decision:
        """How the window stands without counting (`allowed`: one more would be)."""
        ...

    async def clear(self, key: str, policy: Policy) -> None: ...

    async def aclose(self) -> None: ...


def _decision(
    allowed: bool, policy: Policy, count: int, reset_after: float, now: float
) -> Decision:
    reset_after = max(0.0, reset_after)
    return Decision(allowed, policy, count, reset_after, math.ceil(now + reset_after))


def _tightest(decisions: Sequence[Decision]) -> Decision:
    for decision in decisions:
        if not decision.allowed:
            return decision
    return min(decisions, key=lambda d: d.remaining)


class MemoryFixedWindowLimiter:
    """Windows in a dict; a call has no `await`, so decisions cannot interleave."""

    def __init__(self, clock: Clock | None = None, *, max_keys: int = 100_000) -> None:
        self._clock = clock or SystemClock()
        # (policy name, key) -> [count, closes at (monotonic)]; insertion order = opening order.
        self._windows: dict[tuple[str, str], list[float]] = {}
        self._max_keys = max_keys

    async def hit(self, limits: Sequence[Limit]) -> Decision:
        return self.hit_now(limits)

    def hit_now(self, limits: Sequence[Limit]) -> Decision:
        now = self._clock.monotonic()
        windows = [self._window((policy.name, key), policy, now) for key, policy in limits]
        allowed = all(
            int(w[0]) < policy.limit for w, (_, policy) in zip(windows, limits, strict=True)
        )
        if allowed:
            for window in windows:
                window[0] += 1
        wall = self._clock.now().timestamp()
        return _tightest(
            [
                _decision(allowed or int(w[0]) < policy.limit, policy, int(w[0]), w[1] - now, wall)
                for w, (_, policy) in zip(windows, limits, strict=True)
            ]
        )

    async def peek(self, key: str, policy: Policy) -> Decision:
        now = self._clock.monotonic()
        window = self._windows.get((policy.name, key))
        wall = self._clock.now().timestamp()
        if window is None or window[1] <= now:
            return _decision(True, policy, 0, 0.0, wall)
        count = int(window[0])
        return _decision(count < policy.limit, policy, count, window[1] - now, wall)

    async def clear(self, key: str, policy: Policy) -> None:
        self._windows.pop((policy.name, key), None)

    def _window(self, full_key: tuple[str, str], policy: Policy, now: float) -> list[float]:
        window = self._windows.get(full_key)
        if window is None or window[1] <= now:
            if window is not None:
                del self._windows[full_key]  # re-inserted below: keeps the dict in opening order
            elif len(self._windows) >= self._max_keys:
                self._evict(now)
            window = [0, now + policy.window_seconds]
            self._windows[full_key] = window
        return window

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


# KEYS: one window counter per limit; ARGV: limit, window (ms) per key, in order.
# Returns {allowed, Redis time s, Redis time us, count1, ttl1 (ms), count2, ttl2, ...}: counts
# after this event when allowed.
_HIT = """
local now = redis.call('TIME')
local n = #KEYS
local counts, ttls = {}, {}
local allowed = 1
for i = 1, n do
  local count = tonumber(redis.call('GET', KEYS[i]) or '0')
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl <= 0 then
    count = 0
    ttl = tonumber(ARGV[2 * i])
  end
  if count >= tonumber(ARGV[2 * i - 1]) then allowed = 0 end
  counts[i], ttls[i] = count, ttl
end
local out = {allowed, tonumber(now[1]), tonumber(now[2])}
for i = 1, n do
  if allowed == 1 then
    counts[i] = counts[i] + 1
    if counts[i] == 1 then
      redis.call('SET', KEYS[i], 1, 'PX', ttls[i])
    else
      redis.call('INCR', KEYS[i])
    end
  end
  out[#out + 1] = counts[i]
  out[#out + 1] = ttls[i]
end
return out
"""

# KEYS[1]: the counter. Returns {count, ttl ms, Redis time s, us}; count 0 when no window is open.
_PEEK = """
local now = redis.call('TIME')
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then count = 0; ttl = 0 end
return {count, ttl, tonumber(now[1]), tonumber(now[2])}
"""


class RedisFixedWindowLimiter:
    """Windows in Redis (`{prefix}{policy}:{key}`), one script call per decision."""

    def __init__(
        self,
        guard: RedisGuard,
        *,
        prefix: str,
        fallback: MemoryFixedWindowLimiter | None = None,
    ) -> None:
        self._guard = guard
        self._prefix = prefix
        self._fallback = fallback or MemoryFixedWindowLimiter()
        client: Redis = guard.client
        self._hit = client.register_script(_HIT)
        self._peek = client.register_script(_PEEK)

    def _key(self, key: str, policy: Policy) -> str:
        return f"{self._prefix}{policy.name}:{key}"

    async def hit(self, limits: Sequence[Limit]) -> Decision:
        keys = [self._key(key, policy) for key, policy in limits]
        args: list[int] = []
        for _, policy in limits:
            args += (policy.limit, policy.window_seconds * 1000)
        try:
            reply: Any = await self._guard.run(lambda _: self._hit(keys=keys, args=args))
        except RedisUnavailable:
            if self._fails_closed():
                raise
            return self._fallback.hit_now(limits)
        allowed = bool(reply[0])
        now = int(reply[1]) + int(reply[2]) / 1_000_000
        decisions = []
        for i, (_, policy) in enumerate(limits):
            count, ttl_ms = int(reply[3 + 2 * i]), int(reply[4 + 2 * i])
            fits = allowed or count < policy.limit
            decisions.append(_decision(fits, policy, count, ttl_ms / 1000, now))
        return _tightest(decisions)

    async def peek(self, key: str, policy: Policy) -> Decision:
        full = self._key(key, policy)
        try:
            reply: Any = await self._guard.run(lambda _: self._peek(keys=[full], args=[]))
        except RedisUnavailable:
            if self._fails_closed():
                raise
            return await self._fallback.peek(key, policy)
        count, ttl_ms = int(reply[0]), int(reply[1])
        now = int(reply[2]) + int(reply[3]) / 1_000_000
        return _decision(count < policy.limit, policy, count, ttl_ms / 1000, now)

    async def clear(self, key: str, policy: Policy) -> None:
        full = self._key(key, policy)
        await self._fallback.clear(key, policy)
        try:
            await self._guard.run(lambda client: client.delete(full))
        except RedisUnavailable:
            if self._fails_closed():
                raise

    def _fails_closed(self) -> bool:
        self._guard.count_fallback()
        return self._guard.on_failure == "closed"

    async def aclose(self) -> None:
        await self._fallback.aclose()


def limit_headers(decision: Decision) -> dict[str, str]:
    """The de-facto X-RateLimit-* fields (Reset in epoch seconds) and the IETF RateLimit /
    RateLimit-Policy fields (draft-ietf-httpapi-ratelimit-headers: quota, window, remaining,
    seconds until reset)."""
    policy = decision.policy
    reset_in = math.ceil(decision.reset_after)
    return {
        "X-RateLimit-Limit": str(policy.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(decision.reset_at),
        "RateLimit-Policy": f'"{policy.name}";q={policy.limit};w={policy.window_seconds}',
        "RateLimit": f'"{policy.name}";r={decision.remaining};t={reset_in}',
    }
