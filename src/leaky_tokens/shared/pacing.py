"""Pacing for background sweepers (issue 10): a sweep that works through a backlog in batches
yields to the hot path instead of running flat out.

Two rules, applied after every batch:

- **Duty cycle.** A batch that took t seconds is followed by a pause of at least
  t * (1 - d) / d, so the sweeper holds the database (and, on SQLite, its one write lock, and the
  event loop's share of the CPU) for at most a fraction d of the time, whatever the batch costs
  today: a slower database (a loaded machine, a busy lock) makes the pauses longer by itself.
  The pause is never shorter than `pause_seconds` and never longer than `max_pause_seconds`.
- **Smaller batches when slow.** A batch slower than `slow_batch_seconds` halves the next one
  (down to `min_batch`), so no single transaction keeps a writer waiting long; batches faster
  than half of it double again, up to the configured batch.

Time comes from an injected monotonic clock and the pause from an injected sleep, so tests
check the sleeps asked for, not wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pacing:
    duty_cycle: float = 0.05  # the share of time the sweeper may spend in batches (0 < d <= 1)
    pause_seconds: float = 0.005  # the shortest pause between two batches
    slow_batch_seconds: float = 0.1  # a batch slower than this halves the next one
    max_pause_seconds: float = 30.0  # the longest pause between two batches

    def __post_init__(self) -> None:
        if not 0 < self.duty_cycle <= 1:
            raise ValueError("duty_cycle must be in (0, 1]")
        if self.pause_seconds < 0 or self.max_pause_seconds < self.pause_seconds:
            raise ValueError("need 0 <= pause_seconds <= max_pause_seconds")
        if self.slow_batch_seconds <= 0:
            raise ValueError("slow_batch_seconds must be positive")


# One step of a sweep: given the batch size to use, do one bounded transaction and say how many
# rows it handled and whether more is due.
Step = Callable[[int], Awaitable[tuple[int, bool]]]


async def pause_unless_stopped(stopping: asyncio.Event, seconds: float) -> None:
    """Sleeps `seconds`, or less when a stop is asked meanwhile."""
    if seconds <= 0:
        await asyncio.sleep(0)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


class BatchPacer:
    """Sizes and spaces the batches of a sweeper. The batch size it has learned is kept across
    sweeps (one pacer per sweeper and kind of batch)."""

    def __init__(
        self,
        batch: int,
        pacing: Pacing,
        *,
        monotonic: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        min_batch: int | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.max_batch = batch
        self.min_batch = max(1, min(batch, min_batch if min_batch is not None else batch // 16))
        self.pacing = pacing
        self.batch = batch
        self._monotonic = monotonic
        self._sleep = sleep

    def pause_after(self, took: float) -> float:
        """The pause owed after a batch that took `took` seconds."""
        d = self.pacing.duty_cycle
        owed = max(took, 0.0) * (1 - d) / d
        return min(max(owed, self.pacing.pause_seconds), self.pacing.max_pause_seconds)

    def resize_after(self, took: float) -> None:
        slow = self.pacing.slow_batch_seconds
        if took > slow:
            self.batch = max(self.min_batch, self.batch // 2)
        elif took < slow / 2:
            self.batch = min(self.max_batch, self.batch * 2)

    async def drain(self, step: Step, stopping: asyncio.Event) -> tuple[int, int]:
        """Runs `step` batch after batch until it says nothing more is due (or a stop is
        asked), pausing between batches; returns (rows handled, batches run)."""
        total = batches = 0
        while not stopping.is_set():
            began = self._monotonic()
            count, more = await step(self.batch)
            took = self._monotonic() - began
            total += count
            batches += 1
            self.resize_after(took)
            if not more or stopping.is_set():
                break
            await self._sleep(self.pause_after(took))
        return total, batches
