"""The leaky bucket: its pure admission rule, the store interface and the in-memory store."""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from math import ceil
from typing import NamedTuple, Protocol

from leaky_tokens.shared.clock import Clock

# Tokens of float error tolerated at the capacity boundary, so that leaking in steps such as
# 0.1 s (not exact in binary) cannot refuse a request that fits exactly. A millionth of a token
# never admits an extra integer amount, and covers rounding for capacities up to ~1e9.
# The Redis script embeds the same value; both backends must compare identically.
SLACK = 1e-6


@dataclass(frozen=True, slots=True)
class BucketConfig:
    capacity: int  # tokens the bucket holds when full; > 0
    leak_per_second: float  # tokens drained per second; > 0

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {self.capacity}")
        if self.leak_per_second <= 0:
            raise ValueError(f"leak_per_second must be > 0, got {self.leak_per_second}")


class BucketDecision(NamedTuple):
    """Immutable and cheap to build: a frozen dataclass's __init__ alone costs ~2.3 µs here,
    more than the whole decision budget (2 µs)."""

    allowed: bool
    capacity: int
    used: int  # level after the decision, rounded up to whole tokens
    remaining: int  # capacity - used, >= 0
    wait_seconds: float  # 0 when allowed or when the amount can never fit; > 0 when refused
    reset_seconds: float  # until the bucket would be empty (X-RateLimit-Reset)
    exceeds_capacity: bool = False  # the amount is larger than the bucket: a 400, not a 429


def leak(level: float, elapsed_seconds: float, config: BucketConfig) -> float:
    """The level after `elapsed_seconds` of draining; time going backwards drains nothing."""
    if elapsed_seconds <= 0.0:
        return level
    level -= elapsed_seconds * config.leak_per_second
    return level if level > 0.0 else 0.0


def refund(level: float, amount: int) -> float:
    """The level after refunding `amount` tokens admitted earlier; never below empty."""
    level -= amount
    return level if level > 0.0 else 0.0


def decide(level: float, amount: int, config: BucketConfig) -> tuple[float, BucketDecision]:
    """Admit `amount` into a bucket whose level is already leaked to now.

    Returns the new level (unchanged when refused) and the decision. Amount 0 admits nothing
    and reports the current state.
    """
    if amount < 0:
        raise ValueError(f"amount must be >= 0, got {amount}")
    capacity = config.capacity
    after = level + amount
    # Redis's acquire script repeats exactly this comparison on the same doubles.
    if after <= capacity + SLACK and amount <= capacity:
        if after > capacity:
            after = float(capacity)
        used = ceil(after - SLACK)  # within [0, capacity] because 0 <= after <= capacity
        return after, _new_decision(
            True, capacity, used, 0.0, after / config.leak_per_second, False
        )
    rate = config.leak_per_second
    used = _used(level, capacity)
    if amount > capacity:
        return level, _new_decision(False, capacity, used, 0.0, level / rate, True)
    wait = (after - capacity) / rate
    return level, _new_decision(False, capacity, used, wait, level / rate, False)


def _used(level: float, capacity: int) -> int:
    used = ceil(level - SLACK)
    if used < 0:
        return 0
    return used if used < capacity else capacity


def _new_decision(
    allowed: bool, capacity: int, used: int, wait: float, reset: float, exceeds: bool
) -> BucketDecision:
    return BucketDecision(allowed, capacity, used, capacity - used, wait, reset, exceeds)


class LeakyBucketStore(Protocol):
    """Where bucket levels live; every method is atomic per key across all callers."""

    async def acquire(self, key: str, amount: int, config: BucketConfig) -> BucketDecision:
        """Admit `amount` tokens into `key`'s bucket, or refuse and change nothing."""
        ...

    async def release(self, key: str, amount: int, config: BucketConfig) -> None:
        """Refund tokens admitted earlier (the provider call failed); floors at empty."""
        ...

    async def peek(self, key: str, config: BucketConfig) -> BucketDecision:
        """The bucket's state now, admitting nothing."""
        ...

    async def close(self) -> None: ...


class MemoryLeakyBucket:
    """Buckets in a dict of one process; for the all-in-one shape and tests.

    Each method runs without an `await` between reading and writing a bucket, so decisions are
    atomic on the event loop that calls them (not across threads).
    """

    def __init__(self, clock: Clock | None = None, max_keys: int = 1_000_000) -> None:
        if max_keys <= 0:
            raise ValueError(f"max_keys must be > 0, got {max_keys}")
        # SystemClock().monotonic minus one Python call on the hot path.
        self._monotonic = clock.monotonic if clock is not None else time.monotonic
        self._max_keys = max_keys
        # key -> [level, monotonic time of level, monotonic time it will be empty]
        self._buckets: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    async def acquire(self, key: str, amount: int, config: BucketConfig) -> BucketDecision:
        now = self._monotonic()
        state = self._buckets.get(key)
        if state is None:
            level, decision = decide(0.0, amount, config)
            if level > 0.0:
                if len(self._buckets) >= self._max_keys:
                    self._make_room(now)
                self._buckets[key] = [level, now, now + level / config.leak_per_second]
            return decision
        level, decision = decide(leak(state[0], now - state[1], config), amount, config)
        if decision.allowed:
            state[0] = level
            state[1] = now
            state[2] = now + level / config.leak_per_second
        return decision

    async def release(self, key: str, amount: int, config: BucketConfig) -> None:
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        state = self._buckets.get(key)
        if state is None:
            return
        now = self._monotonic()
        level = refund(leak(state[0], now - state[1], config), amount)
        if level == 0.0:
            del self._buckets[key]
            return
        state[0] = level
        state[1] = now
        state[2] = now + level / config.leak_per_second

    async def peek(self, key: str, config: BucketConfig) -> BucketDecision:
        state = self._buckets.get(key)
        level = 0.0
        if state is not None:
            level = leak(state[0], self._monotonic() - state[1], config)
        return decide(level, 0, config)[1]

    async def close(self) -> None:
        self._buckets.clear()

    def _make_room(self, now: float) -> None:
        buckets = self._buckets
        for key in [key for key, state in buckets.items() if state[2] <= now]:
            del buckets[key]
        # Sweep down to 90% so a full sweep is paid once per max_keys/10 new keys, not per key.
        target = self._max_keys - max(1, self._max_keys // 10)
        excess = len(buckets) - target
        if excess > 0:
            # Every bucket is still live: forget those nearest to empty. Bounded memory costs
            # at most their remaining level in extra admissions for those keys.
            for key in heapq.nsmallest(excess, buckets, key=lambda k: buckets[k][2]):
                del buckets[key]
