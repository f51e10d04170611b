"""Bulkhead admission and retry back-off, with sleep and randomness injected."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest

from leaky_tokens.shared.resilience import Bulkhead, BulkheadFull, backoff_ceiling, retry


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


class Sleeps:
    """Records requested delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def fixed_rng(*values: float) -> Callable[[], float]:
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def failing_then(
    result: str, failures: list[BaseException]
) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    calls: list[int] = []

    async def fn() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return result

    return fn, calls


# -- retry ---------------------------------------------------------------------------------


async def test_retry_returns_first_success_without_sleeping() -> None:
    sleeps = Sleeps()
    fn, calls = failing_then("ok", [])
    result = await retry(
        fn, attempts=3, base_delay=0.1, max_delay=1.0, retry_on=lambda e: True, sleep=sleeps
    )
    assert result == "ok"
    assert len(calls) == 1
    assert sleeps.delays == []


async def test_retry_sleeps_full_jitter_delays_between_tries() -> None:
    sleeps = Sleeps()
    fn, calls = failing_then("ok", [Flaky(), Flaky(), Flaky()])
    result = await retry(
        fn,
        attempts=4,
        base_delay=0.1,
        max_delay=10.0,
        retry_on=lambda e: isinstance(e, Flaky),
        sleep=sleeps,
        rng=fixed_rng(0.5, 0.25, 0.999),
    )
    assert result == "ok"
    assert len(calls) == 4
    # Full jitter: rng() * min(max_delay, base_delay * 2**n) before try n+2.
    assert sleeps.delays == pytest.approx([0.05, 0.05, 0.3996])


@pytest.mark.parametrize("rng_value", [0.0, 0.5, 0.999999])
async def test_retry_delays_stay_within_the_capped_exponential_bound(rng_value: float) -> None:
    sleeps = Sleeps()
    fn, _ = failing_then("ok", [Flaky() for _ in range(7)])
    await retry(
        fn,
        attempts=8,
        base_delay=0.05,
        max_delay=0.5,
        retry_on=lambda e: True,
        sleep=sleeps,
        rng=lambda: rng_value,
    )
    assert len(sleeps.delays) == 7
    for n, delay in enumerate(sleeps.delays):
        ceiling = min(0.5, 0.05 * 2**n)
        assert 0.0 <= delay < ceiling or delay == ceiling == 0.0
        assert delay == pytest.approx(rng_value * ceiling)


def test_backoff_ceiling_does_not_overflow_for_many_attempts() -> None:
    assert backoff_ceiling(5000, 0.05, 0.5) == 0.5


async def test_retry_reraises_the_last_error_after_all_attempts() -> None:
    sleeps = Sleeps()
    first, last = Flaky("first"), Flaky("last")
    fn, calls = failing_then("never", [first, Flaky("middle"), last])
    with pytest.raises(Flaky) as caught:
        await retry(
            fn, attempts=3, base_delay=0.0, max_delay=0.0, retry_on=lambda e: True, sleep=sleeps
        )
    assert caught.value is last
    assert len(calls) == 3
    assert len(sleeps.delays) == 2


async def test_retry_does_not_retry_errors_retry_on_rejects() -> None:
    sleeps = Sleeps()
    fn, calls = failing_then("ok", [Fatal()])
    with pytest.raises(Fatal):
        await retry(
            fn,
            attempts=5,
            base_delay=0.1,
            max_delay=1.0,
            retry_on=lambda e: isinstance(e, Flaky),
            sleep=sleeps,
        )
    assert len(calls) == 1
    assert sleeps.delays == []


async def test_retry_never_retries_cancellation() -> None:
    sleeps = Sleeps()
    fn, calls = failing_then("ok", [asyncio.CancelledError()])
    with pytest.raises(asyncio.CancelledError):
        await retry(
            fn, attempts=5, base_delay=0.1, max_delay=1.0, retry_on=lambda e: True, sleep=sleeps
        )
    assert len(calls) == 1
    assert sleeps.delays == []


async def test_cancelling_during_back_off_stops_retrying() -> None:
    calls = 0

    async def always_fails() -> str:
        nonlocal calls
        calls += 1
        raise Flaky

    task = asyncio.create_task(
        retry(always_fails, attempts=5, base_delay=60.0, max_delay=60.0, retry_on=lambda e: True)
    )
    await asyncio.sleep(0.01)  # first try failed, now sleeping its back-off
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1


async def test_retry_needs_at_least_one_attempt() -> None:
    fn, calls = failing_then("ok", [])
    with pytest.raises(ValueError):
        await retry(fn, attempts=0, base_delay=0.1, max_delay=1.0, retry_on=lambda e: True)
    assert calls == []


# -- bulkhead ------------------------------------------------------------------------------


async def test_bulkhead_admits_up_to_max_concurrent_then_refuses() -> None:
    bulkhead = Bulkhead(max_concurrent=2, max_wait_seconds=0.01)
    async with bulkhead, bulkhead:
        assert bulkhead.in_use == 2
        with pytest.raises(BulkheadFull) as caught:
            async with bulkhead:
                pass
        assert caught.value.max_concurrent == 2
    assert bulkhead.in_use == 0


async def test_bulkhead_with_no_wait_refuses_at_once() -> None:
    bulkhead = Bulkhead(max_concurrent=1, max_wait_seconds=0)
    async with bulkhead:
        with pytest.raises(BulkheadFull):
            async with bulkhead:
                pass


async def test_bulkhead_waiter_gets_a_slot_freed_within_max_wait() -> None:
    bulkhead = Bulkhead(max_concurrent=1, max_wait_seconds=5.0)
    holding = asyncio.Event()
    done = asyncio.Event()

    async def holder() -> None:
        async with bulkhead:
            holding.set()
            await done.wait()

    task = asyncio.create_task(holder())
    await holding.wait()
    asyncio.get_running_loop().call_soon(done.set)
    async with bulkhead:
        assert bulkhead.in_use == 1
    await task


async def test_bulkhead_frees_the_slot_when_the_body_raises() -> None:
    bulkhead = Bulkhead(max_concurrent=1, max_wait_seconds=0)
    with pytest.raises(Fatal):
        async with bulkhead:
            raise Fatal
    async with bulkhead:
        assert bulkhead.in_use == 1


async def test_bulkhead_refusals_do_not_leak_slots_under_load() -> None:
    bulkhead = Bulkhead(max_concurrent=3, max_wait_seconds=0.02)
    running = 0
    most_running = 0

    async def work() -> None:
        nonlocal running, most_running
        async with bulkhead:
            running += 1
            most_running = max(most_running, running)
            await asyncio.sleep(0.005)
            running -= 1

    results = await asyncio.gather(*(work() for _ in range(60)), return_exceptions=True)
    assert most_running == 3
    assert all(r is None or isinstance(r, BulkheadFull) for r in results)
    assert bulkhead.in_use == 0
    # Every slot came back: three holders fit at once again.
    async with bulkhead, bulkhead, bulkhead:
        assert bulkhead.in_use == 3


@pytest.mark.parametrize(("size", "wait"), [(0, 1.0), (1, -1.0)])
def test_bulkhead_rejects_impossible_settings(size: int, wait: float) -> None:
    with pytest.raises(ValueError):
        Bulkhead(size, wait)
