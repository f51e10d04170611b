"""Exactly-once effect from the tokens outbox to the analytics store, through real transports:
SQLite + HTTP push (a real HTTP server) and PostgreSQL + Redis Streams.

A relay is killed between sending a batch and marking it, a second relay takes over, and the
analytics service is restarted while events keep coming; afterwards analytics holds every usage
event of the outbox exactly once (same ids, same count, same token sum) and no purchase event
counts as usage."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as redis
from sqlalchemy import Table, func, insert, select

from leaky_tokens.analytics.app import EVENTS_PATH, create_analytics_app
from leaky_tokens.analytics.models import PurchaseEvent, UsageEvent
from leaky_tokens.settings import Settings
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.events import (
    Event,
    EventPublisher,
    HttpPushPublisher,
    RedisStreamPublisher,
)
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.tokens.models import OutboxEvent
from leaky_tokens.tokens.outbox import purchase_event, usage_event
from leaky_tokens.tokens.outbox_relay import OutboxRelay, RelayConfig
from tests.analytics.analytics_harness import INTERNAL_TOKEN, FakeAuthenticator
from tests.backends import (
    REDIS_URL,
    create_postgres_database,
    drop_postgres_database,
    need_postgres,
    need_redis,
)
from tests.live_server import closed_port, serving
from tests.polling import eventually

RELAY = RelayConfig(batch_size=25, poll_seconds=0.01, min_backoff_seconds=0.02)


@dataclass
class Shape:
    name: str
    tokens_url: str
    analytics_url: str
    data_dir: Path
    prefix: str = field(default_factory=lambda: f"lt:test:pipeline:{uuid.uuid4().hex}:")

    @property
    def redis(self) -> bool:
        return self.name == "postgresql+redis"

    def settings(self, port: int) -> Settings:
        return Settings(
            data_dir=self.data_dir,
            access_log=False,
            redis_url=REDIS_URL if self.redis else "",
            internal_token=INTERNAL_TOKEN,
            analytics={"database_url": self.analytics_url},
            events={
                "transport": "redis" if self.redis else "http",
                "stream_prefix": self.prefix,
                "reclaim_idle_seconds": 0.5,
            },
            ports={"analytics": port},
        )


@pytest.fixture(params=["sqlite+http", "postgresql+redis"])
async def shape(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Shape]:
    if request.param == "sqlite+http":
        yield Shape(
            request.param,
            f"sqlite+aiosqlite:///{tmp_path / 'tokens.db'}",
            f"sqlite+aiosqlite:///{tmp_path / 'analytics.db'}",
            tmp_path,
        )
        return
    need_postgres()
    need_redis()
    tokens_url = await create_postgres_database("pipe_tok")
    analytics_url = await create_postgres_database("pipe_an")
    found = Shape(request.param, tokens_url, analytics_url, tmp_path)
    try:
        yield found
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = [key async for key in client.scan_iter(match=f"{found.prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await drop_postgres_database(tokens_url)
        await drop_postgres_database(analytics_url)


@contextlib.asynccontextmanager
async def running_analytics(shape: Shape, port: int) -> AsyncIterator[None]:
    app = create_analytics_app(shape.settings(port), authenticator=FakeAuthenticator())
    if shape.redis:
        async with app.router.lifespan_context(app):
            yield
    else:
        async with serving(app, port, lifespan=True):
            yield


class Recording:
    """Wraps the real publisher: remembers every event it handed over; can die after a send."""

    def __init__(self, inner: EventPublisher, sent: list[uuid.UUID], die_after: int = 0) -> None:
        self.inner, self.sent, self.die_after = inner, sent, die_after
        self.batches = 0
        self.died = asyncio.Event()

    async def publish(self, batch: Sequence[Event]) -> None:
        await self.inner.publish(batch)
        self.sent.extend(e.event_id for e in batch)
        self.batches += 1
        if self.die_after and self.batches >= self.die_after:
            self.died.set()
            await asyncio.Event().wait()  # killed here: sent, never marked

    async def aclose(self) -> None:
        return None


async def produce(db: Database, rounds: int, rng: random.Random) -> None:
    """What the token service does: usage (and some purchase) events in small transactions."""
    table = cast(Table, OutboxEvent.__table__)
    for _ in range(rounds):
        events = [
            usage_event(
                rng.choice(["ALLOWED", "ALLOWED", "RATE_LIMITED", "QUOTA_INSUFFICIENT"]),
                user_id=uuid.uuid4(),
                org_id=None,
                provider=rng.choice(["openai", "qwen", "gemini"]),
                tokens=rng.randint(1, 500),
                now=datetime.now(UTC),
                request_id=f"req_{uuid.uuid4().hex}",
            )
            for _ in range(rng.randint(5, 15))
        ]
        events.append(
            purchase_event(
                "PurchaseStarted",
                saga_id=uuid.uuid4(),
                user_id=uuid.uuid4(),
                org_id=None,
                provider="openai",
                tokens=1000,
                status="STARTED",
                now=datetime.now(UTC),
            )
        )
        async with db.transaction() as session:
            for event in events:
                row: dict[str, Any] = {
                    c.key: getattr(event, c.key) for c in OutboxEvent.__table__.columns
                }
                row.pop("id")
                await session.execute(insert(table), row)
        await asyncio.sleep(0.02)


async def outbox_usage(db: Database) -> tuple[set[uuid.UUID], int, int]:
    async with db.read() as session:
        rows = (
            await session.execute(
                select(OutboxEvent.event_id, OutboxEvent.payload).where(
                    OutboxEvent.stream == "usage"
                )
            )
        ).all()
        pending = await session.scalar(
            select(func.count()).where(OutboxEvent.published_at.is_(None))
        )
    return {r[0] for r in rows}, sum(r[1]["tokens"] for r in rows), int(pending or 0)


async def stored_usage(db: Database) -> tuple[list[uuid.UUID], int, int]:
    async with db.read() as session:
        ids = list((await session.execute(select(UsageEvent.event_id))).scalars())
        tokens = await session.scalar(select(func.coalesce(func.sum(UsageEvent.tokens), 0)))
        purchases = await session.scalar(select(func.count()).select_from(PurchaseEvent))
    return ids, int(tokens or 0), int(purchases or 0)


async def test_every_outbox_usage_event_is_stored_exactly_once(shape: Shape) -> None:
    await upgrade_database(shape.tokens_url, "tokens")
    await upgrade_database(shape.analytics_url, "analytics")
    tokens_db = Database(shape.tokens_url)
    analytics_db = Database(shape.analytics_url, inline=False)
    port = closed_port()
    redis_client = redis.Redis.from_url(REDIS_URL) if shape.redis else None

    def real_publisher() -> EventPublisher:
        if redis_client is not None:
            return RedisStreamPublisher(redis_client, prefix=shape.prefix)
        return HttpPushPublisher.over_aiohttp(
            f"http://127.0.0.1:{port}{EVENTS_PATH}", INTERNAL_TOKEN, timeout_seconds=2.0
        )

    sent: list[uuid.UUID] = []
    inner_first, inner_second = real_publisher(), real_publisher()
    doomed = Recording(inner_first, sent, die_after=3)
    survivor = Recording(inner_second, sent)
    tasks: list[asyncio.Task[None]] = []
    try:
        analytics = running_analytics(shape, port)
        await analytics.__aenter__()
        producer = asyncio.create_task(produce(tokens_db, 60, random.Random(3)))
        tasks.append(asyncio.create_task(OutboxRelay(tokens_db, doomed, config=RELAY).run()))
        await asyncio.wait_for(doomed.died.wait(), 20)
        tasks[0].cancel()  # the relay dies between sending its third batch and marking it
        tasks.append(asyncio.create_task(OutboxRelay(tokens_db, survivor, config=RELAY).run()))

        await eventually(lambda: survivor.batches >= 3, what="the second relay at work")
        await analytics.__aexit__(None, None, None)  # analytics restarts mid-stream
        await asyncio.sleep(0.3)
        analytics = running_analytics(shape, port)
        await analytics.__aenter__()
        assert not producer.done(), "the restart should happen while events keep coming"
        await producer

        async def caught_up() -> bool:
            wanted, _, pending = await outbox_usage(tokens_db)
            ids, _, _ = await stored_usage(analytics_db)
            return pending == 0 and set(ids) == wanted

        await eventually(caught_up, within=30, what="analytics caught up with the outbox")
        await analytics.__aexit__(None, None, None)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await inner_first.aclose()
        await inner_second.aclose()
        if redis_client is not None:
            await redis_client.aclose()

    wanted, wanted_tokens, _ = await outbox_usage(tokens_db)
    ids, tokens, purchases = await stored_usage(analytics_db)
    await tokens_db.dispose()
    await analytics_db.dispose()
    assert len(ids) == len(set(ids)) == len(wanted)  # each usage event once
    assert set(ids) == wanted
    assert tokens == wanted_tokens
    assert purchases == 60  # kept apart, never counted as usage
    assert len(sent) > len(set(sent))  # the killed batch really went out twice
