"""The outbox relay: in id order, in batches, marked only once sent, retried with back-off,
at-least-once across a relay killed mid-batch, never two relays on the same rows at once
(each test on SQLite + memory and on PostgreSQL + Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Table, func, insert, select

from leaky_tokens.shared.database import Database
from leaky_tokens.shared.events import Event, PublishFailed
from leaky_tokens.tokens.errors import InsufficientQuota
from leaky_tokens.tokens.models import OutboxEvent
from leaky_tokens.tokens.outbox import purchase_event, usage_event
from leaky_tokens.tokens.outbox_relay import OutboxMetrics, OutboxRelay, RelayConfig
from leaky_tokens.tokens.service import ConsumeRequest
from tests.polling import eventually
from tests.tokens.conftest import Rig, user

FAST = RelayConfig(batch_size=10, poll_seconds=0.01, min_backoff_seconds=0.01)


@dataclass
class Publisher:
    """Records what it is given; fails, hangs after sending, or dawdles on demand."""

    batches: list[list[Event]] = field(default_factory=list)
    failures_left: int = 0
    attempts: int = 0
    hang_after_send: asyncio.Event | None = None
    delay: float = 0.0

    async def publish(self, batch: Sequence[Event]) -> None:
        self.attempts += 1
        if self.failures_left:
            self.failures_left -= 1
            raise PublishFailed("analytics unreachable")
        if self.delay:
            await asyncio.sleep(self.delay)
        self.batches.append(list(batch))
        if self.hang_after_send is not None:
            self.hang_after_send.set()
            await asyncio.Event().wait()  # killed here: sent, not yet marked

    async def aclose(self) -> None:
        return None

    def sent(self) -> list[Event]:
        return [e for batch in self.batches for e in batch]


async def write(db: Database, *events: OutboxEvent) -> list[uuid.UUID]:
    rows = []
    for event in events:
        row = {c.key: getattr(event, c.key) for c in OutboxEvent.__table__.columns}
        row.pop("id")
        rows.append(row)
    async with db.transaction() as session:
        for row in rows:  # one by one: ids follow this order
            await session.execute(insert(cast(Table, OutboxEvent.__table__)), row)
    return [e.event_id for e in events]


def usage(n: int = 1, *, at: datetime | None = None, tokens: int = 20) -> list[OutboxEvent]:
    return [
        usage_event(
            "ALLOWED",
            user_id=uuid.uuid4(),
            org_id=None,
            provider="openai",
            tokens=tokens,
            now=at or datetime.now(UTC),
            request_id=None,
        )
        for _ in range(n)
    ]


async def unpublished(db: Database) -> int:
    async with db.read() as session:
        query = select(func.count()).where(OutboxEvent.published_at.is_(None))
        return int(await session.scalar(query) or 0)


async def relay_until_empty(relay: OutboxRelay) -> None:
    async def empty() -> bool:
        return await unpublished(relay.db) == 0

    await eventually(empty, within=30, what="outbox drained")


async def test_publishes_in_id_order_in_batches_and_marks_them(rig: Rig) -> None:
    ids = await write(rig.db, *usage(25))
    publisher = Publisher()
    relay = OutboxRelay(rig.db, publisher, config=FAST)

    assert [await relay.relay_once() for _ in range(4)] == [10, 10, 5, 0]

    assert [len(b) for b in publisher.batches] == [10, 10, 5]
    assert [e.event_id for e in publisher.sent()] == ids
    assert await unpublished(rig.db) == 0


async def test_a_published_event_carries_the_outbox_row(rig: Rig) -> None:
    (row,) = usage(1, tokens=42)
    await write(rig.db, row)
    publisher = Publisher()
    await OutboxRelay(rig.db, publisher, config=FAST).relay_once()
    (event,) = publisher.sent()
    assert event.to_wire() == {
        "eventId": str(row.event_id),
        "stream": "usage",
        "type": "TokensConsumed",
        "aggregateId": row.aggregate_id,
        "occurredAt": row.created_at.isoformat().replace("+00:00", "Z"),
        "payload": row.payload,
    }
    assert Event.model_validate(event.to_wire()) == Event.model_validate(event.to_wire())


async def test_carries_purchase_events_as_their_own_stream(rig: Rig) -> None:
    saga = purchase_event(
        "PurchaseStarted",
        saga_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        org_id=None,
        provider="openai",
        tokens=1000,
        status="STARTED",
        now=datetime.now(UTC),
    )
    await write(rig.db, *usage(1), saga)
    publisher = Publisher()
    await OutboxRelay(rig.db, publisher, config=FAST).relay_once()
    assert [(e.stream, e.type) for e in publisher.sent()] == [
        ("usage", "TokensConsumed"),
        ("purchase", "PurchaseStarted"),
    ]


async def test_a_failed_publish_marks_nothing_and_is_retried_with_back_off(rig: Rig) -> None:
    ids = await write(rig.db, *usage(15))
    publisher = Publisher(failures_left=3)
    relay = OutboxRelay(rig.db, publisher, config=FAST)
    with pytest.raises(PublishFailed):
        await relay.relay_once()
    assert await unpublished(rig.db) == 15
    task = asyncio.create_task(relay.run())
    try:
        await relay_until_empty(relay)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert publisher.attempts >= 3 + 2
    assert [e.event_id for e in publisher.sent()] == ids  # each once, in order


async def test_a_relay_killed_between_send_and_mark_sends_the_batch_again(rig: Rig) -> None:
    ids = await write(rig.db, *usage(25))
    killed = Publisher(hang_after_send=asyncio.Event())
    first = asyncio.create_task(OutboxRelay(rig.db, killed, config=FAST).run())
    await asyncio.wait_for(killed.hang_after_send.wait(), 10)  # type: ignore[union-attr]
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert await unpublished(rig.db) == 25  # sent, but never marked

    restarted = Publisher()
    relay = OutboxRelay(rig.db, restarted, config=FAST)
    task = asyncio.create_task(relay.run())
    try:
        await relay_until_empty(relay)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # at-least-once: the killed batch goes out again, nothing is lost or reordered
    assert [e.event_id for e in restarted.sent()] == ids
    assert [e.event_id for e in killed.sent()] == ids[:10]


async def test_two_relays_never_send_the_same_rows(rig: Rig) -> None:
    ids = await write(rig.db, *usage(300))
    publishers = [Publisher(delay=0.01), Publisher(delay=0.01)]
    relays = [OutboxRelay(rig.db, p, config=FAST) for p in publishers]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        await relay_until_empty(relays[0])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    sent = [e.event_id for p in publishers for e in p.sent()]
    assert sorted(sent) == sorted(ids)  # each row exactly once between them
    if rig.shape == "postgresql+redis":
        assert all(p.batches for p in publishers)  # both worked, on different rows


async def test_backlog_and_oldest_age_are_in_the_metrics(rig: Rig) -> None:
    registry = CollectorRegistry()
    relay = OutboxRelay(rig.db, Publisher(), config=FAST, metrics=OutboxMetrics(registry))
    await write(rig.db, *usage(3, at=datetime.now(UTC) - timedelta(seconds=30)))
    await relay.refresh_metrics()
    assert registry.get_sample_value("tokens_outbox_backlog_events") == 3
    age = registry.get_sample_value("tokens_outbox_oldest_unpublished_age_seconds")
    assert age is not None
    assert 30 <= age < 120
    await relay.relay_once()
    await relay.refresh_metrics()
    assert registry.get_sample_value("tokens_outbox_backlog_events") == 0
    assert registry.get_sample_value("tokens_outbox_oldest_unpublished_age_seconds") == 0
    sent = registry.get_sample_value("tokens_outbox_published_events_total", {"stream": "usage"})
    assert sent == 3


async def test_every_consume_decision_reaches_the_publisher(rig: Rig) -> None:
    user_id = await rig.new_user_pool(100)
    principal = user(user_id)
    request = ConsumeRequest(user_id, None, "openai", 30, "hi")
    for _ in range(3):
        await rig.service.consume_tokens(principal, request, None)
    with pytest.raises(InsufficientQuota):  # refused (402), and still an event
        await rig.service.consume_tokens(principal, request, None)
    publisher = Publisher()
    await OutboxRelay(rig.db, publisher, config=FAST).relay_once()
    decisions: list[Any] = [e.payload["decision"] for e in publisher.sent() if e.stream == "usage"]
    assert sorted(decisions) == ["ALLOWED", "ALLOWED", "ALLOWED", "QUOTA_INSUFFICIENT"]
