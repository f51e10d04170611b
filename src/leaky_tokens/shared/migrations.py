"""Runs a service's own Alembic history against its own database (SQLite or PostgreSQL).

Each service keeps its history in `leaky_tokens/migrations/<service>/` and its version table
`alembic_version_<service>`, so services never step on each other even in one database.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection

from leaky_tokens.shared.database import Database

MIGRATIONS_ROOT = Path(__file__).resolve().parent.parent / "migrations"
# Alembic's `op` and `context` are process-wide proxies: two services migrating at once in one
# process (leaky-tokens up) would overwrite each other's, so migrations take turns here.
_PROCESS_LOCK = threading.Lock()


def alembic_config(service: str, metadata: MetaData | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_ROOT / service))
    cfg.attributes["service"] = service
    cfg.attributes["metadata"] = metadata
    return cfg


def version_table(service: str) -> str:
    return f"alembic_version_{service}"


def _upgrade(connection: Connection, cfg: Config, revision: str) -> None:
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def _take_turn() -> None:
    # A thread lock, not an asyncio one: tests run many event loops in one process.
    if not _PROCESS_LOCK.acquire(blocking=False):
        await asyncio.to_thread(_PROCESS_LOCK.acquire)


def _current(connection: Connection, service: str) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": version_table(service)})
    return context.get_current_revision()


async def upgrade_database(url: str, service: str, revision: str = "head") -> None:
    """Bring the service's database to `revision`; safe to call from several replicas at once."""
    database = Database(url)
    await _take_turn()
    try:
        async with database.engine.begin() as conn:
            if not database.is_sqlite:
                # Replicas starting together serialise here instead of racing the DDL.
                lock_id = zlib.crc32(f"leaky-tokens:migrate:{service}".encode())
                await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})
            await conn.run_sync(_upgrade, alembic_config(service), revision)
    finally:
        _PROCESS_LOCK.release()
        await database.dispose()


async def current_revision(url: str, service: str) -> str | None:
    database = Database(url)
    try:
        async with database.engine.connect() as conn:
            return await conn.run_sync(_current, service)
    finally:
        await database.dispose()


def head_revision(service: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(service)).get_current_head()


def run_env(context: Any) -> None:
    """Body of every service's env.py: migrate on the connection the runner handed over."""
    config = context.config
    connection = config.attributes["connection"]
    service = config.attributes["service"]
    context.configure(
        connection=connection,
        target_metadata=config.attributes.get("metadata"),
        version_table=version_table(service),
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
