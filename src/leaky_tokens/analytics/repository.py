"""Every SQL statement of the analytics service. Aggregates are computed by the database over
the whole window (never over a sample); windows are half-open, [start, end)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, case, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from leaky_tokens.analytics.models import PurchaseEvent, UsageEvent
from leaky_tokens.shared.database import UtcDateTime


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which usage events a query sees: one provider, optionally one user and/or one org."""

    provider: str
    user_id: uuid.UUID | None = None
    org_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class WindowTotals:
    events: int
    allowed_events: int
    tokens: int
    allowed_tokens: int
    unique_users: int


@dataclass(frozen=True, slots=True)
class UserTotals:
    user_id: uuid.UUID
    tokens: int
    events: int
    allowed_tokens: int


def _at(moment: datetime) -> ColumnElement[Any]:
    return literal(moment, UtcDateTime())


def _where(
    scope: UsageFilter, start: datetime | None = None, end: datetime | None = None
) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = [UsageEvent.provider == scope.provider]
    if scope.user_id is not None:
        clauses.append(UsageEvent.user_id == scope.user_id)
    if scope.org_id is not None:
        clauses.append(UsageEvent.org_id == scope.org_id)
    if start is not None:
        clauses.append(UsageEvent.occurred_at >= _at(start))
    if end is not None:
        clauses.append(UsageEvent.occurred_at < _at(end))
    return clauses


_ALLOWED_ONE = case((UsageEvent.allowed, 1), else_=0)
_ALLOWED_TOKENS = case((UsageEvent.allowed, UsageEvent.tokens), else_=0)


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
    ) -> list[UserTotals]:
        tokens = func.sum(UsageEvent.tokens)
        events = func.count()
        rows = await self.session.execute(
            select(UsageEvent.user_id, tokens, events, func.sum(_ALLOWED_TOKENS))
            .where(*_where(scope, start, end))
            .group_by(UsageEvent.user_id)
            .order_by(tokens.desc(), events.desc(), UsageEvent.user_id)
            .limit(limit)
        )
        return [UserTotals(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

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
