"""Issue 9: the event stream (token service outbox relay -> analytics over Redis Streams) while
Redis is black-holed and then stopped. The token service keeps answering /consume (never a
500), the relay keeps the events in the outbox instead of losing them, and once Redis answers
again every usage event reaches analytics exactly once (counted by event id). Redis is reached
through tests/redis_proxy.py, so the shared Redis is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis
from sqlalchemy import func, select

from leaky_tokens.analytics.app import create_analytics_app
from leaky_tokens.analytics.models import UsageEvent
from leaky_tokens.providers import create_provider_app
from leaky_tokens.settings import Settings
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.events import INTERNAL_TOKEN_HEADER
from leaky_tokens.tokens.app import create_tokens_app
from leaky_tokens.tokens.models import OutboxEvent
from tests.analytics.analytics_harness import FakeAuthenticator as AnalyticsAuthenticator
from tests.backends import need_redis
from tests.gateway.gateway_harness import FakeAuthenticator
from tests.live_server import serving
from tests.polling import eventually
from tests.redis_proxy import RedisProxy, redis_proxy

TOKEN = "event-stream-outage-internal-token"
WORST_ANSWER_SECONDS = 30.0  # a few 0.5 s Redis timeouts on a loaded machine, and the rest


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[RedisProxy]:
    need_redis()
    async with redis_proxy(redis_url) as running:
        yield running


async def outbox(db: Database) -> tuple[set[uuid.UUID], int]:
    async with db.read() as session:
        ids = set(
            (
                await session.execute(
                    select(OutboxEvent.event_id).where(OutboxEvent.stream == "usage")
                )
            ).scalars()
        )
        pending = await session.scalar(
            select(func.count()).where(OutboxEvent.published_at.is_(None))
        )
    return ids, int(pending or 0)


async def stored(db: Database) -> dict[uuid.UUID, int]:
    async with db.read() as session:
        rows = (
            await session.execute(
                select(UsageEvent.event_id, func.count()).group_by(UsageEvent.event_id)
            )
        ).all()
    return {r[0]: int(r[1]) for r in rows}


@contextlib.asynccontextmanager
async def system(
    proxy: RedisProxy, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, str, Settings]]:
    prefix = f"lt:test:outage-events:{uuid.uuid4().hex}:"
    stub = create_provider_app(
        "openai", internal_token=TOKEN, log_access=False, rng=random.Random(7)
    )
    async with serving(stub) as stub_url:
        settings = Settings(
            access_log=False,
            data_dir=tmp_path / "var",
            internal_token=TOKEN,
            redis_url=proxy.url,
            redis={"connect_timeout_seconds": 0.5, "command_timeout_seconds": 0.5},
            events={"transport": "redis", "stream_prefix": prefix, "reclaim_idle_seconds": 0.5},
            tokens={"bucket_capacity": 1_000_000},
            urls={"openai": stub_url},
        )
        authenticator = FakeAuthenticator()
        user = uuid.uuid4()
        bearer = authenticator.add_token(user_id=user)
        tokens = create_tokens_app(settings, authenticator=authenticator)
        analytics = create_analytics_app(settings, authenticator=AnalyticsAuthenticator())
        try:
            async with (
                serving(tokens, lifespan=True) as url,
                analytics.router.lifespan_context(analytics),
                httpx.AsyncClient(
                    base_url=url,
                    timeout=WORST_ANSWER_SECONDS + 30,
                    headers={"Authorization": f"Bearer {bearer}"},
                ) as http,
            ):
                quota = await http.put(
                    "/internal/quota",
                    headers={INTERNAL_TOKEN_HEADER: TOKEN},
                    json={"userId": str(user), "provider": "openai", "totalTokens": 1_000_000},
                )
                assert quota.status_code == 200, quota.text
                yield http, str(user), settings
        finally:
            client = redis.Redis.from_url(proxy.url, socket_timeout=2, socket_connect_timeout=2)
            with contextlib.suppress(Exception):
                keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
                if keys:
                    await client.delete(*keys)
            await client.aclose()


async def consume_some(http: httpx.AsyncClient, user: str, count: int) -> list[int]:
    statuses = []
    for _ in range(count):
        response = await asyncio.wait_for(
            http.post(
                "/api/v1/tokens/consume",
                json={"userId": user, "provider": "openai", "tokens": 5, "prompt": "Hi"},
            ),
            WORST_ANSWER_SECONDS,
        )
        statuses.append(response.status_code)
    return statuses


async def test_events_wait_in_the_outbox_through_a_redis_outage_and_arrive_once(
    proxy: RedisProxy, tmp_path: Path
) -> None:
    async with system(proxy, tmp_path) as (http, user, settings):
        tokens_db = Database(settings.database_url("tokens"))
        analytics_db = Database(settings.database_url("analytics"))
        try:
            before = await consume_some(http, user, 3)

            async def all_arrived() -> bool:
                wanted, pending = await outbox(tokens_db)
                return pending == 0 and set(await stored(analytics_db)) == wanted

            await eventually(all_arrived, within=60, what="events flow before the outage")

            await proxy.set("black hole")
            in_hole = await consume_some(http, user, 4)
            _, pending_in_hole = await outbox(tokens_db)
            await proxy.set("down")
            while_down = await consume_some(http, user, 4)
            await asyncio.sleep(1.0)  # (the relay retries meanwhile; nothing may be lost)
            wanted_during, pending_down = await outbox(tokens_db)
            arrived_during = set(await stored(analytics_db))

            await proxy.set("up")
            after = await consume_some(http, user, 2)
            await eventually(all_arrived, within=90, what="every event after Redis came back")
            wanted, _ = await outbox(tokens_db)
            counts = await stored(analytics_db)
        finally:
            await tokens_db.dispose()
            await analytics_db.dispose()

    assert 500 not in before + in_hole + while_down + after
    assert pending_in_hole > 0  # kept in the outbox while Redis swallowed everything
    assert pending_down > 0
    assert wanted_during - arrived_during  # some were waiting in the outbox, not dropped
    assert len(wanted) == 13
    assert set(counts) == wanted
    assert all(n == 1 for n in counts.values()), counts  # exactly once, by event id


async def test_the_services_stop_within_a_bound_in_the_outage_and_deliver_after_restart(
    proxy: RedisProxy, tmp_path: Path
) -> None:
    """Stopped while Redis swallows everything (relay and consumer mid-command), the services
    still stop (no hang on a Redis that never answers); the events left in the outbox reach
    analytics exactly once after a restart with Redis back."""

    async def run_in_outage() -> None:
        async with system(proxy, tmp_path) as (http, user, _):
            assert 500 not in await consume_some(http, user, 2)
            await proxy.set("black hole")
            assert 500 not in await consume_some(http, user, 3)

    await asyncio.wait_for(run_in_outage(), WORST_ANSWER_SECONDS * 3)
    await proxy.set("up")
    async with system(proxy, tmp_path) as (_http, _user, settings):
        tokens_db = Database(settings.database_url("tokens"))
        analytics_db = Database(settings.database_url("analytics"))
        try:

            async def all_arrived() -> bool:
                wanted, pending = await outbox(tokens_db)
                return pending == 0 and set(await stored(analytics_db)) == wanted

            await eventually(all_arrived, within=90, what="the outbox delivered after restart")
            wanted, _ = await outbox(tokens_db)
            counts = await stored(analytics_db)
        finally:
            await tokens_db.dispose()
            await analytics_db.dispose()

    assert len(wanted) == 5
    assert set(counts) == wanted
    assert all(n == 1 for n in counts.values()), counts
