"""Retention of analytics: raw usage events are kept `raw_retention_seconds`; past that they are
summed into per-minute rollups (usage_rollup) and deleted, and reads over older windows count
the rollups, so reports stay exact. Purchase events are deleted past their own retention.

Exactly once: a roll-up step is one transaction that sums every raw event before a minute
boundary into rollups, deletes those events and moves the horizon (usage_rollup_state) to that
boundary. An event is thus raw or rolled up, never both, never neither. Ingestion checks each
event against the horizon in its own transaction (PostgreSQL: the horizon row FOR SHARE, the
step takes it FOR UPDATE, so they take turns; SQLite has one writer anyway): an event from
before the horizon — a redelivery of an event already rolled up, or one that arrived later
than the whole raw retention — is dead-lettered as `late`, never counted twice.

Bounded: a step rolls up at most about `batch` raw events (whole minutes: it ends at the minute
holding the batch-th oldest event, or one minute further when a single minute holds more), and
the sweep yields between steps, paced like the outbox sweeper (shared/pacing.py: a duty cycle,
smaller steps when a step is slow).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from leaky_tokens.analytics.consumers import AnalyticsMetrics
from leaky_tokens.analytics.repository import AnalyticsRepository
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.pacing import BatchPacer, Pacing, pause_unless_stopped

log = logging.getLogger("leaky_tokens.analytics")

MINUTE = timedelta(minutes=1)


def minute_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    raw_retention_seconds: float = 7 * 86_400.0
    purchase_retention_seconds: float = 90 * 86_400.0
    dead_letter_retention_seconds: float = 30 * 86_400.0
    batch: int = 5000  # raw events per roll-up transaction (about), purchase rows per DELETE
    every_seconds: float = 60.0
    pacing: Pacing = field(default_factory=Pacing)  # between two steps: writers go first


@dataclass(frozen=True, slots=True)
class SweepTotals:
    rolled_up: int  # raw usage events moved into rollups
    steps: int  # roll-up transactions
    purchases_purged: int
    horizon: datetime | None
    dead_letters_purged: int = 0


class Retention:
    def __init__(
        self,
        database: Database,
        clock: Clock,
        *,
        config: RetentionConfig | None = None,
        metrics: AnalyticsMetrics | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.db = database
        self.clock = clock
        self.config = config or RetentionConfig()
        self.metrics = metrics
        self._stopping = asyncio.Event()
        # one pacer per kind of batch: each learns its own size
        self.pacers = {
            kind: BatchPacer(
                self.config.batch,
                self.config.pacing,
                monotonic=clock.monotonic,
                sleep=sleep or self._pause,
            )
            for kind in ("rollup", "purchases", "dead_letters")
        }

    async def _pause(self, seconds: float) -> None:
        await pause_unless_stopped(self._stopping, seconds)

    def request_stop(self) -> None:
        self._stopping.set()

    def raw_horizon_target(self) -> datetime:
        """Where the horizon is heading: the minute holding now - raw retention."""
        return minute_floor(self.clock.now() - timedelta(seconds=self.config.raw_retention_seconds))

    async def roll_up_step(self, batch: int | None = None) -> tuple[int, datetime | None, bool]:
        """One bounded roll-up transaction of about `batch` raw events (the configured batch by
        default): (raw events rolled up, the horizon after it, whether more is due)."""
        batch = batch or self.config.batch
        target = self.raw_horizon_target()
        async with self.db.transaction() as session:
            repo = AnalyticsRepository(session)
            horizon = await repo.rollup_horizon(lock="update")
            if horizon is not None and target <= horizon:
                return 0, horizon, False
            step = target
            kth = await repo.raw_time_at(target, batch)
            if kth is not None:
                oldest = await repo.raw_time_at(target, 0)
                assert oldest is not None  # a later row exists, so a first one does
                step = max(minute_floor(kth), minute_floor(oldest) + MINUTE)
            if horizon is not None:
                step = max(step, horizon)
            rolled = await repo.roll_up_before(step)
        if self.metrics is not None:
            self.metrics.rollup_batches.inc()
            if rolled:
                self.metrics.rolled_up.inc(rolled)
            self.metrics.horizon.set(step.timestamp())
        return rolled, step, step < target

    async def purge_purchases_batch(self, limit: int | None = None) -> int:
        before = self.clock.now() - timedelta(seconds=self.config.purchase_retention_seconds)
        async with self.db.transaction() as session:
            purged = await AnalyticsRepository(session).purge_purchases_before(
                before, limit or self.config.batch
            )
        if purged and self.metrics is not None:
            self.metrics.purchases_purged.inc(purged)
        return purged

    async def purge_dead_letters_batch(self, limit: int | None = None) -> int:
        before = self.clock.now() - timedelta(seconds=self.config.dead_letter_retention_seconds)
        async with self.db.transaction() as session:
            return await AnalyticsRepository(session).purge_dead_letters_before(
                before, limit or self.config.batch
            )

    async def sweep_once(self) -> SweepTotals:
        """Roll up step after step until the horizon reaches its target, then purge old
        purchase events and dead letters batch after batch (or until a stop is asked)."""
        horizon: datetime | None = None

        async def roll(batch: int) -> tuple[int, bool]:
            nonlocal horizon
            count, horizon, more = await self.roll_up_step(batch)
            return count, more

        async def purchases(limit: int) -> tuple[int, bool]:
            count = await self.purge_purchases_batch(limit)
            return count, count >= limit

        async def dead_letters(limit: int) -> tuple[int, bool]:
            count = await self.purge_dead_letters_batch(limit)
            return count, count >= limit

        rolled, steps = await self.pacers["rollup"].drain(roll, self._stopping)
        purged, _ = await self.pacers["purchases"].drain(purchases, self._stopping)
        dead, _ = await self.pacers["dead_letters"].drain(dead_letters, self._stopping)
        return SweepTotals(rolled, steps, purged, horizon, dead)

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                totals = await self.sweep_once()
                if totals.rolled_up or totals.purchases_purged:
                    log.info(
                        "retention: %d raw usage events rolled up (%d steps, horizon %s), "
                        "%d purchase events purged",
                        totals.rolled_up,
                        totals.steps,
                        totals.horizon.isoformat() if totals.horizon else "-",
                        totals.purchases_purged,
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("retention sweep failed; retrying next round", exc_info=True)
            await pause_unless_stopped(self._stopping, self.config.every_seconds)
