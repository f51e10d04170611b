"""Every SQL statement of purchases: sagas, their leases, feature flags and the payment stub."""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from leaky_tokens.tokens.models import (
    FeatureFlag,
    OutboxEvent,
    PurchaseSaga,
    StubPaymentOperation,
)

TERMINAL = ("COMPLETED", "FAILED")


def _insert_for(session: AsyncSession) -> Any:
    dialect = session.get_bind().dialect.name
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


class SagaRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # sagas
    async def add(self, saga: PurchaseSaga) -> bool:
        """False when (user, idempotency key) already has a saga (the unique constraint)."""
        try:
            async with self.session.begin_nested():
                self.session.add(saga)
                await self.session.flush()
        except IntegrityError:
            return False
        return True

    async def lock_purchases_of(self, user_id: uuid.UUID) -> None:
        """Serialise one user's purchase starts until the transaction ends, so a daily cap is
        checked and its new saga added atomically (SQLite write transactions already are)."""
        if self.session.get_bind().dialect.name == "postgresql":
            await self.session.execute(
                text("SELECT pg_advisory_xact_lock(:id)"),
                {"id": zlib.crc32(f"leaky-tokens:purchases:{user_id}".encode())},
            )

    async def purchased_since(self, user_id: uuid.UUID, since: datetime) -> tuple[int, int]:
        """(purchases, tokens) the user started since `since`, leaving out those that FAILED."""
        row = (
            await self.session.execute(
                select(func.count(), func.coalesce(func.sum(PurchaseSaga.tokens), 0)).where(
                    PurchaseSaga.user_id == user_id,
                    PurchaseSaga.created_at >= since,
                    PurchaseSaga.status != "FAILED",
                )
            )
        ).one()
        return int(row[0]), int(row[1])

    async def by_id(self, saga_id: uuid.UUID) -> PurchaseSaga | None:
        return await self.session.get(PurchaseSaga, saga_id)

    async def by_key(self, user_id: uuid.UUID, key: str) -> PurchaseSaga | None:
        rows = await self.session.execute(
            select(PurchaseSaga).where(
                PurchaseSaga.user_id == user_id, PurchaseSaga.idempotency_key == key
            )
        )
        return rows.scalar_one_or_none()

    async def page_of_user(
        self, user_id: uuid.UUID | None, offset: int, limit: int
    ) -> tuple[Sequence[PurchaseSaga], int]:
        """One user's sagas, or everyone's (None), newest first."""
        clauses = [] if user_id is None else [PurchaseSaga.user_id == user_id]
        total = await self.session.scalar(
            select(func.count()).select_from(PurchaseSaga).where(*clauses)
        )
        rows = await self.session.execute(
            select(PurchaseSaga)
            .where(*clauses)
            .order_by(PurchaseSaga.created_at.desc(), PurchaseSaga.id)
            .offset(offset)
            .limit(limit)
        )
        return rows.scalars().all(), int(total or 0)

    async def claim_due(
        self, owner: str, now: datetime, lease: timedelta, limit: int
    ) -> list[uuid.UUID]:
        """Lease up to `limit` due sagas to `owner`. On PostgreSQL, FOR UPDATE SKIP LOCKED lets
        replicas claim side by side without waiting on or double-taking each other's rows."""
        candidates = (
            select(PurchaseSaga.id)
            .where(
                PurchaseSaga.status.not_in(TERMINAL),
                PurchaseSaga.next_attempt_at <= now,
                or_(PurchaseSaga.lease_expires_at.is_(None), PurchaseSaga.lease_expires_at < now),
            )
            .order_by(PurchaseSaga.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        ids = list((await self.session.execute(candidates)).scalars())
        if not ids:
            return []
        await self.session.execute(
            update(PurchaseSaga)
            .where(PurchaseSaga.id.in_(ids))
            .values(lease_owner=owner, lease_expires_at=now + lease)
            .execution_options(synchronize_session=False)
        )
        return ids

    async def move(
        self,
        saga_id: uuid.UUID,
        owner: str,
        expected_status: str,
        now: datetime,
        **values: Any,
    ) -> bool:
        """Change a saga only if it is still in `expected_status` and leased to `owner`
        (a fence: a driver whose lease lapsed and was taken over changes nothing)."""
        result = await self.session.execute(
            update(PurchaseSaga)
            .where(
                PurchaseSaga.id == saga_id,
                PurchaseSaga.status == expected_status,
                PurchaseSaga.lease_owner == owner,
            )
            .values(updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    async def release_lease(self, saga_id: uuid.UUID, owner: str) -> None:
        await self.session.execute(
            update(PurchaseSaga)
            .where(PurchaseSaga.id == saga_id, PurchaseSaga.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )

    async def events_of(self, saga_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            select(OutboxEvent.payload)
            .where(OutboxEvent.stream == "purchase", OutboxEvent.aggregate_id == str(saga_id))
            .order_by(OutboxEvent.id)
        )
        return [dict(p) for p in rows.scalars()]

    # feature flags
    async def flags(self) -> list[FeatureFlag]:
        return list((await self.session.execute(select(FeatureFlag))).scalars())

    async def set_flag(self, name: str, enabled: bool, now: datetime) -> None:
        """An admin's change: it replaces whatever was there."""
        insert = _insert_for(self.session)
        statement = insert(FeatureFlag).values(
            name=name, enabled=enabled, source="admin", updated_at=now
        )
        statement = statement.on_conflict_do_update(
            index_elements=["name"],
            set_={"enabled": enabled, "source": "admin", "updated_at": now},
        )
        await self.session.execute(statement)

    async def seed_flag(self, name: str, enabled: bool, now: datetime) -> bool:
        """A value from settings, kept only if the flag was never set (True when it was kept);
        replicas starting together agree through the primary key."""
        insert = _insert_for(self.session)
        statement = (
            insert(FeatureFlag)
            .values(name=name, enabled=enabled, source="settings", updated_at=now)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        result = await self.session.execute(statement)
        return bool(getattr(result, "rowcount", 0))

    # the payment stub's ledger
    async def record_payment_operation(
        self, saga_id: uuid.UUID, step: str, amount: int, now: datetime
    ) -> bool:
        """True the first time (saga, step) is seen; a repeat is a no-op."""
        insert = _insert_for(self.session)
        statement = (
            insert(StubPaymentOperation)
            .values(saga_id=saga_id, step=step, amount=amount, created_at=now)
            .on_conflict_do_nothing(index_elements=["saga_id", "step"])
        )
        result = await self.session.execute(statement)
        return bool(getattr(result, "rowcount", 0))

    async def payment_steps(self, saga_id: uuid.UUID) -> set[str]:
        rows = await self.session.execute(
            select(StubPaymentOperation.step).where(StubPaymentOperation.saga_id == saga_id)
        )
        return set(rows.scalars())
