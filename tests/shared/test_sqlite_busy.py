"""SQLite's write lock held by another process (issue 9, defect 3): `leaky-tokens admin
set-quota` against a running `up` froze every service in that process, because the inline
engine waited for the lock on the event loop, for 30 s (a later PRAGMA overrode the 5 s)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from leaky_tokens.shared.database import Database, DatabaseBusy
from leaky_tokens.shared.errors import OUTAGE_HEADER


@pytest.fixture(params=["inline", "threaded"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(
        f"sqlite+aiosqlite:///{tmp_path / 'busy.db'}",
        inline=request.param == "inline",
        busy_seconds=2.0,
    )
    async with database.connection() as conn:
        await conn.execute(text("CREATE TABLE item (n INTEGER)"))
    yield database
    await database.dispose()


@pytest.fixture
def other_process(db: Database) -> Iterator[sqlite3.Connection]:
    """Another writer (as the CLI would be) on the same file."""
    path = db.url.split("///", 1)[1]
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    yield connection
    connection.close()


async def insert(db: Database, n: int) -> None:
    async with db.connection() as conn:
        await conn.execute(text("INSERT INTO item (n) VALUES (:n)"), {"n": n})


async def count(db: Database) -> int:
    async with db.read() as session:
        return int((await session.execute(text("SELECT count(*) FROM item"))).scalar_one())


async def test_a_writer_waiting_for_another_process_leaves_the_loop_free(
    db: Database, other_process: sqlite3.Connection
) -> None:
    other_process.execute("BEGIN IMMEDIATE")
    waiting = asyncio.create_task(insert(db, 1))
    ticks = 0
    for _ in range(20):  # the loop keeps running while the write waits for the lock
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 20
    assert not waiting.done()
    assert await count(db) == 0  # reads go on meanwhile (WAL)

    other_process.execute("COMMIT")
    await asyncio.wait_for(waiting, 15)
    assert await count(db) == 1


async def test_a_lock_held_past_the_busy_timeout_is_database_busy_an_outage_503(
    db: Database, other_process: sqlite3.Connection
) -> None:
    other_process.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseBusy) as caught:
            await asyncio.wait_for(insert(db, 1), 30)
    finally:
        other_process.execute("ROLLBACK")

    assert caught.value.status == 503
    assert caught.value.code == "DATABASE_BUSY"
    assert caught.value.headers[OUTAGE_HEADER] == "true"
    await insert(db, 2)  # and the next write works once the lock is free
    assert await count(db) == 1


async def test_our_own_writers_still_queue_and_all_land(db: Database) -> None:
    await asyncio.gather(*(insert(db, n) for n in range(50)))
    assert await count(db) == 50


async def test_the_busy_timeout_in_force_is_the_configured_one(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 't.db'}", inline=False, busy_seconds=1.5)
    try:
        async with database.engine.connect() as conn:
            in_force = (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one()
    finally:
        await database.dispose()
    assert in_force == 1500
