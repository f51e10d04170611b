"""A real token service (real database, real bucket backend, in-process provider stubs) for
service-level tests, on SQLite + memory and on PostgreSQL + Redis."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from leaky_tokens.providers import create_provider_app
from leaky_tokens.settings import PROVIDERS, TokensSettings
from leaky_tokens.shared.clock import Clock, SystemClock
from leaky_tokens.shared.database import Database
from leaky_tokens.shared.migrations import upgrade_database
from leaky_tokens.shared.principal import Principal
from leaky_tokens.tokens.app import provider_settings
from leaky_tokens.tokens.leaky_bucket import LeakyBucketStore, MemoryLeakyBucket
from leaky_tokens.tokens.leaky_bucket_redis import RedisLeakyBucket
from leaky_tokens.tokens.provider_client import ProviderClient
from leaky_tokens.tokens.service import USER_POOL, QuotaView, TokenService
from tests.backends import (
    REDIS_URL,
    create_postgres_database,
    drop_postgres_database,
    need_postgres,
    need_redis,
)
from tests.httpx_outbound import HttpxOutbound


class HostRouter(httpx.AsyncBaseTransport):
    """Sends each request to the in-process app named by its host (http://openai, ...)."""

    def __init__(self, apps: dict[str, httpx.AsyncBaseTransport]) -> None:
        self.apps = apps

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.apps[request.url.host].handle_async_request(request)


@dataclass
class Rig:
    service: TokenService
    db: Database
    buckets: LeakyBucketStore
    stubs: httpx.AsyncClient  # talks to the stubs' fault endpoints
    shape: str

    async def set_faults(self, provider: str, **faults: object) -> None:
        response = await self.stubs.put(f"http://{provider}/api/v1/{provider}/faults", json=faults)
        assert response.status_code == 200, response.text

    async def new_user_pool(self, total: int, *, remaining: int | None = None) -> uuid.UUID:
        user_id = uuid.uuid4()
        await self.service.put_quota(
            USER_POOL, user_id, "openai", total=total, remaining=remaining, reset_at=None
        )
        return user_id

    async def remaining(self, user_id: uuid.UUID, kind: str = USER_POOL) -> int:
        return (await self.quota(user_id, kind)).remaining_tokens

    async def quota(self, owner_id: uuid.UUID, kind: str = USER_POOL) -> QuotaView:
        return await self.service.get_quota(admin(), kind, owner_id, "openai")


def user(user_id: uuid.UUID, *orgs: uuid.UUID) -> Principal:
    return Principal(user_id=user_id, roles=frozenset({"USER"}), org_ids=frozenset(orgs))


def admin() -> Principal:
    return Principal(user_id=uuid.uuid4(), roles=frozenset({"USER", "ADMIN"}))


def make_settings(**overrides: object) -> TokensSettings:
    base: dict[str, object] = {
        "bucket_capacity": 100_000,
        "bucket_leak_per_second": 1.0,
        "provider_timeout_seconds": 5.0,
        "provider_attempts": 1,
        # keep the breaker out of exactness tests
        "breaker_window_size": 10_000,
        "breaker_minimum_calls": 10_000,
        "breaker_failure_rate": 1.0,
        "provider_max_concurrent": 1000,
    }
    base.update(overrides)
    return TokensSettings.model_validate(base)


@pytest.fixture(params=["sqlite+memory", "postgresql+redis"])
async def shape(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    if request.param == "sqlite+memory":
        yield request.param, f"sqlite+aiosqlite:///{tmp_path / 'tokens.db'}"
        return
    need_postgres()
    need_redis()
    url = await create_postgres_database("tok")
    try:
        yield request.param, url
    finally:
        await drop_postgres_database(url)


@pytest.fixture
def token_settings() -> TokensSettings:
    """Override in a test module (or parametrize) to change limits."""
    return make_settings()


@pytest.fixture
def clock() -> Clock:
    """The token service's clock; a module overrides it with a FakeClock to move time."""
    return SystemClock()


@pytest.fixture
async def rig(
    shape: tuple[str, str], token_settings: TokensSettings, clock: Clock
) -> AsyncIterator[Rig]:
    name, url = shape
    await upgrade_database(url, "tokens")
    database = Database(url)
    redis: Redis | None = None
    buckets: LeakyBucketStore
    if name == "postgresql+redis":
        redis = Redis.from_url(REDIS_URL)
        buckets = RedisLeakyBucket(redis, prefix=f"lt:test:{uuid.uuid4().hex}:")
    else:
        buckets = MemoryLeakyBucket()
    stub_transports: dict[str, httpx.AsyncBaseTransport] = {
        p: httpx.ASGITransport(app=create_provider_app(p, log_access=False, rng=random.Random(7)))  # type: ignore[arg-type]
        for p in PROVIDERS
    }
    router = HostRouter(stub_transports)
    providers = ProviderClient(
        {p: f"http://{p}" for p in PROVIDERS},
        provider_settings(token_settings),
        outbound=HttpxOutbound(router),
    )
    service = TokenService(database, token_settings, clock, buckets, providers)
    stubs = httpx.AsyncClient(transport=router)
    try:
        yield Rig(service, database, buckets, stubs, name)
    finally:
        await stubs.aclose()
        await providers.aclose()
        await buckets.close()
        if redis is not None:
            await redis.aclose()
        await database.dispose()
