"""The Redis leaky-bucket store: one Lua script per decision, shared by every replica.

Calls go through a RedisGuard (bounded by the configured timeouts, failing fast after a
failure). While Redis fails, decisions come from this process's memory (`on_failure`
"fallback": each replica then leaks on its own) or raise RedisUnavailable (503, "closed").
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.commands.core import AsyncScript

from leaky_tokens.shared.redis import RedisGuard, RedisUnavailable
from leaky_tokens.tokens.leaky_bucket import (
    SLACK,
    BucketConfig,
    BucketDecision,
    MemoryLeakyBucket,
    decide,
)

# Kept after a bucket should have drained, so rounding never expires a non-empty bucket.
EXPIRY_MARGIN_MS = 1_000
# PEXPIRE refuses values that overflow; ~31,700 years is "never" for any sane leak rate.
MAX_EXPIRY_MS = 10**15

# Shared prologue: the bucket's level leaked to the server's clock. Time comes from Redis
# (`TIME`), so replicas with skewed clocks agree; writing after TIME needs effects
# replication, the default since Redis 5. Times are whole microseconds, exact in a
# double (< 2^53); floats leave Lua as "%.17g" strings because Redis truncates Lua numbers
# to integers in replies. A clock stepping back drains nothing and never rewinds `ts`.
_LEAKED_LEVEL = """
local rate = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local level = 0
local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
if state[1] then
  local ts = tonumber(state[2])
  if now < ts then now = ts end
  level = tonumber(state[1]) - (now - ts) / 1000000 * rate
  if level < 0 then level = 0 end
end
local function store(new_level)
  if new_level <= 0 then
    redis.call('DEL', KEYS[1])
    return
  end
  redis.call('HSET', KEYS[1], 'level', string.format('%.17g', new_level),
             'ts', string.format('%.17g', now))
  local ttl = math.min(math.ceil(new_level / rate * 1000) + EXPIRY_MARGIN_MS, MAX_EXPIRY_MS)
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl))
end
""".replace("EXPIRY_MARGIN_MS", str(EXPIRY_MARGIN_MS)).replace("MAX_EXPIRY_MS", str(MAX_EXPIRY_MS))

# ARGV: leak_per_second, amount, capacity. Returns the leaked level before admission; the
# caller rebuilds the decision with decide(), whose comparison this script repeats exactly
# (same doubles, same operations), so both sides agree on `allowed`.
_ACQUIRE = (
    _LEAKED_LEVEL
    + """
local amount = tonumber(ARGV[2])
local capacity = tonumber(ARGV[3])
if amount <= capacity and level + amount <= capacity + SLACK and amount > 0 then
  store(math.min(level + amount, capacity))
end
return string.format('%.17g', level)
""".replace("SLACK", repr(SLACK))
)

# ARGV: leak_per_second, amount. Refunds, floored at empty (which deletes the key).
_RELEASE = (
    _LEAKED_LEVEL
    + """
if state[1] then
  store(level - tonumber(ARGV[2]))
end
return 0
"""
)

# ARGV: leak_per_second. Reads only.
_PEEK = _LEAKED_LEVEL + "\nreturn string.format('%.17g', level)\n"


class RedisLeakyBucket:
    """Buckets as Redis hashes `{prefix}{key}` = {level, ts (µs, Redis clock)}.

    Exactly one round trip per call (EVALSHA; a reload only after a Redis restart). The client
    belongs to the caller, who closes it.
    """

    def __init__(
        self,
        client: redis.Redis | RedisGuard,
        *,
        prefix: str = "lt:bucket:",
        fallback: MemoryLeakyBucket | None = None,
    ) -> None:
        self._prefix = prefix
        self._guard = client if isinstance(client, RedisGuard) else RedisGuard(client, "buckets")
        self._fallback = fallback or MemoryLeakyBucket()
        redis_client = self._guard.client
        self._acquire: AsyncScript = redis_client.register_script(_ACQUIRE)
        self._release: AsyncScript = redis_client.register_script(_RELEASE)
        self._peek: AsyncScript = redis_client.register_script(_PEEK)

    def _fails_closed(self) -> bool:
        self._guard.count_fallback()
        return self._guard.on_failure == "closed"

    async def acquire(self, key: str, amount: int, config: BucketConfig) -> BucketDecision:
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        args = [config.leak_per_second, amount, config.capacity]
        try:
            level = await self._guard.run(
                lambda _: self._acquire(keys=[self._prefix + key], args=args)
            )
        except RedisUnavailable:
            if self._fails_closed():
                raise
            return await self._fallback.acquire(key, amount, config)
        return decide(_as_float(level), amount, config)[1]

    async def release(self, key: str, amount: int, config: BucketConfig) -> None:
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        if amount == 0:
            return
        args = [config.leak_per_second, amount]
        try:
            await self._guard.run(lambda _: self._release(keys=[self._prefix + key], args=args))
        except RedisUnavailable:
            # A refund that cannot reach Redis is dropped: the bucket leaks it away anyway.
            if self._fails_closed():
                raise
            await self._fallback.release(key, amount, config)

    async def peek(self, key: str, config: BucketConfig) -> BucketDecision:
        try:
            level = await self._guard.run(
                lambda _: self._peek(keys=[self._prefix + key], args=[config.leak_per_second])
            )
        except RedisUnavailable:
            if self._fails_closed():
                raise
            return await self._fallback.peek(key, config)
        return decide(_as_float(level), 0, config)[1]

    async def close(self) -> None:
        """Nothing to release: the client is the caller's."""


def _as_float(reply: Any) -> float:
    # A bulk string: bytes, or str when the client decodes responses; float() takes both.
    return float(reply)
