"""The token service's leaky buckets while Redis is black-holed or stopped, mid-load (issue 9):
each consume waits at most about one Redis timeout, the bucket falls back to this process (or
refuses with 503, as configured), nothing is charged twice, and Redis is used again by itself
once it answers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from leaky_tokens.providers import create_provider_app
from leaky_tokens.settings import PROVIDERS
from leaky_tokens.shared.clock import SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.errors import AppError
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.shared.redis import RedisGuard, RedisMetrics, redis_client
from leaky_tokens.tokens.app import provider_settings
from leaky_tokens.tokens.leaky_bucket import MemoryLeakyBucket
from leaky_tokens.tokens.leaky_bucket_redis import RedisLeakyBucket
from leaky_tokens.tokens.provider_client import ProviderClient
from leaky_tokens.tokens.service import USER_POOL, ConsumeRequest, TokenService
from tests.httpx_outbound import HttpxOutbound
from tests.polling import eventually
from tests.redis_proxy import RedisProxy, assert_no_stall, redis_proxy
from tests.tokens.conftest import STUB_TOKEN, HostRouter, admin, make_settings, user

TIMEOUT = 0.5


@dataclass
class Service:
    tokens: TokenService
    metrics: RedisMetrics
    proxy: RedisProxy

    def fallbacks(self, mode: str = "fallback") -> float:
        value = self.metrics.fallbacks.labels("buckets", mode)._value.get()
        return float(value)


@contextlib.asynccontextmanager
async def service_behind(
    proxy: RedisProxy, tmp_path: Path, on_failure: str
) -> AsyncIterator[Service]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'tokens.db'}"
    await upgrade_database(url, "tokens")
    database = Database(url)
    client = redis_client(
        proxy.url, connect_timeout_seconds=TIMEOUT, command_timeout_seconds=TIMEOUT
    )
    metrics = RedisMetrics(CollectorRegistry())
    guard = RedisGuard(
        client,
        "buckets",
        fail_fast_seconds=0.5,
        on_failure=on_failure,  # type: ignore[arg-type]
        metrics=metrics,
    )
    buckets = RedisLeakyBucket(
        guard, prefix=f"lt:test:{uuid.uuid4().hex}:", fallback=MemoryLeakyBucket()
    )
    router = HostRouter(
        {
            p: httpx.ASGITransport(
                app=create_provider_app(
                    p,  # type: ignore[arg-type]
                    internal_token=STUB_TOKEN,
                    log_access=False,
                    rng=random.Random(7),
                )
            )
            for p in PROVIDERS
        }
    )
    settings = make_settings()
    providers = ProviderClient(
        {p: f"http://{p}" for p in PROVIDERS},
        provider_settings(settings),
        outbound=HttpxOutbound(router),
    )
    try:
        yield Service(
            TokenService(database, settings, SystemClock(), buckets, providers), metrics, proxy
        )
    finally:
        await providers.aclose()
        await buckets.close()
        await client.aclose()
        await database.dispose()


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[RedisProxy]:
    async with redis_proxy(redis_url) as running:
        yield running


@dataclass
class Outcome:
    seconds: float
    allowed: bool
    error: AppError | None


class Load:
    def __init__(self, service: TokenService, owner: uuid.UUID) -> None:
        self.service = service
        self.owner = owner
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._consume()) for _ in range(8)]
        return self

    async def _consume(self) -> None:
        request = ConsumeRequest(self.owner, None, "openai", 10, None)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                result = await self.service.consume_tokens(user(self.owner), request, None)
                outcome = Outcome(time.monotonic() - started, result.decision.allowed, None)
            except AppError as exc:
                outcome = Outcome(time.monotonic() - started, False, exc)
            self.outcomes.append(outcome)
            await asyncio.sleep(0.005)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def more(self, count: int) -> int:
        mark = len(self.outcomes)
        await eventually(lambda: len(self.outcomes) >= mark + count, within=30)
        return mark


@pytest.mark.parametrize(
    ("outage", "on_failure"),
    [("black hole", "fallback"), ("down", "fallback"), ("black hole", "closed")],
)
async def test_consumes_during_a_redis_outage_are_bounded_charged_once_and_heal(
    proxy: RedisProxy, tmp_path: Path, outage: str, on_failure: str
) -> None:
    async with service_behind(proxy, tmp_path, on_failure) as service:
        owner = uuid.uuid4()
        total = 10_000_000
        await service.tokens.put_quota(
            USER_POOL, owner, "openai", total=total, remaining=None, reset_at=None
        )
        async with Load(service.tokens, owner) as load:
            await load.more(16)
            await proxy.set(outage)  # type: ignore[arg-type]
            during = await load.more(24)
            await proxy.set("up")
            await load.more(8)

            async def bucket_in_redis_again() -> bool:
                before = service.fallbacks(on_failure)
                await load.more(16)
                return service.fallbacks(on_failure) == before

            await eventually(bucket_in_redis_again, within=20, what="buckets in Redis again")
        remaining = (
            await service.tokens.get_quota(admin(), USER_POOL, owner, "openai")
        ).remaining_tokens

    outage_outcomes = load.outcomes[during:]
    assert_no_stall([o.seconds for o in outage_outcomes], TIMEOUT)
    for outcome in outage_outcomes:
        if outcome.error is not None:
            # failing closed: 503 in our shape, marked as an outage; never anything else
            assert on_failure == "closed", outcome.error
            assert outcome.error.status == 503
            assert outcome.error.code == "REDIS_UNAVAILABLE"
    if on_failure == "closed":
        assert any(o.error is not None for o in outage_outcomes)
    else:
        assert all(o.allowed for o in outage_outcomes)
    # Nothing charged twice (or left charged for a refused call): exactly 10 per allowed call.
    allowed = sum(1 for o in load.outcomes if o.allowed)
    assert remaining == total - 10 * allowed
    assert service.fallbacks(on_failure) > 0
