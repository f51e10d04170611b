"""Every SQL statement of the token service. Quota changes are single conditional statements."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, case, delete, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from leaky_tokens.shared.database import UtcDateTime
from leaky_tokens.tokens.models import OutboxEvent, Reservation, TokenPool


@dataclass(frozen=True, slots=True)
class ReservedPool:
    pool_id: uuid.UUID
    remaining_tokens: int
    total_tokens: int
    reset_at: datetime


@dataclass(frozen=True, slots=True)
class SettledReservation:
    pool_id: uuid.UUID
    tokens: int
    pool_reset_at: datetime
    user_id: uuid.UUID
    org_id: uuid.UUID | None
    provider: str


def _owner(kind: str, owner_id: uuid.UUID, provider: str) -> list[ColumnElement[bool]]:
    return [
        TokenPool.owner_kind == kind,
        TokenPool.owner_id == owner_id,
        TokenPool.provider == provider,
    ]


class TokensRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def reserve(
        self,
        kind: str,
        owner_id: uuid.UUID,
        provider: str,
        tokens: int,
        now: datetime,
        window: timedelta,
    ) -> ReservedPool | None:
        """Take `tokens` from the pool if it holds enough, resetting an expired window first,
        in one statement: concurrent reservations can never overdraw or double-deduct."""
        now_ = literal(now, UtcDateTime())
        expired = TokenPool.reset_at <= now_
        available = case((expired, TokenPool.total_tokens), else_=TokenPool.remaining_tokens)
        statement = (
            update(TokenPool)
            .where(*_owner(kind, owner_id, provider), available >= tokens)
            .values(
                remaining_tokens=available - tokens,
                reset_at=case(
                    (expired, literal(now + window, UtcDateTime())), else_=TokenPool.reset_at
                ),
                updated_at=now_,
            )
            .returning(
                TokenPool.id, TokenPool.remaining_tokens, TokenPool.total_tokens, TokenPool.reset_at
            )
            .execution_options(synchronize_session=False)
        )
        row = (await self.session.execute(statement)).one_or_none()
        if row is None:
            return None
        return ReservedPool(row[0], row[1], row[2], row[3])

    async def add_reservation(self, reservation: Reservation) -> None:
        self.session.add(reservation)
        await self.session.flush()

    async def settle(self, reservation_id: uuid.UUID) -> SettledReservation | None:
        """Delete the reservation; only the caller that gets it back may refund it."""
        statement = (
            delete(Reservation)
            .where(Reservation.id == reservation_id)
            .returning(
                Reservation.pool_id,
                Reservation.tokens,
                Reservation.pool_reset_at,
                Reservation.user_id,
                Reservation.org_id,
                Reservation.provider,
            )
            .execution_options(synchronize_session=False)
        )
        row = (await self.session.execute(statement)).one_or_none()
        return None if row is None else SettledReservation(*row)

    async def refund(self, settled: SettledReservation, now: datetime) -> bool:
        """Give reserved tokens back, unless the pool's window reset since (it restarted full)."""
        statement = (
            update(TokenPool)
            .where(
                TokenPool.id == settled.pool_id,
                TokenPool.reset_at == literal(settled.pool_reset_at, UtcDateTime()),
            )
            .values(
                remaining_tokens=TokenPool.remaining_tokens + settled.tokens,
                updated_at=literal(now, UtcDateTime()),
            )
            .execution_options(synchronize_session=False)
        )
        result = await self.session.execute(statement)
        return bool(getattr(result, "rowcount", 0))

    async def expired_reservations(self, now: datetime, limit: int) -> Sequence[uuid.UUID]:
        rows = await self.session.execute(
            select(Reservation.id)
            .where(Reservation.expires_at <= literal(now, UtcDateTime()))
            .order_by(Reservation.expires_at)
            .limit(limit)
        )
        return rows.scalars().all()

    async def pool(self, kind: str, owner_id: uuid.UUID, provider: str) -> TokenPool | None:
        rows = await self.session.execute(
            select(TokenPool).where(*_owner(kind, owner_id, provider))
        )
        return rows.scalar_one_or_none()

    async def upsert_pool(
        self,
        kind: str,
        owner_id: uuid.UUID,
        provider: str,
        *,
        total: int,
        remaining: int,
        reset_at: datetime,
        now: datetime,
    ) -> TokenPool:
        values = {
            "id": uuid.uuid4(),
            "owner_kind": kind,
            "owner_id": owner_id,
            "provider": provider,
            "total_tokens": total,
            "remaining_tokens": remaining,
            "reset_at": reset_at,
            "created_at": now,
            "updated_at": now,
        }
        changes = {
            "total_tokens": total,
            "remaining_tokens": remaining,
            "reset_at": reset_at,
            "updated_at": now,
        }
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = (
            insert(TokenPool)
            .values(**values)
            .on_conflict_do_update(
                index_elements=["owner_kind", "owner_id", "provider"], set_=changes
            )
        )
        await self.session.execute(statement)
        found = await self.pool(kind, owner_id, provider)
        assert found is not None
        await self.session.refresh(found)
        return found

    async def add_event(self, event: OutboxEvent) -> None:
        self.session.add(event)

    async def outbox(self, stream: str | None = None) -> Sequence[OutboxEvent]:
        query = select(OutboxEvent).order_by(OutboxEvent.id)
        if stream is not None:
            query = query.where(OutboxEvent.stream == stream)
        return (await self.session.execute(query)).scalars().all()
