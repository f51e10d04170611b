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
the sweep yields between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from leaky_tokens.analytics.consumers import AnalyticsMetrics
from leaky_tokens.analytics.repository import AnalyticsRepository
from leaky_tokens.shared.clock import Clock
from leaky_tokens.shared.database import Database

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
    pause_seconds: float = 0.005


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
    ) -> None:
        self.db = database
        self.clock = clock
        self.config = config or RetentionConfig()
        self.metrics = metrics
        self._stopping = asyncio.Event()

    def request_stop(self) -> None:
        self._stopping.set()

    def raw_horizon_target(self) -> datetime:
        """Where the horizon is heading: the minute holding now - raw retention."""
        return minute_floor(self.clock.now() - timedelta(seconds=self.config.raw_retention_seconds))

    async def roll_up_step(self) -> tuple[int, datetime | None, bool]:
        """One bounded roll-up transaction: (raw events rolled up, the horizon after it, whether
        more is due)."""
        target = self.raw_horizon_target()
        async with self.db.transaction() as session:
            repo = AnalyticsRepository(session)
            horizon = await repo.rollup_horizon(lock="update")
            if horizon is not None and target <= horizon:
                return 0, horizon, False
            step = target
            kth = await repo.raw_time_at(target, self.config.batch)
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

    async def purge_purchases_batch(self) -> int:
        before = self.clock.now() - timedelta(seconds=self.config.purchase_retention_seconds)
        async with self.db.transaction() as session:
            purged = await AnalyticsRepository(session).purge_purchases_before(
                before, self.config.batch
            )
        if purged and self.metrics is not None:
            self.metrics.purchases_purged.inc(purged)
        return purged

    async def purge_dead_letters_batch(self) -> int:
        before = self.clock.now() - timedelta(seconds=self.config.dead_letter_retention_seconds)
        async with self.db.transaction() as session:
            return await AnalyticsRepository(session).purge_dead_letters_before(
                before, self.config.batch
            )

    async def sweep_once(self) -> SweepTotals:
        """Roll up step after step until the horizon reaches its target, then purge old
        purchase events and dead letters batch after batch (or until a stop is asked)."""
        rolled = steps = purged = dead = 0
        horizon: datetime | None = None
        more = True
        while more and not self._stopping.is_set():
            count, horizon, more = await self.roll_up_step()
            rolled += count
            steps += 1
            await asyncio.sleep(self.config.pause_seconds)
        while not self._stopping.is_set():
            count = await self.purge_purchases_batch()
            purged += count
            if count < self.config.batch:
                break
            await asyncio.sleep(self.config.pause_seconds)
        while not self._stopping.is_set():
            count = await self.purge_dead_letters_batch()
            dead += count
            if count < self.config.batch:
                break
            await asyncio.sleep(self.config.pause_seconds)
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.every_seconds)
