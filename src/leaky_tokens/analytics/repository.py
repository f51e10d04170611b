"""Every SQL statement of the analytics service. Aggregates are computed by the database over
the whole window (never over a sample); windows are half-open, [start, end)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Table,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from leaky_tokens.analytics.models import (
    DeadLetter,
    PurchaseEvent,
    RetentionState,
    UsageEvent,
    UsageRollup,
)
from leaky_tokens.shared.database import UtcDateTime


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which usage events a query sees: one provider (None: every provider), optionally one
    user and/or one org."""

    provider: str | None
    user_id: uuid.UUID | None = None
    org_id: uuid.UUID | None = None
    model: str | None = None  # one catalogue model (None: every model, and events without one)


@dataclass(frozen=True, slots=True)
class WindowTotals:
    events: int
    allowed_events: int
    tokens: int
    allowed_tokens: int
    unique_users: int


@dataclass(frozen=True, slots=True)
class OwnerTotals:
    """One user's or one org's totals in a window (`owner_id` is the user or org id)."""

    owner_id: uuid.UUID
    tokens: int
    events: int
    allowed_tokens: int


@dataclass(frozen=True, slots=True)
class ModelTotals:
    """One model's events in a window (`model` None: events that name no model, /consume)."""

    model: str | None
    events: int
    allowed_events: int
    tokens: int
    allowed_tokens: int
    prompt_tokens: int
    completion_tokens: int
    p50_latency_ms: int | None
    p95_latency_ms: int | None


@dataclass(frozen=True, slots=True)
class BucketTotals:
    """The events of one (provider, model) in one time bucket; `bucket` is the bucket's number
    counted from the epoch (its start is bucket x bucket_seconds)."""

    provider: str
    model: str | None
    bucket: int
    events: int
    allowed_events: int
    tokens: int
    allowed_tokens: int


def _at(moment: datetime) -> ColumnElement[Any]:
    return literal(moment, UtcDateTime())


def _where(
    scope: UsageFilter, start: datetime | None = None, end: datetime | None = None
) -> list[ColumnElement[bool]]:
    """The raw events a scope and window see."""
    return _clauses(UsageEvent, UsageEvent.occurred_at, scope, start, end)


def _clauses(
    table: Any, at: Any, scope: UsageFilter, start: datetime | None, end: datetime | None
) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if scope.provider is not None:
        clauses.append(table.provider == scope.provider)
    if scope.user_id is not None:
        clauses.append(table.user_id == scope.user_id)
    if scope.org_id is not None:
        clauses.append(table.org_id == scope.org_id)
    if scope.model is not None:
        clauses.append(table.model == scope.model)
    if start is not None:
        clauses.append(at >= _at(start))
    if end is not None:
        clauses.append(at < _at(end))
    return clauses


def _counted(scope: UsageFilter, start: datetime | None, end: datetime | None) -> Any:
    """Every usage event the scope and window see, raw or rolled up, as rows of (at, user_id,
    org_id, provider, model, events, allowed_events, tokens, allowed_tokens, prompt_tokens,
    completion_tokens): a raw event is one row of one event, a rollup row the sums of its
    minute (`at` is the minute's start, so a rolled-up minute is in a window when its start
    is). A minute is raw or rolled up, never both (one transaction moves it), so sums over
    this are exact; windows whose bounds are whole minutes see exactly what they saw before
    the minute was rolled up."""
    raw = select(
        UsageEvent.occurred_at.label("at"),
        UsageEvent.user_id.label("user_id"),
        UsageEvent.org_id.label("org_id"),
        UsageEvent.provider.label("provider"),
        UsageEvent.model.label("model"),
        literal(1, BigInteger).label("events"),
        case((UsageEvent.allowed, 1), else_=0).label("allowed_events"),
        UsageEvent.tokens.label("tokens"),
        case((UsageEvent.allowed, UsageEvent.tokens), else_=0).label("allowed_tokens"),
        func.coalesce(UsageEvent.prompt_tokens, 0).label("prompt_tokens"),
        func.coalesce(UsageEvent.completion_tokens, 0).label("completion_tokens"),
    ).where(*_where(scope, start, end))
    rolled = select(
        UsageRollup.minute,
        UsageRollup.user_id,
        UsageRollup.org_id,
        UsageRollup.provider,
        UsageRollup.model,
        UsageRollup.events,
        case((UsageRollup.allowed, UsageRollup.events), else_=0),
        UsageRollup.tokens,
        case((UsageRollup.allowed, UsageRollup.tokens), else_=0),
        UsageRollup.prompt_tokens,
        UsageRollup.completion_tokens,
    ).where(*_clauses(UsageRollup, UsageRollup.minute, scope, start, end))
    return union_all(raw, rolled).subquery("counted")


USAGE_STATE = "usage"  # usage_rollup_state's row for usage events

# Nearest-rank percentiles (the smallest latency with at least p % of the events at or below
# it), computed with window functions both SQLite and PostgreSQL have.
PERCENTILES = (50, 95)


def _epoch_seconds(at: Any, dialect: str) -> ColumnElement[int]:
    """Whole seconds since the epoch of a time column, truncated, exactly. SQLite keeps the time
    as text ("YYYY-MM-DD HH:MM:SS.ffffff"): the first 19 characters are the whole seconds
    (strftime alone rounds to the millisecond, which would move an event at .9996 s into the
    next second while the window filter, a text comparison, keeps it in this one)."""
    if dialect == "postgresql":
        return cast(func.floor(func.extract("epoch", at)), BigInteger)
    return cast(func.strftime("%s", func.substr(at, 1, 19)), BigInteger)


def _minute_of(at: Any, dialect: str) -> ColumnElement[Any]:
    """The start of the minute holding `at`, in the column's own storage form."""
    if dialect == "postgresql":
        return func.date_trunc("minute", at)
    return func.substr(at, 1, 16).concat(":00.000000")


class AnalyticsRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def _insert_ignoring_duplicates(self, table: Table) -> Any:
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        return (
            insert(table)
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(table.c.event_id)
        )

    async def _insert(self, table: Table, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        statement = self._insert_ignoring_duplicates(table)
        # One multi-row INSERT; RETURNING names only the rows actually stored. Rows go in event-id
        # order: concurrent batches sharing events (redeliveries) then wait for each other on the
        # unique index instead of deadlocking (PostgreSQL).
        rows = sorted(rows, key=lambda row: row["event_id"])
        stored = await self.session.execute(statement, rows)
        return len(stored.all())

    async def insert_usage(self, rows: list[dict[str, Any]]) -> int:
        """Store usage events; an event id already stored is skipped. Returns rows stored."""
        return await self._insert(UsageEvent.__table__, rows)  # type: ignore[arg-type]

    async def insert_purchases(self, rows: list[dict[str, Any]]) -> int:
        return await self._insert(PurchaseEvent.__table__, rows)  # type: ignore[arg-type]

    async def recent_usage(
        self,
        scope: UsageFilter,
        limit: int,
        offset: int = 0,
        *,
        after: tuple[datetime, int] | None = None,
    ) -> Sequence[UsageEvent]:
        """Raw events newest first, (occurred_at, id) descending. `after` is a keyset position
        (the last row of the previous page): the index range starts there, so a page deep in
        a million rows costs what the first one does; `offset` pages the old way."""
        clauses = _where(scope)
        if after is not None:
            at, row_id = after
            # The first clause is the index's range; the second breaks ties of one instant.
            clauses.append(UsageEvent.occurred_at <= _at(at))
            clauses.append(or_(UsageEvent.occurred_at < _at(at), UsageEvent.id < row_id))
        rows = await self.session.execute(
            select(UsageEvent)
            .where(*clauses)
            .order_by(UsageEvent.occurred_at.desc(), UsageEvent.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return rows.scalars().all()

    async def count_usage(self, scope: UsageFilter, bound: int | None = None) -> int:
        """Raw events of the scope, counted up to `bound` + 1 at most (None: all): the count
        reads at most that many index entries, whatever the table holds."""
        if bound is None:
            total = await self.session.scalar(
                select(func.count()).select_from(UsageEvent).where(*_where(scope))
            )
            return int(total or 0)
        capped = select(UsageEvent.id).where(*_where(scope)).limit(bound + 1).subquery()
        total = await self.session.scalar(select(func.count()).select_from(capped))
        return int(total or 0)

    async def window_totals(
        self, scope: UsageFilter, start: datetime, end: datetime
    ) -> WindowTotals:
        c = _counted(scope, start, end).c
        row = (
            await self.session.execute(
                select(
                    func.coalesce(func.sum(c.events), 0),
                    func.coalesce(func.sum(c.allowed_events), 0),
                    func.coalesce(func.sum(c.tokens), 0),
                    func.coalesce(func.sum(c.allowed_tokens), 0),
                    func.count(func.distinct(c.user_id)),
                )
            )
        ).one()
        return WindowTotals(*(int(value) for value in row))

    async def top_users(
        self, scope: UsageFilter, start: datetime, end: datetime, limit: int
    ) -> list[OwnerTotals]:
        """The users who asked for most tokens in the window."""
        return await self._top_by("user_id", scope, start, end, limit)

    async def top_orgs(
        self, scope: UsageFilter, start: datetime, end: datetime, limit: int
    ) -> list[OwnerTotals]:
        """Organisations whose pools were charged most in the window (events with an org)."""
        return await self._top_by("org_id", scope, start, end, limit)

    async def _top_by(
        self,
        owner_column: str,
        scope: UsageFilter,
        start: datetime,
        end: datetime,
        limit: int,
    ) -> list[OwnerTotals]:
        c = _counted(scope, start, end).c
        owner = c[owner_column]
        tokens = func.sum(c.tokens)
        events = func.sum(c.events)
        rows = await self.session.execute(
            select(owner, tokens, events, func.sum(c.allowed_tokens))
            .where(owner.is_not(None))
            .group_by(owner)
            .order_by(tokens.desc(), events.desc(), owner)
            .limit(limit)
        )
        return [OwnerTotals(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    async def usage_timeseries(
        self, scope: UsageFilter, start: datetime, end: datetime, bucket_seconds: int
    ) -> list[BucketTotals]:
        """Exact totals of every event in [start, end) per (provider, model, bucket), buckets of
        `bucket_seconds` counted from the epoch; one grouped scan, empty buckets absent. Windows
        whose bounds are whole seconds put each event in exactly one bucket. (The one query the
        dashboard's usage chart needs: a rollup table can answer it later.)"""
        dialect = self.session.get_bind().dialect.name
        c = _counted(scope, start, end).c
        # Grouped by label: the expressions carry bound parameters, which PostgreSQL would see
        # as different expressions in the select list and in GROUP BY.
        bucket = (_epoch_seconds(c.at, dialect) // literal(bucket_seconds, BigInteger)).label(
            "bucket"
        )
        rows = await self.session.execute(
            select(
                c.provider,
                c.model,
                bucket,
                func.coalesce(func.sum(c.events), 0),
                func.coalesce(func.sum(c.allowed_events), 0),
                func.coalesce(func.sum(c.tokens), 0),
                func.coalesce(func.sum(c.allowed_tokens), 0),
            ).group_by(c.provider, c.model, bucket)
        )
        return [
            BucketTotals(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]))
            for r in rows
        ]

    async def by_model(
        self, scope: UsageFilter, start: datetime, end: datetime
    ) -> list[ModelTotals]:
        """Per model (events without one grouped as None): events, token kinds and the p50/p95
        latency of the raw events that report one (rollups keep no latencies), exact over
        [start, end)."""
        c = _counted(scope, start, end).c
        rows = await self.session.execute(
            select(
                c.model,
                func.coalesce(func.sum(c.events), 0),
                func.coalesce(func.sum(c.allowed_events), 0),
                func.coalesce(func.sum(c.tokens), 0),
                func.coalesce(func.sum(c.allowed_tokens), 0),
                func.coalesce(func.sum(c.prompt_tokens), 0),
                func.coalesce(func.sum(c.completion_tokens), 0),
            ).group_by(c.model)
        )
        latencies = await self._latency_percentiles(scope, start, end)
        found = []
        for r in rows:
            p50, p95 = (latencies.get((r[0], p)) for p in PERCENTILES)
            events, allowed, tokens, allowed_tokens, prompt, completion = (int(v) for v in r[1:7])
            found.append(
                ModelTotals(
                    r[0], events, allowed, tokens, allowed_tokens, prompt, completion, p50, p95
                )
            )
        found.sort(key=lambda m: (m.model is None, -m.tokens, m.model or ""))
        return found

    async def _latency_percentiles(
        self, scope: UsageFilter, start: datetime, end: datetime
    ) -> dict[tuple[str | None, int], int]:
        ranked = (
            select(
                UsageEvent.model.label("model"),
                UsageEvent.latency_ms.label("latency"),
                func.row_number()
                .over(partition_by=UsageEvent.model, order_by=UsageEvent.latency_ms)
                .label("rank"),
                func.count().over(partition_by=UsageEvent.model).label("n"),
            )
            .where(*_where(scope, start, end), UsageEvent.latency_ms.is_not(None))
            .subquery()
        )
        # rank = ceil(p/100 x n), in integers
        ranks = [(ranked.c.n * p + 99) // 100 for p in PERCENTILES]
        rows = await self.session.execute(
            select(ranked.c.model, ranked.c.latency, ranked.c.rank, ranked.c.n).where(
                or_(*(ranked.c.rank == rank for rank in ranks))
            )
        )
        found: dict[tuple[str | None, int], int] = {}
        for model, latency, rank, n in rows:
            for p in PERCENTILES:
                if rank == (n * p + 99) // 100:
                    found[(model, p)] = int(latency)
        return found

    async def tokens_per_window(
        self, scope: UsageFilter, windows: Sequence[tuple[datetime, datetime]]
    ) -> list[int]:
        """Tokens in each [start, end) window, in one scan over their union (windows adjoin)."""
        first = min(start for start, _ in windows)
        last = max(end for _, end in windows)
        c = _counted(scope, first, last).c
        sums = [
            func.coalesce(
                func.sum(case(((c.at >= _at(start)) & (c.at < _at(end)), c.tokens), else_=0)),
                0,
            )
            for start, end in windows
        ]
        row = (await self.session.execute(select(*sums))).one()
        return [int(value) for value in row]

    async def usage_totals(self) -> tuple[int, int]:
        """(events, tokens) over everything stored, raw or rolled up (operators and
        reconciliation tests)."""
        c = _counted(UsageFilter(None), None, None).c
        row = (
            await self.session.execute(
                select(func.coalesce(func.sum(c.events), 0), func.coalesce(func.sum(c.tokens), 0))
            )
        ).one()
        return int(row[0]), int(row[1])

    async def purchases(
        self, *, saga_id: str | None, user_id: uuid.UUID | None, limit: int, offset: int
    ) -> tuple[Sequence[PurchaseEvent], int]:
        clauses: list[ColumnElement[bool]] = []
        if saga_id is not None:
            clauses.append(PurchaseEvent.saga_id == saga_id)
        if user_id is not None:
            clauses.append(PurchaseEvent.user_id == user_id)
        rows = await self.session.execute(
            select(PurchaseEvent)
            .where(*clauses)
            .order_by(PurchaseEvent.occurred_at.desc(), PurchaseEvent.id.desc())
            .limit(limit)
            .offset(offset)
        )
        total = await self.session.scalar(
            select(func.count()).select_from(PurchaseEvent).where(*clauses)
        )
        return rows.scalars().all(), int(total or 0)

    # retention: roll up, then purge, in one transaction

    async def rollup_horizon(self, *, lock: str | None = None) -> datetime | None:
        """Every usage event before this instant lives in usage_rollup only (None: nothing is
        rolled up). On PostgreSQL `lock` "share" (ingestion) or "update" (the roll-up) makes
        the two take turns: an event is never checked against a horizon that moves before
        its transaction commits."""
        query = select(RetentionState.rolled_until).where(RetentionState.name == USAGE_STATE)
        if lock is not None and self.session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(read=lock == "share")
        found = (await self.session.execute(query)).first()
        if found is None:
            if lock == "update":  # a database made without the migration's row
                await self.session.execute(
                    insert(RetentionState).values(name=USAGE_STATE, rolled_until=None)
                )
            return None
        horizon: datetime | None = found[0]
        return horizon

    async def raw_time_at(self, before: datetime, offset: int) -> datetime | None:
        """The time of the (offset+1)-th oldest raw event before `before` (ix_usage_event_time)."""
        found: datetime | None = await self.session.scalar(
            select(UsageEvent.occurred_at)
            .where(UsageEvent.occurred_at < _at(before))
            .order_by(UsageEvent.occurred_at)
            .limit(1)
            .offset(offset)
        )
        return found

    async def roll_up_before(self, until: datetime) -> int:
        """Sum every raw event before `until` (a minute's start) into per-minute rollups, delete
        those events and move the horizon to `until`, all in the caller's transaction. Returns
        the raw events rolled up."""
        dialect = self.session.get_bind().dialect.name
        minute = _minute_of(UsageEvent.occurred_at, dialect).label("minute")
        keys = (
            UsageEvent.user_id,
            UsageEvent.org_id,
            UsageEvent.provider,
            UsageEvent.model,
            UsageEvent.decision,
            UsageEvent.allowed,
        )
        grouped = (
            select(
                minute,
                *keys,
                func.count(),
                func.sum(UsageEvent.tokens),
                func.coalesce(func.sum(UsageEvent.prompt_tokens), 0),
                func.coalesce(func.sum(UsageEvent.completion_tokens), 0),
            )
            .where(UsageEvent.occurred_at < _at(until))
            .group_by(minute, *keys)
        )
        columns = [
            "minute",
            "user_id",
            "org_id",
            "provider",
            "model",
            "decision",
            "allowed",
            "events",
            "tokens",
            "prompt_tokens",
            "completion_tokens",
        ]
        await self.session.execute(insert(UsageRollup).from_select(columns, grouped))
        deleted = await self.session.execute(
            delete(UsageEvent)
            .where(UsageEvent.occurred_at < _at(until))
            .execution_options(synchronize_session=False)
        )
        await self.session.execute(
            update(RetentionState)
            .where(RetentionState.name == USAGE_STATE)
            .values(rolled_until=until)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(deleted, "rowcount", 0) or 0)

    async def purge_purchases_before(self, before: datetime, limit: int) -> int:
        oldest = (
            select(PurchaseEvent.id)
            .where(PurchaseEvent.occurred_at < _at(before))
            .order_by(PurchaseEvent.occurred_at)
            .limit(limit)
        )
        result = await self.session.execute(
            delete(PurchaseEvent)
            .where(PurchaseEvent.id.in_(oldest.scalar_subquery()))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def purge_dead_letters_before(self, before: datetime, limit: int) -> int:
        oldest = (
            select(DeadLetter.id)
            .where(DeadLetter.dead_at < _at(before))
            .order_by(DeadLetter.dead_at)
            .limit(limit)
        )
        result = await self.session.execute(
            delete(DeadLetter)
            .where(DeadLetter.id.in_(oldest.scalar_subquery()))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def rollup_rows(self) -> int:
        return int(await self.session.scalar(select(func.count()).select_from(UsageRollup)) or 0)

    # dead letters

    async def insert_dead_letters(self, rows: list[dict[str, Any]]) -> int:
        """Keep events analytics could not count; an event already dead-lettered is skipped."""
        return await self._insert(DeadLetter.__table__, rows)  # type: ignore[arg-type]

    async def dead_letters(self, limit: int, offset: int) -> tuple[Sequence[DeadLetter], int]:
        rows = await self.session.execute(
            select(DeadLetter)
            .order_by(DeadLetter.dead_at.desc(), DeadLetter.id.desc())
            .limit(limit)
            .offset(offset)
        )
        total = await self.session.scalar(select(func.count()).select_from(DeadLetter))
        return rows.scalars().all(), int(total or 0)
