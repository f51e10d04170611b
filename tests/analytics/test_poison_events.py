"""Poison events (issue 9): a batch the database refuses is split to find the event it refuses;
that event goes to the dead-letter table with its error, is counted in /metrics, and the rest
of the batch is stored, so the stream moves on — over HTTP push and over Redis Streams, on
SQLite and PostgreSQL. A database that refuses everything dead-letters nothing: the batch is
refused (503) and delivered again later."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from sqlalchemy import select, text

from leaky_tokens.analytics.models import DeadLetter
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.events import RedisStreamPublisher
from tests.analytics.analytics_harness import (
    NOW,
    AnalyticsClient,
    analytics_settings,
    bearer,
    minutes,
    running_analytics,
    usage_event,
)
from tests.backends import REDIS_URL, need_redis
from tests.polling import eventually

_SQLITE_REFUSE = """
CREATE TRIGGER refuse_{name} BEFORE INSERT ON {table} {when}
BEGIN SELECT RAISE(ABORT, 'poison event refused by a trigger'); END
"""
_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION refuse_{name}() RETURNS trigger AS $$
BEGIN
  IF {condition} THEN RAISE EXCEPTION 'poison event refused by a trigger'; END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql
"""
_PG_TRIGGER = """
CREATE TRIGGER refuse_{name} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION
refuse_{name}()
"""


async def refuse(db: Database, name: str, table: str, *, poison_only: bool) -> None:
    """Make the database refuse rows of `table`: those with request_id 'poison', or all."""
    async with db.transaction() as session:
        if db.is_sqlite:
            when = "WHEN NEW.request_id = 'poison'" if poison_only else ""
            await session.execute(text(_SQLITE_REFUSE.format(name=name, table=table, when=when)))
        else:
            condition = "NEW.request_id = 'poison'" if poison_only else "true"
            await session.execute(text(_PG_FUNCTION.format(name=name, condition=condition)))
            await session.execute(text(_PG_TRIGGER.format(name=name, table=table)))


async def allow(db: Database, name: str, table: str) -> None:
    async with db.transaction() as session:
        if db.is_sqlite:
            await session.execute(text(f"DROP TRIGGER refuse_{name}"))
        else:
            await session.execute(text(f"DROP TRIGGER refuse_{name} ON {table}"))


def batch_with_poison(user: uuid.UUID, good: int = 9) -> tuple[list[Any], Any]:
    events = [usage_event(user, 10 + i, NOW - minutes(i + 1)) for i in range(good)]
    poison = usage_event(user, 1000, NOW - minutes(30)).model_copy(deep=True)
    poison.payload["requestId"] = "poison"
    events.insert(good // 2, poison)
    return events, poison


async def dead_letters(db: Database) -> list[DeadLetter]:
    async with db.read() as session:
        return list((await session.execute(select(DeadLetter))).scalars().all())


def dead_count(app: Any, reason: str = "failed") -> float | None:
    registry = app.state.metrics.registry
    return registry.get_sample_value(
        "analytics_events_dead_lettered_total", {"stream": "usage", "reason": reason}
    )


async def test_http_push_a_poison_event_is_dead_lettered_and_the_rest_stored(
    analytics: AnalyticsClient,
) -> None:
    db = analytics.service.db
    await refuse(db, "poison", "usage_event", poison_only=True)
    user = uuid.uuid4()
    events, poison = batch_with_poison(user)
    response = await analytics.ingest(*events)
    assert response.status_code == 200, response.text  # handled: the relay moves on
    assert await analytics.service.usage_totals() == (9, sum(range(10, 19)))
    (dead,) = await dead_letters(db)
    assert (dead.event_id, dead.reason, dead.stream) == (poison.event_id, "failed", "usage")
    assert "poison event refused by a trigger" in dead.error
    assert '"requestId": "poison"' in dead.event  # the event as it came, to replay by hand
    assert dead_count(analytics.app) == 1
    # the relay sends the same batch again (it lost its marks): nothing doubles
    assert (await analytics.ingest(*events)).status_code == 200
    assert await analytics.service.usage_totals() == (9, sum(range(10, 19)))
    assert len(await dead_letters(db)) == 1
    # and the stream goes on
    await analytics.store(usage_event(user, 5, NOW - minutes(1)))
    assert (await analytics.service.usage_totals())[0] == 10
    assert "analytics_events_dead_lettered_total" in (await analytics.http.get("/metrics")).text
    listed = await analytics.ok("admin/dead-letters", bearer(uuid.uuid4(), admin=True))
    assert [(i["eventId"], i["reason"]) for i in listed["items"]] == [
        (str(poison.event_id), "failed")
    ]
    refused = await analytics.get("admin/dead-letters", bearer(user))
    assert refused.status_code == 403


async def test_unreadable_payloads_are_dead_lettered_as_invalid(
    analytics: AnalyticsClient,
) -> None:
    user = uuid.uuid4()
    bad = usage_event(user, 20, NOW).model_copy(update={"payload": {"decision": "ALLOWED"}})
    await analytics.store(usage_event(user, 20, NOW), bad)
    (dead,) = await dead_letters(analytics.service.db)
    assert (dead.event_id, dead.reason) == (bad.event_id, "invalid")
    assert "userId" in dead.error
    assert dead_count(analytics.app, "invalid") == 1


async def test_a_database_refusing_everything_dead_letters_nothing(
    analytics: AnalyticsClient,
) -> None:
    db = analytics.service.db
    await refuse(db, "all_usage", "usage_event", poison_only=False)
    await refuse(db, "all_dead", "event_dead_letter", poison_only=False)
    user = uuid.uuid4()
    events = [usage_event(user, 7, NOW - minutes(i + 1)) for i in range(6)]
    response = await analytics.ingest(*events)
    assert response.status_code == 503, response.text  # the publisher keeps it and retries
    await allow(db, "all_dead", "event_dead_letter")
    await allow(db, "all_usage", "usage_event")
    assert await dead_letters(db) == []
    await analytics.store(*events)  # the retry
    assert await analytics.service.usage_totals() == (6, 42)


async def test_redis_streams_a_poison_event_does_not_block_the_stream(
    database_url: str, tmp_path: Path
) -> None:
    need_redis()
    prefix = f"lt:test:poison:{uuid.uuid4().hex}:"
    settings = analytics_settings(database_url, tmp_path).model_copy(
        update={
            "redis_url": REDIS_URL,
            "events": analytics_settings(database_url, tmp_path).events.model_copy(
                update={"transport": "redis", "stream_prefix": prefix}
            ),
        }
    )
    client = redis.Redis.from_url(REDIS_URL)
    try:
        async with running_analytics(database_url, tmp_path, settings=settings) as analytics:
            db = analytics.service.db
            await refuse(db, "poison", "usage_event", poison_only=True)
            publisher = RedisStreamPublisher(client, prefix=prefix)
            user = uuid.uuid4()
            events, poison = batch_with_poison(user)
            await publisher.publish(events)

            async def stored(n: int) -> bool:
                return (await analytics.service.usage_totals())[0] == n

            async def stored_good() -> bool:
                return await stored(9)

            await eventually(stored_good, within=30, what="the good events stored")
            (dead,) = await dead_letters(db)
            assert (dead.event_id, dead.reason) == (poison.event_id, "failed")
            assert dead_count(analytics.app) == 1
            later = [usage_event(user, 1, NOW - minutes(1)) for _ in range(3)]
            await publisher.publish(later)

            async def stored_later() -> bool:
                return await stored(12)

            await eventually(stored_later, within=30, what="later events stored")

            async def no_lag() -> bool:
                lag = await analytics.app.state.consumers.lag()
                return sum(lag.values()) == 0

            await eventually(no_lag, within=30, what="every entry acknowledged")
            assert len(await dead_letters(db)) == 1
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
