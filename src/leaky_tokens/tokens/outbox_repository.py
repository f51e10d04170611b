"""Every SQL statement of the outbox relay and its sweeper: claim unpublished rows in id order,
mark them published, measure the backlog, purge what was published long ago."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from leaky_tokens.tokens.models import OutboxEvent


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    event_id: Any  # uuid.UUID
    stream: str
    event_type: str
    aggregate_id: str
    payload: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Backlog:
    unpublished: int
    oldest_created_at: datetime | None


_UNPUBLISHED = OutboxEvent.published_at.is_(None)
_COLUMNS = (
    OutboxEvent.id,
    OutboxEvent.event_id,
    OutboxEvent.stream,
    OutboxEvent.event_type,
    OutboxEvent.aggregate_id,
    OutboxEvent.payload,
    OutboxEvent.created_at,
)


class OutboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def unpublished(self, limit: int, *, lock: bool) -> list[OutboxRow]:
        """The oldest unpublished rows in id order (index ix_token_outbox_unpublished).

        With `lock` (PostgreSQL) the rows stay locked until the transaction ends and rows another
        relay holds are skipped, so two relays never send the same rows at once."""
        query = select(*_COLUMNS).where(_UNPUBLISHED).order_by(OutboxEvent.id).limit(limit)
        if lock:
            query = query.with_for_update(skip_locked=True)
        rows = await self.session.execute(query)
        return [OutboxRow(*row) for row in rows]

    async def mark_published(self, ids: Sequence[int], now: datetime) -> int:
        result = await self.session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(list(ids)), _UNPUBLISHED)
            .values(published_at=now)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def backlog(self) -> Backlog:
        row = (
            await self.session.execute(
                select(func.count(), func.min(OutboxEvent.created_at)).where(_UNPUBLISHED)
            )
        ).one()
        return Backlog(int(row[0]), row[1])

    async def purge_published(self, before: datetime, limit: int, *, lock: bool) -> int:
        """Delete at most `limit` rows published before `before`; returns how many went.

        One bounded statement: the subquery walks ix_token_outbox_unpublished (published_at,
        id) from its oldest published row, so its cost is the batch's, not the table's, and
        unpublished rows (published_at NULL) are never read. With `lock` (PostgreSQL) rows
        another transaction holds are skipped rather than waited for."""
        oldest = (
            select(OutboxEvent.id)
            .where(OutboxEvent.published_at < before)
            .order_by(OutboxEvent.published_at, OutboxEvent.id)
            .limit(limit)
        )
        if lock:
            oldest = oldest.with_for_update(skip_locked=True)
        result = await self.session.execute(
            delete(OutboxEvent)
            .where(OutboxEvent.id.in_(oldest.scalar_subquery()))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)
