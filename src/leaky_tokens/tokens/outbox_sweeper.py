"""The outbox sweeper: purges `token_outbox` rows published longer ago than the retention
setting, so the table holds the backlog and a recent tail, not every event ever written.

Bounded: each transaction deletes at most `batch` rows (one statement over the published_at
index) and commits, and the sweeper yields between batches. The hot path (/consume inserts an
outbox row in its own transaction) therefore waits at most one short batch on SQLite, whose
single write lock both need, and not at all on PostgreSQL, where a DELETE of old rows and an
INSERT of new ones take no common lock. Only published rows go: what the relay has not sent
yet is never touched, whatever its age.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.tokens.outbox_relay import OutboxMetrics
from leaky_tokens.tokens.outbox_repository import OutboxRepository

log = logging.getLogger("leaky_tokens.tokens.outbox")


@dataclass(frozen=True, slots=True)
class SweeperConfig:
    retention_seconds: float = 86_400.0  # published rows are kept this long
    batch: int = 1000  # rows per DELETE (one short transaction)
    every_seconds: float = 30.0  # a sweep runs this often (until nothing is left to purge)
    pause_seconds: float = 0.005  # between two batches of a sweep: writers go first


class OutboxSweeper:
    def __init__(
        self,
        database: Database,
        *,
        config: SweeperConfig | None = None,
        clock: Clock | None = None,
        metrics: OutboxMetrics | None = None,
    ) -> None:
        self.db = database
        self.config = config or SweeperConfig()
        self.clock = clock or SystemClock()
        self.metrics = metrics
        self._lock_rows = not database.is_sqlite
        self._stopping = asyncio.Event()

    def request_stop(self) -> None:
        self._stopping.set()

    async def purge_batch(self) -> int:
        """One bounded DELETE in its own transaction; returns the rows it purged."""
        before = self.clock.now() - timedelta(seconds=self.config.retention_seconds)
        async with self.db.transaction() as session:
            purged = await OutboxRepository(session).purge_published(
                before, self.config.batch, lock=self._lock_rows
            )
        if self.metrics is not None:
            self.metrics.purge_batches.inc()
            if purged:
                self.metrics.purged.inc(purged)
        return purged

    async def sweep_once(self) -> int:
        """Purge batch after batch until one comes back short (or a stop is asked)."""
        total = 0
        while not self._stopping.is_set():
            purged = await self.purge_batch()
            total += purged
            if purged < self.config.batch:
                break
            await asyncio.sleep(self.config.pause_seconds)
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.every_seconds)
