"""Sweeper pacing (issue 10): after a batch that took t seconds the sweeper asks for a pause of
at least t * (1 - d) / d, halves its batch when a batch is slow and grows it back when fast,
and still works through a whole backlog. Behaviour only: an injected clock and sleep, no wall
time."""

from __future__ import annotations

import asyncio

import pytest

from leaky_tokens.shared.clock import FakeClock
from leaky_tokens.shared.pacing import BatchPacer, Pacing


class Backlog:
    """`rows` rows to purge; each batch 'takes' `cost(limit)` seconds on the fake clock."""

    def __init__(self, clock: FakeClock, rows: int, cost: object) -> None:
        self.clock, self.left, self.cost = clock, rows, cost
        self.limits: list[int] = []
        self.sleeps: list[float] = []

    async def step(self, limit: int) -> tuple[int, bool]:
        self.limits.append(limit)
        self.clock.advance(self.cost(limit))  # type: ignore[operator]
        done = min(limit, self.left)
        self.left -= done
        return done, done >= limit

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(seconds)


def _pacer(backlog: Backlog, batch: int, pacing: Pacing) -> BatchPacer:
    return BatchPacer(batch, pacing, monotonic=backlog.clock.monotonic, sleep=backlog.sleep)


async def test_the_pause_follows_the_duty_cycle() -> None:
    clock = FakeClock()
    backlog = Backlog(clock, 10_000, lambda limit: 0.02)  # fast batches: the size stays
    pacer = _pacer(backlog, 1000, Pacing(duty_cycle=0.1, pause_seconds=0.005))
    total, batches = await pacer.drain(backlog.step, asyncio.Event())
    # ten full batches and a last, empty one (the one that says nothing more is due)
    assert (total, batches, backlog.left) == (10_000, 11, 0)
    assert backlog.limits == [1000] * 11
    # 0.02 s of work asks for 0.18 s of pause: 10 % of the time in batches; none after the last
    assert backlog.sleeps == pytest.approx([0.18] * 10)
    assert pacer.pause_after(0.5) == pytest.approx(4.5)
    assert BatchPacer(
        10, Pacing(duty_cycle=0.5), monotonic=clock.monotonic, sleep=backlog.sleep
    ).pause_after(0.3) == pytest.approx(0.3)


async def test_the_pause_has_a_floor_and_a_ceiling() -> None:
    clock = FakeClock()
    backlog = Backlog(clock, 0, lambda limit: 0.0)
    pacing = Pacing(duty_cycle=0.1, pause_seconds=0.05, max_pause_seconds=2.0)
    pacer = _pacer(backlog, 100, pacing)
    assert pacer.pause_after(0.0) == 0.05  # an instant batch still yields
    assert pacer.pause_after(0.001) == 0.05
    assert pacer.pause_after(10.0) == 2.0  # a stuck batch does not stop the sweep for long
    # a duty cycle of 1 is "flat out": the floor only
    flat = _pacer(backlog, 100, Pacing(duty_cycle=1.0, pause_seconds=0.0))
    assert flat.pause_after(3.0) == 0.0


async def test_a_slow_batch_halves_the_next_and_fast_ones_grow_it_back() -> None:
    clock = FakeClock()
    slow_until = {"n": 3}

    def cost(limit: int) -> float:
        # 0.5 ms a row while the database is busy (three batches), then 0.01 ms a row
        if slow_until["n"] > 0:
            slow_until["n"] -= 1
            return limit * 0.0005
        return limit * 0.00001

    backlog = Backlog(clock, 5000, cost)
    pacer = _pacer(backlog, 1000, Pacing(duty_cycle=0.1, slow_batch_seconds=0.1))
    total, _ = await pacer.drain(backlog.step, asyncio.Event())
    assert (total, backlog.left) == (5000, 0)
    # 1000 rows took 0.5 s (slow): 500 (0.25 s, slow): 250 (0.125 s, slow): 125; fast from
    # there: doubling back up to the configured 1000, never beyond
    assert backlog.limits[:6] == [1000, 500, 250, 125, 250, 500]
    assert max(backlog.limits) == 1000
    assert backlog.limits[-1] == 1000
    # the pauses after the slow batches are nine times their duration
    assert backlog.sleeps[:3] == pytest.approx([4.5, 2.25, 1.125])


async def test_batches_never_shrink_below_the_floor_and_a_slow_backlog_still_finishes() -> None:
    clock = FakeClock()
    backlog = Backlog(clock, 3000, lambda limit: 1.0)  # every batch is slow, whatever its size
    pacer = _pacer(backlog, 1000, Pacing(duty_cycle=0.2, slow_batch_seconds=0.1))
    total, batches = await pacer.drain(backlog.step, asyncio.Event())
    assert (total, backlog.left) == (3000, 0)
    assert min(backlog.limits) == 1000 // 16 == pacer.min_batch
    assert backlog.sleeps == pytest.approx([4.0] * len(backlog.sleeps))  # 1 s of work, d = 0.2
    assert batches == len(backlog.limits)


async def test_a_stop_ends_the_drain_between_batches() -> None:
    clock = FakeClock()
    stopping = asyncio.Event()
    backlog = Backlog(clock, 10_000, lambda limit: 0.01)

    async def sleep(seconds: float) -> None:
        backlog.sleeps.append(seconds)
        if len(backlog.sleeps) == 2:
            stopping.set()

    pacer = BatchPacer(100, Pacing(), monotonic=clock.monotonic, sleep=sleep)
    total, batches = await pacer.drain(backlog.step, stopping)
    assert (total, batches) == (200, 2)


def test_pacing_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Pacing(duty_cycle=0)
    with pytest.raises(ValueError):
        Pacing(duty_cycle=1.5)
    with pytest.raises(ValueError):
        Pacing(pause_seconds=5, max_pause_seconds=1)
