"""The circuit breaker's transitions, driven by a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from leaky_tokens.shared.circuit_breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
)
from leaky_tokens.shared.clock import FakeClock

CONFIG = BreakerConfig(
    window_size=10,
    minimum_calls=4,
    failure_rate_threshold=0.5,
    open_seconds=30.0,
    half_open_max_calls=2,
)

Transition = tuple[str, BreakerState, BreakerState]


class Boom(Exception):
    pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def transitions() -> list[Transition]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, transitions: list[Transition]) -> CircuitBreaker:
    return CircuitBreaker(
        "openai", CONFIG, clock, on_state_change=lambda *change: transitions.append(change)
    )


def state(breaker: CircuitBreaker) -> BreakerState:
    # A call, not the property itself, so the type checker does not keep the state narrowed
    # from one assertion to the next while the breaker changes underneath.
    return breaker.state


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(CONFIG.minimum_calls):
        breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN


def half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance(CONFIG.open_seconds)
    assert state(breaker) is BreakerState.HALF_OPEN


async def succeed() -> str:
    return "ok"


async def fail() -> str:
    raise Boom


def test_starts_closed_and_admits_calls(breaker: CircuitBreaker) -> None:
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert BreakerState.HALF_OPEN.value == "half_open"


def test_stays_closed_below_minimum_calls_even_if_all_fail(breaker: CircuitBreaker) -> None:
    for _ in range(CONFIG.minimum_calls - 1):
        breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED


def test_stays_closed_while_failure_rate_is_below_threshold(breaker: CircuitBreaker) -> None:
    for _ in range(3):
        breaker.record_success()
        breaker.record_success()
        breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.snapshot()["failureRate"] == pytest.approx(1 / 3)


def test_opens_when_failure_rate_reaches_threshold(
    breaker: CircuitBreaker, transitions: list[Transition]
) -> None:
    breaker.record_success()
    breaker.record_failure()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    breaker.record_failure()  # 2 of 4 = 0.5
    assert state(breaker) is BreakerState.OPEN
    assert transitions == [("openai", BreakerState.CLOSED, BreakerState.OPEN)]


def test_old_outcomes_slide_out_of_the_window(clock: FakeClock) -> None:
    breaker = CircuitBreaker("w", BreakerConfig(window_size=4, minimum_calls=4), clock)
    breaker.record_failure()
    for _ in range(3):
        breaker.record_success()
    assert breaker.snapshot()["failedCallsInWindow"] == 1
    breaker.record_success()  # pushes the failure out
    snapshot = breaker.snapshot()
    assert snapshot["callsInWindow"] == 4
    assert snapshot["failedCallsInWindow"] == 0
    assert snapshot["failureRate"] == 0.0


async def test_open_breaker_refuses_without_calling(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    trip(breaker)
    clock.advance(10)
    called = False

    async def track() -> str:
        nonlocal called
        called = True
        return "ok"

    assert not breaker.allow()
    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call(track)
    assert not called
    assert caught.value.name == "openai"
    assert caught.value.retry_after_seconds == pytest.approx(20.0)


def test_open_breaker_ignores_late_outcomes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    opened_at = breaker.snapshot()["openedAt"]
    clock.advance(5)
    breaker.record_failure()
    breaker.record_success()
    assert state(breaker) is BreakerState.OPEN
    assert breaker.snapshot()["openedAt"] == opened_at


def test_becomes_half_open_once_open_seconds_passed(
    breaker: CircuitBreaker, clock: FakeClock, transitions: list[Transition]
) -> None:
    trip(breaker)
    clock.advance(CONFIG.open_seconds - 0.001)
    assert state(breaker) is BreakerState.OPEN
    clock.advance(0.001)
    assert state(breaker) is BreakerState.HALF_OPEN
    assert transitions[-1] == ("openai", BreakerState.OPEN, BreakerState.HALF_OPEN)


def test_half_open_admits_only_max_probes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    half_open(breaker, clock)
    assert [breaker.allow() for _ in range(4)] == [True, True, False, False]


def test_half_open_closes_with_a_cleared_window_when_all_probes_succeed(
    breaker: CircuitBreaker, clock: FakeClock, transitions: list[Transition]
) -> None:
    half_open(breaker, clock)
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert transitions[-1] == ("openai", BreakerState.HALF_OPEN, BreakerState.CLOSED)
    snapshot = breaker.snapshot()
    assert snapshot["callsInWindow"] == 0
    assert snapshot["openedAt"] is None
    # A cleared window: one more failure is far from re-opening it.
    breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED


def test_half_open_reopens_on_a_failed_probe(
    breaker: CircuitBreaker, clock: FakeClock, transitions: list[Transition]
) -> None:
    half_open(breaker, clock)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    assert transitions[-1] == ("openai", BreakerState.HALF_OPEN, BreakerState.OPEN)
    # The open period starts again from the failed probe.
    clock.advance(CONFIG.open_seconds - 1)
    assert state(breaker) is BreakerState.OPEN
    assert breaker.retry_after_seconds == pytest.approx(1.0)
    clock.advance(1)
    assert state(breaker) is BreakerState.HALF_OPEN


async def test_call_records_outcomes(breaker: CircuitBreaker) -> None:
    assert await breaker.call(succeed) == "ok"
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(fail)
    snapshot = breaker.snapshot()
    assert snapshot["callsInWindow"] == 3
    assert snapshot["failedCallsInWindow"] == 2


async def test_call_counts_errors_that_are_not_failures_as_successes(
    breaker: CircuitBreaker,
) -> None:
    for _ in range(CONFIG.minimum_calls):
        with pytest.raises(Boom):
            await breaker.call(fail, is_failure=lambda exc: not isinstance(exc, Boom))
    snapshot = breaker.snapshot()
    assert snapshot["state"] == "closed"
    assert snapshot["callsInWindow"] == CONFIG.minimum_calls
    assert snapshot["failedCallsInWindow"] == 0


async def test_call_closes_a_half_open_breaker_after_successful_probes(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    half_open(breaker, clock)
    for _ in range(CONFIG.half_open_max_calls):
        assert await breaker.call(succeed) == "ok"
    assert state(breaker) is BreakerState.CLOSED


async def test_cancelled_probe_gives_its_slot_back(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    half_open(breaker, clock)
    started = asyncio.Event()

    async def hang() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    probes = [asyncio.create_task(breaker.call(hang)) for _ in range(CONFIG.half_open_max_calls)]
    await started.wait()
    assert not breaker.allow()
    probes[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await probes[0]
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()
    for probe in probes[1:]:
        probe.cancel()
    await asyncio.gather(*probes[1:], return_exceptions=True)


async def test_outcome_of_a_call_admitted_before_opening_is_not_a_probe(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "late"

    slow_call = asyncio.create_task(breaker.call(slow))
    await asyncio.sleep(0)  # admitted while closed
    half_open(breaker, clock)
    release.set()
    assert await slow_call == "late"
    # Both probe slots are still free: the late success neither used nor closed one.
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert breaker.allow()
    assert not breaker.allow()


async def test_concurrent_calls_in_half_open_run_at_most_max_probes(
    clock: FakeClock,
) -> None:
    config = BreakerConfig(window_size=10, minimum_calls=2, open_seconds=5, half_open_max_calls=3)
    breaker = CircuitBreaker("busy", config, clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(5)
    running = 0
    most_running = 0
    ran = 0

    async def probe() -> str:
        nonlocal running, most_running, ran
        running += 1
        ran += 1
        most_running = max(most_running, running)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        running -= 1
        return "ok"

    results = await asyncio.gather(
        *(breaker.call(probe) for _ in range(50)), return_exceptions=True
    )

    assert ran == config.half_open_max_calls
    assert most_running == config.half_open_max_calls
    assert results.count("ok") == config.half_open_max_calls
    refused = [r for r in results if isinstance(r, CircuitOpenError)]
    assert len(refused) == 50 - config.half_open_max_calls
    assert state(breaker) is BreakerState.CLOSED


def test_snapshot_reports_state_rate_and_opening_time(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    assert breaker.snapshot() == {
        "name": "openai",
        "state": "closed",
        "failureRate": 0.0,
        "callsInWindow": 0,
        "failedCallsInWindow": 0,
        "openedAt": None,
    }
    trip(breaker)
    snapshot = breaker.snapshot()
    assert snapshot["state"] == "open"
    assert snapshot["failureRate"] == 1.0
    assert snapshot["openedAt"] == "2026-01-01T00:00:00.000Z"


def test_a_failing_listener_does_not_break_the_breaker(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(name: str, old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker("x", CONFIG, clock, on_state_change=explode)
    trip(breaker)
    assert "circuit breaker listener failed" in caplog.text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_size": 0},
        {"minimum_calls": 0},
        {"window_size": 5, "minimum_calls": 6},
        {"failure_rate_threshold": 0.0},
        {"failure_rate_threshold": 1.5},
        {"open_seconds": -1},
        {"half_open_max_calls": 0},
    ],
)
def test_config_rejects_settings_that_could_never_work(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]
