"""The outbox sweeper: purges `token_outbox` rows published longer ago than the retention
setting, so the table holds the backlog and a recent tail, not every event ever written.

Bounded: each transaction deletes at most `batch` rows (one statement over the published_at
index) and commits, and the sweeper yields between batches, paced (shared/pacing.py): after a
batch that took t seconds it pauses at least t * (1 - d) / d (d = `pacing.duty_cycle`, 0.1 by
default), and a batch slower than `pacing.slow_batch_seconds` halves the next one. The hot
path (/consume inserts an outbox row in its own transaction) therefore waits at most one short
batch on SQLite, whose single write lock both need, and has the lock at least 1 - d of the
time; on PostgreSQL a DELETE of old rows and an INSERT of new ones take no common lock. Only
published rows go: what the relay has not sent yet is never touched, whatever its age.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.pacing import BatchPacer, Pacing, pause_unless_stopped
from leaky_tokens.tokens.outbox_relay import OutboxMetrics
from leaky_tokens.tokens.outbox_repository import OutboxRepository

log = logging.getLogger("leaky_tokens.tokens.outbox")


@dataclass(frozen=True, slots=True)
class SweeperConfig:
    retention_seconds: float = 86_400.0  # published rows are kept this long
    batch: int = 1000  # rows per DELETE at most (one short transaction; smaller when slow)
    every_seconds: float = 30.0  # a sweep runs this often (until nothing is left to purge)
    pacing: Pacing = field(default_factory=Pacing)  # between two batches: writers go first


class OutboxSweeper:
    def __init__(
        self,
        database: Database,
        *,
        config: SweeperConfig | None = None,
        clock: Clock | None = None,
        metrics: OutboxMetrics | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.db = database
        self.config = config or SweeperConfig()
        self.clock = clock or SystemClock()
        self.metrics = metrics
        self._lock_rows = not database.is_sqlite
        self._stopping = asyncio.Event()
        self.pacer = BatchPacer(
            self.config.batch,
            self.config.pacing,
            monotonic=self.clock.monotonic,
            sleep=sleep or self._pause,
        )

    async def _pause(self, seconds: float) -> None:
        await pause_unless_stopped(self._stopping, seconds)

    def request_stop(self) -> None:
        self._stopping.set()

    async def purge_batch(self, limit: int | None = None) -> int:
        """One bounded DELETE (at most `limit` rows, the configured batch by default) in its own
        transaction; returns the rows it purged."""
        before = self.clock.now() - timedelta(seconds=self.config.retention_seconds)
        async with self.db.transaction() as session:
            purged = await OutboxRepository(session).purge_published(
                before, limit or self.config.batch, lock=self._lock_rows
            )
        if self.metrics is not None:
            self.metrics.purge_batches.inc()
            if purged:
                self.metrics.purged.inc(purged)
        return purged

    async def sweep_once(self) -> int:
        """Purge batch after batch, paced, until one comes back short (or a stop is asked)."""

        async def step(limit: int) -> tuple[int, bool]:
            purged = await self.purge_batch(limit)
            return purged, purged >= limit

        total, _ = await self.pacer.drain(step, self._stopping)
        return total

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                purged = await self.sweep_once()
                if purged:
                    log.info("outbox sweeper purged %d published rows", purged)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("outbox sweep failed; retrying next round", exc_info=True)
            await pause_unless_stopped(self._stopping, self.config.every_seconds)
