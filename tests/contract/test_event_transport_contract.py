"""Every event transport (HTTP push, Redis Streams) honours the same contract.

`publish` returns only once the transport holds the batch, and raises PublishFailed otherwise;
every event it accepted reaches a running consumer's handler at least once, in publish order
within a stream, also when the handler fails, the consumer is down or dies mid-batch. The relay
(tokens/outbox_relay.py) keeps a batch until publish returns, as `publish_until_accepted` does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
import redis.asyncio as redis

from leaky_tokens.shared.app import build_service_app
from leaky_tokens.shared.events import (
    Event,
    EventConsumer,
    EventPublisher,
    HttpPushConsumer,
    HttpPushPublisher,
    PublishFailed,
    RedisStreamConsumer,
    RedisStreamPublisher,
    event_ingest_router,
)
from tests.backends import REDIS_URL, need_redis
from tests.live_server import closed_port, serving
from tests.polling import eventually

TOKEN = "contract-token"
PATH = "/events"
STREAMS = ("usage", "purchase")


@dataclass
class Transport:
    name: str
    publisher: EventPublisher
    new_consumer: Callable[[], EventConsumer]  # a fresh consumer, as after a restart
    unreachable: Callable[[], EventPublisher]
    buffers: bool  # holds accepted events while no consumer runs
    closers: list[Callable[[], object]] = field(default_factory=list)


@dataclass
class Recorder:
    """A handler that records what it is given; can fail or hang on demand."""

    events: list[Event] = field(default_factory=list)
    failures_left: int = 0
    calls: int = 0
    hang: asyncio.Event | None = None

    async def __call__(self, batch: Sequence[Event]) -> None:
        self.calls += 1
        if self.hang is not None:
            await self.hang.wait()
        if self.failures_left > 0:
            self.failures_left -= 1
            raise RuntimeError("store unavailable")
        self.events.extend(batch)

    def ids(self) -> set[uuid.UUID]:
        return {e.event_id for e in self.events}

    async def wait_for(self, events: Sequence[Event]) -> None:
        wanted = {e.event_id for e in events}
        await eventually(lambda: wanted <= self.ids(), what="every event handled")


def make_event(stream: str = "usage", n: int = 0) -> Event:
    event_id = uuid.uuid4()
    return Event(
        event_id=event_id,
        stream=stream,
        type="TokensConsumed" if stream == "usage" else "PurchaseStarted",
        aggregate_id=str(uuid.uuid4()),
        occurred_at=datetime.now(UTC),
        payload={"eventId": str(event_id), "n": n, "tokens": 20, "nested": {"list": [1, 2]}},
    )


async def publish_until_accepted(publisher: EventPublisher, batch: Sequence[Event]) -> None:
    async with asyncio.timeout(15):
        while True:
            try:
                await publisher.publish(batch)
                return
            except PublishFailed:
                await asyncio.sleep(0.05)


@pytest.fixture(params=["http", "redis"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    if request.param == "http":
        app = build_service_app("contract", title="contract", routers=[event_ingest_router(PATH)])
        async with serving(app) as url:

            def new_http_consumer() -> EventConsumer:
                consumer = HttpPushConsumer(TOKEN)
                app.state.event_receiver = consumer
                return consumer

            app.state.event_receiver = HttpPushConsumer(TOKEN)  # never started: answers 503
            publisher = HttpPushPublisher.over_aiohttp(url + PATH, TOKEN, timeout_seconds=1.0)
            unreachable: list[EventPublisher] = []

            def http_unreachable() -> EventPublisher:
                found = HttpPushPublisher.over_aiohttp(
                    f"http://127.0.0.1:{closed_port()}{PATH}", TOKEN, timeout_seconds=1.0
                )
                unreachable.append(found)
                return found

            yield Transport("http", publisher, new_http_consumer, http_unreachable, buffers=False)
            await publisher.aclose()
            for other in unreachable:
                await other.aclose()
        return

    need_redis()
    prefix = f"lt:test:events:{uuid.uuid4().hex}:"
    client = redis.Redis.from_url(REDIS_URL)
    consumers: list[RedisStreamConsumer] = []
    clients: list[redis.Redis] = [client]

    def new_redis_consumer() -> EventConsumer:
        consumer = RedisStreamConsumer(
            client,
            streams=STREAMS,
            prefix=prefix,
            group="analytics",
            block_ms=100,
            reclaim_idle_seconds=0.3,
            reclaim_every_seconds=0.1,
            retry_seconds=0.05,
        )
        consumers.append(consumer)
        return consumer

    def redis_unreachable() -> EventPublisher:
        dead = redis.Redis.from_url(
            f"redis://127.0.0.1:{closed_port()}/0", socket_connect_timeout=1.0
        )
        clients.append(dead)
        return RedisStreamPublisher(dead, prefix=prefix)

    try:
        yield Transport(
            "redis",
            RedisStreamPublisher(client, prefix=prefix, maxlen=10_000),
            new_redis_consumer,
            redis_unreachable,
            buffers=True,
        )
    finally:
        for consumer in consumers:
            await consumer.stop()
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        for each in clients:
            await each.aclose()


@pytest.fixture
async def recorder(transport: Transport) -> AsyncIterator[Recorder]:
    found = Recorder()
    consumer = transport.new_consumer()
    await consumer.start(found)
    yield found
    await consumer.stop()


async def test_delivers_every_event_of_every_stream_unchanged(
    transport: Transport, recorder: Recorder
) -> None:
    batches = [
        [make_event("usage", i) for i in range(3)],
        [make_event("purchase", 0), make_event("usage", 3)],
        [make_event("usage", 4)],
    ]
    for batch in batches:
        await transport.publisher.publish(batch)
    published = [e for batch in batches for e in batch]
    await recorder.wait_for(published)
    received = {e.event_id: e for e in recorder.events}
    for event in published:
        assert received[event.event_id] == event  # every field, payload and timestamp included


async def test_keeps_publish_order_within_a_stream(
    transport: Transport, recorder: Recorder
) -> None:
    usage = [make_event("usage", i) for i in range(50)]
    purchases = [make_event("purchase", i) for i in range(20)]
    mixed = [e for pair in zip(usage, purchases, strict=False) for e in pair] + usage[20:]
    for start in range(0, len(mixed), 7):
        await transport.publisher.publish(mixed[start : start + 7])
    await recorder.wait_for(mixed)
    for stream, sent in (("usage", usage), ("purchase", purchases)):
        got = [e.payload["n"] for e in recorder.events if e.stream == stream]
        assert got == [e.payload["n"] for e in sent]


async def test_a_failing_handler_gets_the_events_again(
    transport: Transport, recorder: Recorder
) -> None:
    recorder.failures_left = 3
    batch = [make_event("usage", i) for i in range(5)]
    await publish_until_accepted(transport.publisher, batch)
    await recorder.wait_for(batch)
    assert recorder.calls >= 4


async def test_events_sent_while_no_consumer_runs_arrive_after_a_restart(
    transport: Transport,
) -> None:
    first = Recorder()
    consumer = transport.new_consumer()
    await consumer.start(first)
    await consumer.stop()
    batch = [make_event("usage", i) for i in range(5)] + [make_event("purchase")]
    sending = asyncio.create_task(publish_until_accepted(transport.publisher, batch))
    if transport.buffers:
        await sending  # the transport holds them
        lag = await consumer.lag()
        assert sum(lag.values()) >= len(batch)
    else:
        await asyncio.sleep(0.3)
        assert not sending.done()  # refused while nobody can store them: the outbox keeps them
    second = Recorder()
    restarted = transport.new_consumer()
    await restarted.start(second)
    try:
        await sending
        await second.wait_for(batch)
        assert not first.events

        async def drained() -> bool:
            return sum((await restarted.lag()).values()) == 0

        await eventually(drained, what="lag back to zero")
    finally:
        await restarted.stop()


async def test_a_consumer_that_dies_mid_batch_leaves_its_events_to_the_next(
    transport: Transport,
) -> None:
    stuck = Recorder(hang=asyncio.Event())
    consumer = transport.new_consumer()
    await consumer.start(stuck)
    batch = [make_event("usage", i) for i in range(4)]
    sending = asyncio.create_task(publish_until_accepted(transport.publisher, batch))
    await eventually(lambda: stuck.calls > 0, what="the batch reached the handler")
    await consumer.stop()  # dies holding the batch, unacknowledged
    survivor = Recorder()
    next_consumer = transport.new_consumer()
    await next_consumer.start(survivor)
    try:
        await sending
        await survivor.wait_for(batch)
    finally:
        stuck.hang.set()  # type: ignore[union-attr]
        await next_consumer.stop()


async def test_publish_fails_fast_when_the_transport_is_unreachable(
    transport: Transport,
) -> None:
    publisher = transport.unreachable()
    async with asyncio.timeout(5):
        with pytest.raises(PublishFailed):
            await publisher.publish([make_event()])


async def test_an_empty_batch_is_nothing_to_send(transport: Transport) -> None:
    await transport.unreachable().publish([])


async def test_a_wrong_internal_token_is_refused() -> None:
    app = build_service_app("contract", title="contract", routers=[event_ingest_router(PATH)])
    consumer = HttpPushConsumer(TOKEN)
    app.state.event_receiver = consumer
    got = Recorder()
    await consumer.start(got)
    async with serving(app) as url:
        publisher = HttpPushPublisher.over_aiohttp(url + PATH, "wrong", timeout_seconds=1.0)
        try:
            with pytest.raises(PublishFailed, match="401"):
                await publisher.publish([make_event()])
        finally:
            await publisher.aclose()
    assert not got.events
