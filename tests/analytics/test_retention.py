"""Retention (issue 10): raw usage events past the raw retention are summed into per-minute
rollups and deleted, in bounded steps; every read over a window that reaches into rolled-up
time gives what it gave before the roll-up; a redelivered event already rolled up is
dead-lettered, never counted twice; purchase events go past their own retention (SQLite and
PostgreSQL; 20 000 generated events, behaviour only)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench.bulk import fill_usage_events
from leaky_tokens.analytics.models import DeadLetter, PurchaseEvent, UsageEvent, UsageRollup
from leaky_tokens.analytics.retention import Retention, RetentionConfig
from leaky_tokens.settings import AnalyticsSettings
from leaky_tokens.shared.pacing import Pacing
from tests.analytics.analytics_harness import (
    NOW,
    AnalyticsClient,
    analytics_settings,
    bearer,
    minutes,
    purchase_event,
    running_analytics,
    usage_event,
)
from tests.polling import eventually

ADMIN = bearer(uuid.uuid4(), admin=True)
HOUR = timedelta(hours=1)
USER_7 = uuid.UUID(int=4096 + 7)  # one of the generated users (bench/bulk.py)


def _without_latency(report: dict[str, Any]) -> dict[str, Any]:
    # latency percentiles come from raw events only (rollups keep none)
    return {
        **report,
        "byModel": [
            {k: v for k, v in m.items() if not k.endswith("LatencyMs")} for m in report["byModel"]
        ],
    }


async def _reads(analytics: AnalyticsClient) -> dict[str, Any]:
    """Every aggregate read, over windows that end now and reach 24 h back (whole minutes)."""
    found: dict[str, Any] = {}
    for provider in ("openai", "qwen", "gemini"):
        for window in (60, 600, 1440):
            found[f"report {provider} {window}"] = _without_latency(
                await analytics.ok(
                    "report", ADMIN, provider=provider, windowMinutes=window, byModel="true"
                )
            )
        found[f"anomalies {provider}"] = await analytics.ok(
            "anomalies", ADMIN, provider=provider, windowMinutes=360, baselineWindows=3
        )
        found[f"anomalies {provider} model"] = await analytics.ok(
            "anomalies", ADMIN, provider=provider, windowMinutes=120, model="qwen-plus"
        )
    found["report user"] = _without_latency(
        await analytics.ok(
            "report", bearer(USER_7), provider="qwen", windowMinutes=1440, byModel="true"
        )
    )
    found["top"] = await analytics.ok("top", ADMIN, windowMinutes=1440, limit=10)
    found["top model"] = await analytics.ok("top", ADMIN, windowMinutes=1440, model="gpt-4o-mini")
    for window, bucket in ((1440, None), (960, 60), (10080, None), (120, 300)):
        params: dict[str, Any] = {"windowMinutes": window}
        if bucket:
            params["bucketSeconds"] = bucket
        found[f"timeseries {window} {bucket}"] = await analytics.ok("timeseries", ADMIN, **params)
    found["totals"] = await analytics.service.usage_totals()
    return found


async def _count(analytics: AnalyticsClient, table: Any) -> int:
    async with analytics.service.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def test_reads_over_rolled_up_windows_equal_the_reads_before(
    analytics: AnalyticsClient,
) -> None:
    db = analytics.service.db
    await fill_usage_events(db, 20_000, NOW - 24 * HOUR, NOW, users=50)
    before = await _reads(analytics)
    assert before["totals"][0] == 20_000
    retention = Retention(
        db, analytics.clock, config=RetentionConfig(raw_retention_seconds=6 * 3600, batch=2000)
    )
    totals = await retention.sweep_once()
    # 18 of 24 hours rolled up, in bounded steps of whole minutes
    assert totals.horizon == NOW - 6 * HOUR
    assert totals.rolled_up == 15_000
    assert totals.steps >= 15_000 // 2000
    assert await _count(analytics, UsageEvent) == 5_000
    async with db.read() as session:
        assert await session.scalar(select(func.sum(UsageRollup.events))) == 15_000
    after = await _reads(analytics)
    for name, value in before.items():
        assert after[name] == value, name
    # nothing more is due; a second sweep changes nothing
    again = await retention.sweep_once()
    assert (again.rolled_up, again.horizon) == (0, NOW - 6 * HOUR)
    assert await _reads(analytics) == before


async def test_each_step_is_bounded_and_whole_minutes(analytics: AnalyticsClient) -> None:
    db = analytics.service.db
    await fill_usage_events(db, 6_000, NOW - 10 * HOUR, NOW - 4 * HOUR)  # 1000 an hour
    retention = Retention(
        db, analytics.clock, config=RetentionConfig(raw_retention_seconds=3600, batch=500)
    )
    horizons = []
    while True:
        rolled, horizon, more = await retention.roll_up_step()
        assert rolled <= 500 + 20  # the batch, plus the rest of the minute it ends in
        assert horizon is not None
        assert (horizon.second, horizon.microsecond) == (0, 0)
        horizons.append(horizon)
        if not more:
            break
    assert horizons == sorted(horizons)
    assert len(horizons) >= 12
    assert horizons[-1] == NOW - HOUR
    assert await _count(analytics, UsageEvent) == 0
    assert (await analytics.service.usage_totals())[0] == 6_000


async def test_a_redelivered_event_already_rolled_up_is_dead_lettered_not_counted_twice(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    old = usage_event(user, 40, NOW - 3 * HOUR)
    recent = usage_event(user, 2, NOW - minutes(5))
    await analytics.store(old, recent)
    retention = Retention(
        analytics.service.db, analytics.clock, config=RetentionConfig(raw_retention_seconds=3600)
    )
    await retention.sweep_once()
    report = await analytics.ok("report", bearer(user), provider="openai", windowMinutes=240)
    assert (report["totalEvents"], report["totalTokens"]) == (2, 42)
    await analytics.store(old, recent)  # redelivered: the old one is past the horizon now
    report = await analytics.ok("report", bearer(user), provider="openai", windowMinutes=240)
    assert (report["totalEvents"], report["totalTokens"]) == (2, 42)
    async with analytics.service.db.read() as session:
        dead = (await session.execute(select(DeadLetter))).scalars().all()
    assert [(d.event_id, d.reason) for d in dead] == [(old.event_id, "late")]
    text = (await analytics.http.get("/metrics")).text
    assert 'analytics_events_dead_lettered_total{reason="late",stream="usage"} 1.0' in text
    await analytics.store(old)  # dead-lettered once
    assert await _count(analytics, DeadLetter) == 1


async def test_the_usage_list_shows_raw_events_and_the_report_both(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    await analytics.store(
        usage_event(user, 10, NOW - 2 * HOUR), usage_event(user, 5, NOW - minutes(1))
    )
    retention = Retention(
        analytics.service.db, analytics.clock, config=RetentionConfig(raw_retention_seconds=3600)
    )
    await retention.sweep_once()
    listed = await analytics.ok("usage", bearer(user), provider="openai")
    assert [i["tokens"] for i in listed["items"]] == [5]
    report = await analytics.ok("report", bearer(user), provider="openai", windowMinutes=180)
    assert report["totalTokens"] == 15


async def test_purchase_events_are_purged_past_their_retention(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    await analytics.store(
        purchase_event(user, 100, NOW - 40 * 24 * HOUR, "PurchaseCompleted"),
        purchase_event(user, 200, NOW - 2 * 24 * HOUR, "PurchaseCompleted"),
    )
    retention = Retention(
        analytics.service.db,
        analytics.clock,
        config=RetentionConfig(purchase_retention_seconds=30 * 86_400, batch=1),
    )
    totals = await retention.sweep_once()
    assert totals.purchases_purged == 1
    assert await _count(analytics, PurchaseEvent) == 1
    listed = await analytics.ok("purchases", bearer(user))
    assert [i["tokens"] for i in listed["items"]] == [200]


async def test_events_arriving_while_the_horizon_moves_count_exactly_once(
    analytics: AnalyticsClient,
) -> None:
    """Batches land while roll-up steps move the horizon through their times: every event is
    counted once (raw or rolled up) or dead-lettered as late, never both, never neither; a
    second delivery of everything, while the horizon moves on, changes no count."""
    import asyncio
    import random

    rng = random.Random(3)
    user = uuid.uuid4()
    start = NOW - 3 * HOUR
    events = [usage_event(user, 1 + i % 7, start + timedelta(seconds=5 * i)) for i in range(1200)]
    shuffled = rng.sample(events, len(events))
    batches = [shuffled[i : i + 40] for i in range(0, len(shuffled), 40)]
    retention = Retention(
        analytics.service.db,
        analytics.clock,
        config=RetentionConfig(
            raw_retention_seconds=3 * 3600, batch=50, pacing=Pacing(pause_seconds=0)
        ),
    )

    async def roll(steps: int) -> None:
        for _ in range(steps):  # the horizon walks 4 minutes a step through the events' times
            analytics.clock.advance(240)
            await retention.sweep_once()

    async def deliver(chunk: list[Any]) -> None:
        for batch in chunk:
            await analytics.store(*batch)

    async def late_ids() -> list[uuid.UUID]:
        async with analytics.service.db.read() as session:
            return list((await session.execute(select(DeadLetter.event_id))).scalars().all())

    await asyncio.gather(roll(15), *(deliver(batches[k::4]) for k in range(4)))
    counted_events, counted_tokens = await analytics.service.usage_totals()
    late = await late_ids()
    assert len(set(late)) == len(late)
    assert late  # the race was run: some arrived behind the horizon, most before it
    assert counted_events > len(late)
    by_id = {e.event_id: e for e in events}
    assert counted_events + len(late) == len(events)
    everything = sum(e.payload["tokens"] for e in events)
    assert counted_tokens == everything - sum(by_id[i].payload["tokens"] for i in late)
    # everything again (a relay that lost its marks), while the horizon moves on
    await asyncio.gather(roll(15), *(deliver(batches[k::4]) for k in range(4)))
    assert await analytics.service.usage_totals() == (counted_events, counted_tokens)
    assert set(late) <= set(await late_ids())


async def test_the_service_runs_retention_from_its_settings(
    database_url: str, tmp_path: Path
) -> None:
    settings = analytics_settings(
        database_url,
        tmp_path,
    ).model_copy(
        update={
            "analytics": AnalyticsSettings(
                database_url=database_url,
                raw_retention_seconds=3600,
                retention_every_seconds=0.05,
            )
        }
    )
    async with running_analytics(database_url, tmp_path, settings=settings) as analytics:
        user = uuid.uuid4()
        # within the raw retention when they arrive (the horizon moves with time, events or
        # not: the sweeper already took it to now - 1 h)
        await analytics.store(usage_event(user, 9, NOW - minutes(30)), usage_event(user, 1, NOW))
        analytics.clock.advance(3600)  # an hour later, the first is past the raw retention

        async def rolled_up() -> bool:
            return await _count(analytics, UsageEvent) == 1

        await eventually(rolled_up, within=30, what="the old event rolled up")
        report = await analytics.ok("report", bearer(user), provider="openai", windowMinutes=180)
        assert report["totalTokens"] == 10
        registry = analytics.app.state.metrics.registry
        assert registry.get_sample_value("analytics_rollup_events_total") == 1
        horizon = registry.get_sample_value("analytics_rollup_horizon_timestamp_seconds")
        assert horizon == NOW.timestamp()
        assert "analytics_rollup_events_total 1.0" in (await analytics.http.get("/metrics")).text


async def test_dead_letters_are_purged_past_their_retention(analytics: AnalyticsClient) -> None:
    user = uuid.uuid4()
    unreadable = [
        usage_event(user, 1, NOW).model_copy(update={"payload": {"decision": "ALLOWED"}})
        for _ in range(3)
    ]
    await analytics.store(unreadable[0])
    analytics.clock.advance(10 * 86_400)
    await analytics.store(*unreadable[1:])
    retention = Retention(
        analytics.service.db,
        analytics.clock,
        config=RetentionConfig(dead_letter_retention_seconds=5 * 86_400, batch=1),
    )
    totals = await retention.sweep_once()
    assert totals.dead_letters_purged == 1
    async with analytics.service.db.read() as session:
        kept = set((await session.execute(select(DeadLetter.event_id))).scalars().all())
    assert kept == {e.event_id for e in unreadable[1:]}


async def test_a_slow_roll_up_is_paced_and_still_reaches_its_horizon(
    analytics: AnalyticsClient,
) -> None:
    """Each roll-up step 'takes' 0.4 s on the injected clock: the steps shrink (the same pacer
    as the outbox sweeper's), each is followed by a pause of 0.4 * 0.9 / 0.1 = 3.6 s (recorded,
    not slept), and the sweep still rolls up everything past the raw retention."""
    import pytest

    db = analytics.service.db
    await fill_usage_events(db, 3_000, NOW - 12 * HOUR, NOW, users=20)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    retention = Retention(
        db,
        analytics.clock,
        config=RetentionConfig(
            raw_retention_seconds=6 * 3600,
            batch=400,
            pacing=Pacing(duty_cycle=0.1, slow_batch_seconds=0.1),
        ),
        sleep=sleep,
    )
    batches: list[int] = []
    real_step = retention.roll_up_step

    async def slow_step(batch: int | None = None) -> Any:
        batches.append(batch or 0)
        result = await real_step(batch)
        analytics.clock.advance(0.4)  # NOW is a whole minute: the horizon's target stays put
        return result

    retention.roll_up_step = slow_step  # type: ignore[method-assign]
    totals = await retention.sweep_once()
    assert totals.horizon == NOW - 6 * HOUR
    assert totals.rolled_up == 1_500
    assert await _count(analytics, UsageEvent) == 1_500
    assert batches[:3] == [400, 200, 100]
    assert min(batches) == 400 // 16
    assert totals.steps == len(batches)
    # between roll-up steps (not after the last one): 3.6 s each; then the purges, fast
    assert sleeps[: len(batches) - 1] == [pytest.approx(3.6)] * (len(batches) - 1)
