"""Every SQL statement of agent sessions (issue 13): the session rows, their events, and the
moves of a budget between its owner's pool and the session's own pool.

Each state change is one conditional UPDATE on the session's status, so of two concurrent
activations, closes or rotations exactly one takes effect; the budget moves in the same
transaction as the status change that causes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, case, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from leaky_tokens.shared.database import UtcDateTime
from leaky_tokens.tokens.models import AgentSession, AgentSessionEvent, Reservation, TokenPool
from leaky_tokens.tokens.repository import _insert_for
from leaky_tokens.tokens.session_budget import SESSION_POOL, SESSION_POOL_PROVIDER

PENDING = "pending"
ACTIVE = "active"
TERMINATED = "terminated"
EXPIRED = "expired"
FAILED = "failed"
CLOSED = (TERMINATED, EXPIRED)


class SessionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # rows
    async def insert_if_absent(self, row: AgentSession) -> bool:
        """Insert the session; False when (user, idempotency key) exists already."""
        values = {c.key: getattr(row, c.key) for c in AgentSession.__table__.columns}
        statement = _insert_for(self.session)(AgentSession).values(**values)
        if row.idempotency_key is not None:
            statement = statement.on_conflict_do_nothing(
                index_elements=["user_id", "idempotency_key"]
            )
        result = await self.session.execute(statement)
        return bool(getattr(result, "rowcount", 0))

    async def by_key(self, user_id: uuid.UUID, key: str) -> AgentSession | None:
        rows = await self.session.execute(
            select(AgentSession).where(
                AgentSession.user_id == user_id, AgentSession.idempotency_key == key
            )
        )
        return rows.scalar_one_or_none()

    async def of_user(
        self, user_id: uuid.UUID | None, session_id: uuid.UUID
    ) -> AgentSession | None:
        """The session, if `user_id` owns it (None: whoever does)."""
        clauses: list[ColumnElement[bool]] = [AgentSession.id == session_id]
        if user_id is not None:
            clauses.append(AgentSession.user_id == user_id)
        rows = await self.session.execute(
            select(AgentSession).where(*clauses).execution_options(populate_existing=True)
        )
        return rows.scalar_one_or_none()

    async def page(
        self, user_id: uuid.UUID, status: str | None, offset: int, limit: int
    ) -> tuple[Sequence[AgentSession], int]:
        clauses: list[ColumnElement[bool]] = [AgentSession.user_id == user_id]
        if status is not None:
            clauses.append(AgentSession.status == status)
        total = await self.session.scalar(
            select(func.count()).select_from(AgentSession).where(*clauses)
        )
        rows = await self.session.execute(
            select(AgentSession)
            .where(*clauses)
            .order_by(AgentSession.created_at.desc(), AgentSession.id)
            .offset(offset)
            .limit(limit)
        )
        return rows.scalars().all(), int(total or 0)

    async def change(
        self, session_id: uuid.UUID, from_status: Sequence[str], **values: Any
    ) -> bool:
        """Set `values` iff the session is in one of `from_status`: the one way a session
        changes state, so of concurrent changes exactly one wins."""
        result = await self.session.execute(
            update(AgentSession)
            .where(AgentSession.id == session_id, AgentSession.status.in_(from_status))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    async def swap_credential(
        self, session_id: uuid.UUID, expected_key_id: uuid.UUID | None, **values: Any
    ) -> bool:
        """Replace the credential iff it is still `expected_key_id` and the session active."""
        result = await self.session.execute(
            update(AgentSession)
            .where(
                AgentSession.id == session_id,
                AgentSession.status == ACTIVE,
                AgentSession.credential_key_id == expected_key_id,
            )
            .values(rotations=AgentSession.rotations + 1, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    async def due_to_expire(self, now: datetime, limit: int) -> Sequence[uuid.UUID]:
        rows = await self.session.execute(
            select(AgentSession.id)
            .where(
                AgentSession.status.in_((PENDING, ACTIVE)),
                AgentSession.expires_at <= literal(now, UtcDateTime()),
            )
            .order_by(AgentSession.expires_at)
            .limit(limit)
        )
        return list(rows.scalars())

    async def closed_with_budget_left(self, limit: int) -> Sequence[uuid.UUID]:
        """Ended sessions whose pool received tokens after the end (a late settlement)."""
        rows = await self.session.execute(
            select(AgentSession.id)
            .join(
                TokenPool,
                (TokenPool.owner_kind == SESSION_POOL)
                & (TokenPool.owner_id == AgentSession.id)
                & (TokenPool.provider == SESSION_POOL_PROVIDER),
            )
            .where(AgentSession.status.in_(CLOSED), TokenPool.credit_tokens > 0)
            .limit(limit)
        )
        return list(rows.scalars())

    # the budget
    async def open_pool(self, session_id: uuid.UUID, tokens: int, now: datetime) -> None:
        """The session's pool, holding its whole budget as credit (credit never resets)."""
        statement = _insert_for(self.session)(TokenPool).values(
            id=uuid.uuid4(),
            owner_kind=SESSION_POOL,
            owner_id=session_id,
            provider=SESSION_POOL_PROVIDER,
            total_tokens=0,
            remaining_tokens=0,
            credit_tokens=tokens,
            last_reserved_allowance=0,
            last_reserved_credit=0,
            reset_at=now.replace(year=now.year + 100),  # never: the allowance is 0
            created_at=now,
            updated_at=now,
        )
        await self.session.execute(statement)

    async def budget_state(self, session_id: uuid.UUID) -> tuple[int, int]:
        """(tokens left unreserved in the session's pool, tokens reserved by calls in flight)."""
        pool = await self.session.execute(
            select(TokenPool.id, TokenPool.credit_tokens).where(
                TokenPool.owner_kind == SESSION_POOL,
                TokenPool.owner_id == session_id,
                TokenPool.provider == SESSION_POOL_PROVIDER,
            )
        )
        row = pool.one_or_none()
        if row is None:
            return 0, 0
        pool_id, credit = row
        in_flight = await self.session.scalar(
            select(func.coalesce(func.sum(Reservation.tokens), 0)).where(
                Reservation.pool_id == pool_id
            )
        )
        return int(credit), int(in_flight or 0)

    async def give_back(
        self,
        kind: str,
        owner_id: uuid.UUID,
        provider: str,
        *,
        credit: int,
        allowance: int,
        reset_at: datetime | None,
        now: datetime,
    ) -> bool:
        """Return tokens to a pool: the credit part always, the allowance part only into the
        window it was taken from. True when the allowance part was applied."""
        same_window = (
            TokenPool.reset_at == literal(reset_at, UtcDateTime())
            if reset_at is not None
            else literal(False)
        )
        result = await self.session.execute(
            update(TokenPool)
            .where(
                TokenPool.owner_kind == kind,
                TokenPool.owner_id == owner_id,
                TokenPool.provider == provider,
            )
            .values(
                credit_tokens=TokenPool.credit_tokens + credit,
                remaining_tokens=TokenPool.remaining_tokens
                + case((same_window, allowance), else_=0),
                updated_at=now,
            )
            .returning(TokenPool.reset_at)
            .execution_options(synchronize_session=False)
        )
        row = result.one_or_none()
        return row is not None and reset_at is not None and row[0] == reset_at

    # events
    async def add_event(self, event: AgentSessionEvent) -> None:
        self.session.add(event)
        await self.session.flush()

    async def recent_events(self, session_id: uuid.UUID, limit: int) -> Sequence[AgentSessionEvent]:
        rows = await self.session.execute(
            select(AgentSessionEvent)
            .where(AgentSessionEvent.session_id == session_id)
            .order_by(AgentSessionEvent.id.desc())
            .limit(limit)
        )
        return rows.scalars().all()

    async def status_counts(self, user_id: uuid.UUID) -> dict[str, tuple[int, int, int]]:
        """status -> (sessions, budgets, tokens returned)."""
        rows = await self.session.execute(
            select(
                AgentSession.status,
                func.count(),
                func.coalesce(func.sum(AgentSession.token_budget), 0),
                func.coalesce(
                    func.sum(
                        AgentSession.returned_credit
                        + AgentSession.returned_allowance
                        + AgentSession.returned_dropped
                    ),
                    0,
                ),
            )
            .where(AgentSession.user_id == user_id)
            .group_by(AgentSession.status)
        )
        return {status: (int(n), int(b), int(r)) for status, n, b, r in rows}

    async def live_budget_left(self, user_id: uuid.UUID) -> int:
        value = await self.session.scalar(
            select(func.coalesce(func.sum(TokenPool.credit_tokens), 0))
            .join(
                AgentSession,
                (TokenPool.owner_kind == SESSION_POOL) & (TokenPool.owner_id == AgentSession.id),
            )
            .where(AgentSession.user_id == user_id, AgentSession.status == ACTIVE)
        )
        return int(value or 0)
