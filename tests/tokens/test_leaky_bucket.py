"""The leaky bucket's pure rules (leak, admit, refuse, refund, round); the memory store's bound."""

from __future__ import annotations

import pytest

from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.tokens.leaky_bucket import (
    BucketConfig,
    BucketDecision,
    MemoryLeakyBucket,
    decide,
    leak,
    refund,
)

CONFIG = BucketConfig(capacity=10, leak_per_second=2.0)


def test_admits_up_to_capacity_exactly() -> None:
    level = 0.0
    for expected_used in range(1, 11):
        level, decision = decide(level, 1, CONFIG)
        assert decision.allowed
        assert decision.used == expected_used
        assert decision.remaining == 10 - expected_used
        assert decision.wait_seconds == 0
    assert level == 10


def test_admits_a_single_request_of_exactly_capacity() -> None:
    level, decision = decide(0.0, 10, CONFIG)
    assert decision.allowed
    assert (decision.used, decision.remaining) == (10, 0)
    assert level == 10


def test_refuses_one_more_than_capacity_and_says_how_long_to_wait() -> None:
    level, decision = decide(10.0, 1, CONFIG)
    assert not decision.allowed
    assert not decision.exceeds_capacity
    assert level == 10
    assert decision.wait_seconds == pytest.approx(0.5)  # one token at 2 tokens/s
    assert (decision.used, decision.remaining) == (10, 0)


def test_wait_covers_only_the_part_that_does_not_fit() -> None:
    level, decision = decide(7.0, 5, CONFIG)
    assert not decision.allowed
    assert level == 7
    assert decision.wait_seconds == pytest.approx(1.0)  # 7 + 5 - 10 = 2 tokens at 2/s


def test_refusal_leaves_level_unchanged() -> None:
    level, _ = decide(8.5, 3, CONFIG)
    assert level == 8.5


def test_leaks_at_the_configured_rate() -> None:
    assert leak(10.0, 1.5, CONFIG) == pytest.approx(7.0)
    assert leak(10.0, 0.0, CONFIG) == 10


def test_leak_never_goes_below_empty() -> None:
    assert leak(3.0, 60.0, CONFIG) == 0


def test_leak_ignores_time_going_backwards() -> None:
    assert leak(4.0, -5.0, CONFIG) == 4


def test_a_leaked_bucket_admits_again() -> None:
    level, _ = decide(0.0, 10, CONFIG)
    level = leak(level, 1.0, CONFIG)
    level, decision = decide(level, 2, CONFIG)
    assert decision.allowed
    assert level == pytest.approx(10)
    _, refused = decide(level, 1, CONFIG)
    assert not refused.allowed


def test_many_small_leaks_do_not_lose_a_token_to_float_error() -> None:
    config = BucketConfig(capacity=10, leak_per_second=1.0)
    level, _ = decide(0.0, 10, config)
    for _ in range(10):
        level = leak(level, 0.1, config)  # 0.1 is not exact in binary
    level, decision = decide(level, 1, config)
    assert decision.allowed
    assert (decision.used, decision.remaining) == (10, 0)


def test_amount_above_capacity_can_never_fit() -> None:
    level, decision = decide(0.0, 11, CONFIG)
    assert decision.exceeds_capacity
    assert not decision.allowed
    assert decision.wait_seconds == 0
    assert level == 0
    assert (decision.used, decision.remaining) == (0, 10)


def test_amount_above_capacity_is_reported_even_when_the_bucket_is_busy() -> None:
    _, decision = decide(4.0, 50, CONFIG)
    assert decision.exceeds_capacity
    assert not decision.allowed


def test_amount_zero_admits_nothing_and_reports_state() -> None:
    level, decision = decide(4.2, 0, CONFIG)
    assert decision.allowed
    assert level == 4.2
    assert (decision.used, decision.remaining) == (5, 5)


def test_negative_amount_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="amount"):
        decide(0.0, -1, CONFIG)


def test_used_rounds_a_fractional_level_up() -> None:
    _, decision = decide(2.25, 1, CONFIG)
    assert decision.used == 4  # 3.25 tokens still in the bucket
    assert decision.remaining == 6


def test_reset_is_the_time_until_empty() -> None:
    _, decision = decide(3.0, 2, CONFIG)
    assert decision.reset_seconds == pytest.approx(2.5)
    _, empty = decide(0.0, 0, CONFIG)
    assert empty.reset_seconds == 0


def test_refund_lowers_the_level() -> None:
    assert refund(7.0, 3) == 4


def test_refund_floors_at_empty() -> None:
    assert refund(2.0, 5) == 0


def test_decisions_are_immutable_values() -> None:
    _, decision = decide(3.0, 2, CONFIG)
    assert type(decision) is BucketDecision
    assert decision == BucketDecision(True, 10, 5, 5, 0.0, 2.5)
    assert hash(decision) == hash(BucketDecision(True, 10, 5, 5, 0.0, 2.5))
    with pytest.raises(AttributeError):
        decision.allowed = False  # type: ignore[misc]


@pytest.mark.parametrize(
    ("capacity", "leak_per_second"),
    [(0, 1.0), (-3, 1.0), (10, 0.0), (10, -1.0)],
)
def test_config_rejects_non_positive_values(capacity: int, leak_per_second: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        BucketConfig(capacity=capacity, leak_per_second=leak_per_second)


# The in-memory store keeps its dict bounded (the shared behaviour is in tests/contract/).


async def test_memory_store_drops_drained_buckets_when_full() -> None:
    clock = FakeClock()
    store = MemoryLeakyBucket(clock, max_keys=3)
    for key in ("a", "b", "c"):
        assert (await store.acquire(key, 2, CONFIG)).allowed
    clock.advance(1.0)  # 2 tokens at 2/s: all drained
    assert (await store.acquire("d", 2, CONFIG)).allowed
    assert len(store) == 1


async def test_memory_store_forgets_the_nearest_to_empty_when_every_bucket_is_live() -> None:
    clock = FakeClock()
    store = MemoryLeakyBucket(clock, max_keys=3)
    for key, amount in (("full", 10), ("half", 5), ("light", 1)):
        assert (await store.acquire(key, amount, CONFIG)).allowed
    assert (await store.acquire("new", 1, CONFIG)).allowed
    assert len(store) <= 3
    assert (await store.peek("full", CONFIG)).used == 10
    assert (await store.peek("light", CONFIG)).used == 0


async def test_memory_store_does_not_keep_empty_buckets() -> None:
    store = MemoryLeakyBucket(FakeClock())
    await store.peek("a", CONFIG)
    await store.acquire("b", 11, CONFIG)
    assert (await store.acquire("c", 3, CONFIG)).allowed
    await store.release("c", 3, CONFIG)
    assert len(store) == 0
