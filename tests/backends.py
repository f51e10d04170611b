"""Which real backends are reachable, and fresh PostgreSQL databases for tests.

SQLite and in-memory backends always run. PostgreSQL and Redis run when they answer on
LEAKY_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test) and
LEAKY_TEST_REDIS_URL (default redis://127.0.0.1:6379/0); otherwise those variants are skipped
with the reason. Set LEAKY_TEST_REQUIRE_SERVERS=1 (CI does) to fail instead of skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest

POSTGRES_URL = os.environ.get(
    "LEAKY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("LEAKY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVERS = os.environ.get("LEAKY_TEST_REQUIRE_SERVERS") == "1"


def _answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 0.5
        ):
            return True
    except OSError:
        return False


POSTGRES_UP = _answers(POSTGRES_URL, 5432)
REDIS_UP = _answers(REDIS_URL, 6379)


def need_postgres() -> None:
    if not POSTGRES_UP:
        if REQUIRE_SERVERS:
            pytest.fail(f"PostgreSQL required but not answering at {POSTGRES_URL}")
        pytest.skip(f"PostgreSQL not answering at {POSTGRES_URL}")


def need_redis() -> None:
    if not REDIS_UP:
        if REQUIRE_SERVERS:
            pytest.fail(f"Redis required but not answering at {REDIS_URL}")
        pytest.skip(f"Redis not answering at {REDIS_URL}")


def _pg_url_for(database: str) -> str:
    parts = urlsplit(POSTGRES_URL)
    return parts._replace(path=f"/{database}").geturl()


async def create_postgres_database(prefix: str) -> str:
    """A fresh, empty PostgreSQL database; returns its asyncpg URL."""
    import asyncpg

    name = f"lt_{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _pg_url_for(name).replace("postgresql://", "postgresql+asyncpg://", 1)


async def drop_postgres_database(url: str) -> None:
    import asyncpg

    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
