"""Async database access shared by the table-owning services: engine per service, SQLite tuned
for concurrent use (WAL, busy timeout), PostgreSQL through asyncpg, one session per unit of work.

SQLite's write lock is shared with other processes (the CLI, a second `serve`). Waiting for it
never blocks the event loop: the inline engine tries BEGIN IMMEDIATE without waiting and, when
another process holds the lock, waits in a worker thread in short steps; the threaded engine
waits in aiosqlite's thread. Either way a writer waits at most `busy_seconds` (one setting, the
one in force: the connect timeout and the busy_timeout PRAGMA agree) and then gets
DatabaseBusy, a 503 marked as the service's own outage.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlalchemy import DateTime, create_engine, event
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from leaky_tokens.shared.errors import ServiceUnavailable
from leaky_tokens.shared.private_files import private_sqlite_file

# How long a writer waits for SQLite's write lock before DatabaseBusy.
SQLITE_BUSY_SECONDS = 5.0
# One wait of the inline engine's worker thread; between waits the loop checks the deadline.
_BUSY_STEP_MS = 200


class DatabaseBusy(ServiceUnavailable):
    """Another process held SQLite's write lock for longer than the busy timeout."""

    code = "DATABASE_BUSY"
    default_message = "the database is busy; retry shortly"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


def _is_busy(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError):
        exc = exc.orig  # type: ignore[assignment]
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base; each service keeps its own MetaData via a subclass."""

    __abstract__ = True


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def normalise_url(url: str) -> str:
    """Accept plain postgresql:// URLs and pick the async driver."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
        return "sqlite+aiosqlite://" + url.split("://", 1)[1]
    return url


class Executes(Protocol):
    """What a hot path needs from a unit of work: run one statement (a Core connection or an
    ORM session both do)."""

    async def execute(self, statement: Any, parameters: Any = None, /) -> Any: ...


class InlineConnection:
    """A sync SQLite Core connection behind the async `execute` (see InlineSession)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    @property
    def dialect(self) -> Dialect:
        return self._connection.dialect

    async def execute(self, statement: Any, parameters: Any = None, /) -> Any:
        return self._connection.execute(statement, parameters)


class InlineSession:
    """The AsyncSession calls our repositories make, served by a sync SQLite session on the
    event-loop thread.

    Why: aiosqlite hands every call to a thread and back; a transaction makes about nine such
    hops, measured at 4-8 ms per transaction on this 2-core VM, while the SQLite work itself
    takes microseconds. Short OLTP transactions are far cheaper run inline. (The price: a slow
    statement blocks the loop, so only short statements belong here; see Database(inline=...).)
    """

    def __init__(self, session: Session) -> None:
        self._session = session

    async def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._session.execute(statement, params, **kw)

    async def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._session.scalar(statement, params, **kw)

    async def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
        return self._session.get(entity, ident, **kw)

    def add(self, instance: object) -> None:
        self._session.add(instance)

    async def flush(self) -> None:
        self._session.flush()

    async def refresh(self, instance: object) -> None:
        self._session.refresh(instance)

    def get_bind(self) -> Any:
        return self._session.get_bind()

    @asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[None]:
        with self._session.begin_nested():
            yield


class Database:
    """An engine and its session factory, created in a service's lifespan and disposed there.

    On SQLite, `inline=True` (the default) runs sessions on the event-loop thread (see
    InlineSession); `inline=False` keeps aiosqlite's thread for services with long queries.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        echo: bool = False,
        inline: bool = True,
        busy_seconds: float = SQLITE_BUSY_SECONDS,
    ) -> None:
        self.url = normalise_url(url)
        self.is_sqlite = is_sqlite(self.url)
        self.busy_seconds = busy_seconds
        busy_ms = int(busy_seconds * 1000)
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            database = make_url(self.url).database
            if database and database != ":memory:" and not database.startswith("file:"):
                # Readable by our own user only, WAL and SHM included (they copy its mode).
                private_sqlite_file(database)
            # aiosqlite runs each connection on its own thread; a small pool bounds writers.
            kwargs["pool_size"] = 5
            kwargs["max_overflow"] = 0
            kwargs["connect_args"] = {"timeout": busy_seconds}
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
            # No pre-ping: it costs a round trip (0.28 ms here) per transaction; connections are
            # recycled instead, and one broken by a server restart fails one transaction.
            kwargs["pool_recycle"] = 300
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        write_engine = self.engine
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas(busy_ms))
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin)
            # A write transaction takes SQLite's write lock up front: a deferred transaction that
            # reads and then writes fails with SQLITE_BUSY instead of waiting its turn.
            write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._async_write_engine = write_engine
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self.sessions = async_sessionmaker(write_engine, expire_on_commit=False)
        self.read_sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.inline_read: sessionmaker[Session] | None = None
        if self.is_sqlite and inline:
            sync_engine = create_engine(
                self.url.replace("sqlite+aiosqlite://", "sqlite+pysqlite://", 1),
                echo=echo,
                pool_size=2,
                max_overflow=3,
                # Never waits for a lock on the loop thread: a writer in another process (the
                # CLI) is waited for in a worker thread (_begin_write).
                connect_args={"timeout": 0, "check_same_thread": False},
            )
            event.listen(sync_engine, "connect", _sqlite_pragmas(0))
            event.listen(sync_engine, "begin", _sqlite_begin)
            self._sync_engine: Engine | None = sync_engine
            # BEGIN IMMEDIATE is issued by _begin_write, which can wait off the loop.
            self._sync_write_engine: Engine | None = sync_engine.execution_options(
                sqlite_begin="CALLER"
            )
            self.inline_read = sessionmaker(sync_engine, expire_on_commit=False)
        else:
            self._sync_engine = None
            self._sync_write_engine = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work that may write: commits when the block ends, rolls back on error."""
        if self._sync_write_engine is not None:
            async with self._inline_write() as sync_conn:
                sync_session = Session(bind=sync_conn, expire_on_commit=False)
                try:
                    yield cast(AsyncSession, InlineSession(sync_session))
                    sync_session.flush()
                finally:
                    sync_session.close()
            return
        try:
            if self._write_lock is None:
                async with self.sessions() as session, session.begin():
                    yield session
                return
            # SQLite has one writer at a time. Queueing our own writers here is fair and cheap;
            # letting them collide makes SQLite's busy handler sleep for up to 100 ms per retry.
            async with self._write_lock, self.sessions() as session, session.begin():
                yield session
        except OperationalError as exc:
            if self.is_sqlite and _is_busy(exc):
                raise DatabaseBusy() from None
            raise

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Executes]:
        """A Core unit of work that may write, for hot paths: about half the cost of an ORM
        session per transaction (measured: 480 vs 1069 µs for one reservation on SQLite)."""
        if self._sync_write_engine is not None:
            async with self._inline_write() as sync_conn:
                yield InlineConnection(sync_conn)
            return
        try:
            if self._write_lock is None:
                async with self._async_write_engine.begin() as conn:
                    yield conn
                return
            async with self._write_lock, self._async_write_engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            if self.is_sqlite and _is_busy(exc):
                raise DatabaseBusy() from None
            raise

    @asynccontextmanager
    async def _inline_write(self) -> AsyncIterator[Connection]:
        """A sync connection holding SQLite's write lock (BEGIN IMMEDIATE), committed when the
        block ends. Our own writers queue on the asyncio lock; another process's is waited for
        off the loop."""
        assert self._sync_write_engine is not None
        assert self._write_lock is not None
        async with self._write_lock:
            with self._sync_write_engine.connect() as sync_conn:
                transaction = sync_conn.begin()  # no SQL: the BEGIN is ours
                try:
                    await self._begin_write(sync_conn)
                    yield sync_conn
                    transaction.commit()
                except BaseException:
                    transaction.rollback()
                    raise

    async def _begin_write(self, sync_conn: Connection) -> None:
        raw = sync_conn.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        try:
            raw.execute("BEGIN IMMEDIATE")  # busy_timeout is 0 here: never waits on the loop
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.busy_seconds
        while True:
            step = max(1, min(_BUSY_STEP_MS, int((deadline - loop.time()) * 1000)))
            if await asyncio.to_thread(_begin_waiting, raw, step):
                return
            if loop.time() >= deadline:
                raise DatabaseBusy()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only unit of work (never takes SQLite's write lock)."""
        try:
            if self.inline_read is not None:
                with self.inline_read.begin() as sync_session:
                    yield cast(AsyncSession, InlineSession(sync_session))
                return
            async with self.read_sessions() as session, session.begin():
                yield session
        except OperationalError as exc:  # (a WAL reader is rarely refused: recovery, DDL)
            if self.is_sqlite and _is_busy(exc):
                raise DatabaseBusy() from None
            raise

    async def ping(self) -> bool:
        from sqlalchemy import text

        try:
            if self._sync_engine is not None:
                with self._sync_engine.connect() as sync_conn:
                    sync_conn.execute(text("SELECT 1"))
                return True
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        if self._sync_engine is not None:
            self._sync_engine.dispose()
        await self.engine.dispose()


def _sqlite_pragmas(busy_ms: int) -> Any:
    def on_connect(dbapi_connection: Any, _: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own handling is off).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # The same value as the driver's connect timeout (which sets it too): one setting.
        cursor.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def _begin_waiting(raw: sqlite3.Connection, wait_ms: int) -> bool:
    """BEGIN IMMEDIATE waiting up to `wait_ms` for the lock (in a worker thread); False when
    another process still holds it."""
    raw.execute(f"PRAGMA busy_timeout={int(wait_ms)}")
    try:
        raw.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as exc:
        if not _is_busy(exc):
            raise
        return False
    finally:
        raw.execute("PRAGMA busy_timeout=0")


def _sqlite_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    if mode != "CALLER":
        conn.exec_driver_sql(f"BEGIN {mode}")
