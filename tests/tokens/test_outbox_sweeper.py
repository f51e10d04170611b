"""The outbox sweeper (issue 10): purges only rows published longer ago than the retention, in
bounded batches (one short transaction each), never an unpublished row, while /consume keeps
writing the outbox; counted in /metrics (SQLite + memory and PostgreSQL + Redis)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Table, func, insert, select

from leaky_tokens.shared.database import Database
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.tokens.models import OutboxEvent
from leaky_tokens.tokens.outbox_relay import OutboxMetrics
from leaky_tokens.tokens.outbox_sweeper import OutboxSweeper, SweeperConfig
from leaky_tokens.tokens.service import ConsumeRequest
from tests.tokens.conftest import Rig, user

DAY = timedelta(days=1)


async def bulk_outbox(
    db: Database, n: int, *, created: datetime, published: datetime | None
) -> None:
    """`n` outbox rows in one multi-row INSERT (fast; not through /consume)."""
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        event_id = uuid.uuid4()
        rows.append(
            {
                "event_id": event_id,
                "stream": "usage",
                "event_type": "TokensConsumed",
                "aggregate_id": str(uuid.uuid4()),
                "payload": {"eventId": str(event_id), "tokens": 1},
                "created_at": created,
                "published_at": published,
            }
        )
    async with db.transaction() as session:
        for start in range(0, n, 5000):
            await session.execute(
                insert(cast(Table, OutboxEvent.__table__)), rows[start : start + 5000]
            )


async def counts(db: Database) -> tuple[int, int]:
    """(published rows, unpublished rows) left in the outbox."""
    async with db.read() as session:
        published = await session.scalar(
            select(func.count()).where(OutboxEvent.published_at.is_not(None))
        )
        waiting = await session.scalar(
            select(func.count()).where(OutboxEvent.published_at.is_(None))
        )
    return int(published or 0), int(waiting or 0)


async def test_purges_only_rows_published_before_the_retention_in_bounded_batches(
    rig: Rig,
) -> None:
    now = datetime.now(UTC)
    await bulk_outbox(rig.db, 2500, created=now - 3 * DAY, published=now - 2 * DAY)  # old
    await bulk_outbox(rig.db, 40, created=now - 3 * DAY, published=now - DAY / 2)  # recent
    await bulk_outbox(rig.db, 30, created=now - 9 * DAY, published=None)  # never sent: kept
    registry = CollectorRegistry()
    metrics = OutboxMetrics(registry)
    sweeper = OutboxSweeper(
        rig.db,
        config=SweeperConfig(retention_seconds=DAY.total_seconds(), batch=1000),
        metrics=metrics,
    )
    # one batch is one bounded statement
    assert await sweeper.purge_batch() == 1000
    assert await counts(rig.db) == (1540, 30)
    # a sweep goes on batch after batch until a short one
    assert await sweeper.sweep_once() == 1500
    assert await counts(rig.db) == (40, 30)
    assert await sweeper.sweep_once() == 0
    assert registry.get_sample_value("tokens_outbox_purged_events_total") == 2500
    # 1000, then 1000 + 500 (short: the sweep ends), then an empty one
    assert registry.get_sample_value("tokens_outbox_purge_batches_total") == 4


async def test_consumes_go_on_while_the_sweeper_purges(rig: Rig) -> None:
    now = datetime.now(UTC)
    await bulk_outbox(rig.db, 6000, created=now - 3 * DAY, published=now - 2 * DAY)
    user_id = await rig.new_user_pool(1_000_000)
    principal = user(user_id)
    sweeper = OutboxSweeper(
        rig.db, config=SweeperConfig(retention_seconds=DAY.total_seconds(), batch=200)
    )

    async def consume(n: int) -> int:
        done = 0
        for _ in range(n):
            await rig.service.consume_tokens(
                principal, ConsumeRequest(user_id, None, "openai", 1, "hi"), None
            )
            done += 1
        return done

    purged, *consumed = await asyncio.gather(sweeper.sweep_once(), *(consume(10) for _ in range(5)))
    assert purged == 6000
    assert sum(consumed) == 50
    # every consume's event is still waiting for the relay; the old published rows are gone
    assert await counts(rig.db) == (0, 50)
    assert await rig.remaining(user_id) == 1_000_000 - 50


async def test_a_stopped_sweeper_ends_its_run(rig: Rig) -> None:
    sweeper = OutboxSweeper(rig.db, config=SweeperConfig(every_seconds=3600))
    task = asyncio.create_task(sweeper.run())
    await asyncio.sleep(0)
    sweeper.request_stop()
    await asyncio.wait_for(task, 30)


async def test_the_token_service_runs_the_sweeper_from_its_settings(
    database_url: str, tmp_path: Path
) -> None:
    from leaky_tokens.settings import Settings
    from leaky_tokens.tokens.app import create_tokens_app
    from tests.analytics.analytics_harness import FakeAuthenticator
    from tests.polling import eventually

    await upgrade_database(database_url, "tokens")
    db = Database(database_url)
    now = datetime.now(UTC)
    try:
        await bulk_outbox(db, 1500, created=now - 3 * DAY, published=now - 2 * DAY)
        await bulk_outbox(db, 5, created=now - 3 * DAY, published=None)
        settings = Settings(
            data_dir=tmp_path,
            access_log=False,
            redis_url="",
            internal_token="t",
            tokens={"database_url": database_url},
            events={
                "transport": "http",
                "relay_enabled": False,
                "outbox_retention_seconds": 3600,
                "outbox_sweep_batch": 500,
                "outbox_sweep_every_seconds": 0.05,
                "outbox_sweep_duty_cycle": 0.5,
                "outbox_sweep_pause_seconds": 0.01,
            },
        )
        app = create_tokens_app(settings, authenticator=FakeAuthenticator())
        async with app.router.lifespan_context(app):

            async def swept() -> bool:
                return await counts(db) == (0, 5)

            await eventually(swept, within=30, what="old published rows purged")
            registry = app.state.metrics.registry
            assert registry.get_sample_value("tokens_outbox_purged_events_total") == 1500
    finally:
        await db.dispose()


async def test_a_slow_sweep_is_paced_and_still_purges_the_whole_backlog(rig: Rig) -> None:
    """Each DELETE 'takes' 0.3 s on an injected clock (a busy database): the sweeper halves its
    batches down to the floor, asks for 0.3 * 0.9 / 0.1 = 2.7 s after each, and purges every
    old row anyway; the sleeps are recorded, not slept."""
    from leaky_tokens.shared.clock import FakeClock
    from leaky_tokens.shared.pacing import Pacing

    now = datetime.now(UTC)
    await bulk_outbox(rig.db, 2000, created=now - 3 * DAY, published=now - 2 * DAY)
    await bulk_outbox(rig.db, 7, created=now - 3 * DAY, published=None)
    clock = FakeClock(now)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)

    sweeper = OutboxSweeper(
        rig.db,
        config=SweeperConfig(
            retention_seconds=DAY.total_seconds(),
            batch=800,
            pacing=Pacing(duty_cycle=0.1, pause_seconds=0.005, slow_batch_seconds=0.1),
        ),
        clock=clock,
        sleep=sleep,
    )
    limits: list[int] = []
    real_purge = sweeper.purge_batch

    async def slow_purge(limit: int | None = None) -> int:
        limits.append(limit or 0)
        clock.advance(0.3)
        return await real_purge(limit)

    sweeper.purge_batch = slow_purge  # type: ignore[method-assign]
    assert await sweeper.sweep_once() == 2000
    assert await counts(rig.db) == (0, 7)
    assert limits[:4] == [800, 400, 200, 100]
    assert min(limits) == 800 // 16
    assert sleeps == [pytest.approx(2.7)] * (len(limits) - 1)
    # the size learned is kept for the next sweep
    assert sweeper.pacer.batch == 800 // 16
