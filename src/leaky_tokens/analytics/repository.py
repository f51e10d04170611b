"""Every SQL statement of the analytics service. Aggregates are computed by the database over
the whole window (never over a sample); windows are half-open, [start, end)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Table, case, cast, func, literal, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from leaky_tokens.analytics.models import PurchaseEvent, UsageEvent
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
    clauses: list[ColumnElement[bool]] = []
    if scope.provider is not None:
        clauses.append(UsageEvent.provider == scope.provider)
    if scope.user_id is not None:
        clauses.append(UsageEvent.user_id == scope.user_id)
    if scope.org_id is not None:
        clauses.append(UsageEvent.org_id == scope.org_id)
    if scope.model is not None:
        clauses.append(UsageEvent.model == scope.model)
    if start is not None:
        clauses.append(UsageEvent.occurred_at >= _at(start))
    if end is not None:
        clauses.append(UsageEvent.occurred_at < _at(end))
    return clauses


_ALLOWED_ONE = case((UsageEvent.allowed, 1), else_=0)
_ALLOWED_TOKENS = case((UsageEvent.allowed, UsageEvent.tokens), else_=0)
# Nearest-rank percentiles (the smallest latency with at least p % of the events at or below
# it), computed with window functions both SQLite and PostgreSQL have.
PERCENTILES = (50, 95)


def _epoch_seconds(dialect: str) -> ColumnElement[int]:
    """Whole seconds since the epoch of `occurred_at`, truncated, exactly. SQLite keeps the time
    as text ("YYYY-MM-DD HH:MM:SS.ffffff"): the first 19 characters are the whole seconds
    (strftime alone rounds to the millisecond, which would move an event at .9996 s into the
    next second while the window filter, a text comparison, keeps it in this one)."""
    if dialect == "postgresql":
        return cast(func.floor(func.extract("epoch", UsageEvent.occurred_at)), BigInteger)
    return cast(func.strftime("%s", func.substr(UsageEvent.occurred_at, 1, 19)), BigInteger)


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
        self, scope: UsageFilter, limit: int, offset: int
    ) -> Sequence[UsageEvent]:
        rows = await self.session.execute(
            select(UsageEvent)
            .where(*_where(scope))
            .order_by(UsageEvent.occurred_at.desc(), UsageEvent.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return rows.scalars().all()

    async def count_usage(self, scope: UsageFilter) -> int:
        total = await self.session.scalar(
            select(func.count()).select_from(UsageEvent).where(*_where(scope))
        )
        return int(total or 0)

    async def window_totals(
        self, scope: UsageFilter, start: datetime, end: datetime
    ) -> WindowTotals:
        row = (
            await self.session.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(_ALLOWED_ONE), 0),
                    func.coalesce(func.sum(UsageEvent.tokens), 0),
                    func.coalesce(func.sum(_ALLOWED_TOKENS), 0),
                    func.count(func.distinct(UsageEvent.user_id)),
                ).where(*_where(scope, start, end))
            )
        ).one()
        return WindowTotals(*(int(value) for value in row))

    async def top_users(
        self, scope: UsageFilter, start: datetime, end: datetime, limit: int
    ) -> list[OwnerTotals]:
        """The users who asked for most tokens in the window."""
        return await self._top_by(UsageEvent.user_id, scope, start, end, limit)

    async def top_orgs(
        self, scope: UsageFilter, start: datetime, end: datetime, limit: int
    ) -> list[OwnerTotals]:
        """Organisations whose pools were charged most in the window (events with an org)."""
        return await self._top_by(UsageEvent.org_id, scope, start, end, limit)

    async def _top_by(
        self,
        owner: Any,
        scope: UsageFilter,
        start: datetime,
        end: datetime,
        limit: int,
    ) -> list[OwnerTotals]:
        tokens = func.sum(UsageEvent.tokens)
        events = func.count()
        rows = await self.session.execute(
            select(owner, tokens, events, func.sum(_ALLOWED_TOKENS))
            .where(*_where(scope, start, end), owner.is_not(None))
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
        # Grouped by label: the expressions carry bound parameters, which PostgreSQL would see
        # as different expressions in the select list and in GROUP BY.
        bucket = (_epoch_seconds(dialect) // literal(bucket_seconds, BigInteger)).label("bucket")
        model = UsageEvent.model.label("model")
        rows = await self.session.execute(
            select(
                UsageEvent.provider,
                model,
                bucket,
                func.count(),
                func.coalesce(func.sum(_ALLOWED_ONE), 0),
                func.coalesce(func.sum(UsageEvent.tokens), 0),
                func.coalesce(func.sum(_ALLOWED_TOKENS), 0),
            )
            .where(*_where(scope, start, end))
            .group_by(UsageEvent.provider, model, bucket)
        )
        return [
            BucketTotals(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]))
            for r in rows
        ]

    async def by_model(
        self, scope: UsageFilter, start: datetime, end: datetime
    ) -> list[ModelTotals]:
        """Per model (events without one grouped as None): events, token kinds and the p50/p95
        latency of the events that report one, exact over [start, end)."""
        model = UsageEvent.model.label("model")
        rows = await self.session.execute(
            select(
                model,
                func.count(),
                func.coalesce(func.sum(_ALLOWED_ONE), 0),
                func.coalesce(func.sum(UsageEvent.tokens), 0),
                func.coalesce(func.sum(_ALLOWED_TOKENS), 0),
                func.coalesce(func.sum(UsageEvent.prompt_tokens), 0),
                func.coalesce(func.sum(UsageEvent.completion_tokens), 0),
            )
            .where(*_where(scope, start, end))
            .group_by(model)
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
        sums = [
            func.coalesce(
                func.sum(
                    case(
                        (
                            (UsageEvent.occurred_at >= _at(start))
                            & (UsageEvent.occurred_at < _at(end)),
                            UsageEvent.tokens,
                        ),
                        else_=0,
                    )
                ),
                0,
            )
            for start, end in windows
        ]
        first = min(start for start, _ in windows)
        last = max(end for _, end in windows)
        row = (await self.session.execute(select(*sums).where(*_where(scope, first, last)))).one()
        return [int(value) for value in row]

    async def usage_totals(self) -> tuple[int, int]:
        """(events, tokens) over everything stored (operators and reconciliation tests)."""
        row = (
            await self.session.execute(
                select(func.count(), func.coalesce(func.sum(UsageEvent.tokens), 0))
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
