"""Fixtures shared by the whole suite (see tests/backends.py for which servers are used)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.backends import (
    REDIS_URL,
    create_postgres_database,
    drop_postgres_database,
    need_postgres,
    need_redis,
)


@pytest.fixture
def redis_url() -> str:
    need_redis()
    return REDIS_URL


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[object]:
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each backend (no schema; services migrate it)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    need_postgres()
    url = await create_postgres_database("t")
    try:
        yield url
    finally:
        await drop_postgres_database(url)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
