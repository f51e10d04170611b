"""Every SQL statement of the token service. Quota changes are single conditional statements."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Table,
    Uuid,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from leaky_tokens.shared.database import Executes, UtcDateTime
from leaky_tokens.tokens.models import OutboxEvent, Reservation, TokenPool


@dataclass(frozen=True, slots=True)
class ReservedPool:
    """What one reservation took, and the pool as it left it."""

    pool_id: uuid.UUID
    reserved: int  # from_allowance + from_credit
    from_allowance: int
    from_credit: int
    allowance_remaining: int  # of the allowance in the current window
    credit_tokens: int  # purchased credit left
    total_tokens: int  # the periodic allowance
    reset_at: datetime  # the window the allowance part was taken from ends here

    @property
    def remaining_tokens(self) -> int:
        """What can still be spent now: the allowance left, then the credit."""
        return max(0, self.allowance_remaining + self.credit_tokens)

    def reservation(
        self,
        reservation_id: uuid.UUID,
        *,
        user_id: uuid.UUID,
        org_id: uuid.UUID | None,
        provider: str,
        request_id: str | None,
        now: datetime,
        expires_at: datetime,
    ) -> Reservation:
        """The row that records this reservation until it is settled."""
        return Reservation(
            id=reservation_id,
            pool_id=self.pool_id,
            tokens=self.reserved,
            allowance_tokens=self.from_allowance,
            credit_tokens=self.from_credit,
            pool_reset_at=self.reset_at,
            user_id=user_id,
            org_id=org_id,
            provider=provider,
            request_id=request_id,
            created_at=now,
            expires_at=expires_at,
        )


@dataclass(frozen=True, slots=True)
class SettledReservation:
    """A deleted reservation row and what its settlement gave back."""

    pool_id: uuid.UUID
    reserved: int
    from_allowance: int
    from_credit: int
    used: int
    credit_refunded: int
    allowance_refunded: int  # 0 when dropped because the window reset since
    allowance_refund_dropped: int
    pool_reset_at: datetime
    user_id: uuid.UUID
    org_id: uuid.UUID | None
    provider: str
    request_id: str | None

    @property
    def refunded(self) -> int:
        return self.credit_refunded + self.allowance_refunded

    @property
    def used_allowance(self) -> int:
        """Of `used`, the part charged to the allowance (the credit is refunded first)."""
        return self.from_allowance - self.allowance_refunded - self.allowance_refund_dropped

    @property
    def used_credit(self) -> int:
        return self.from_credit - self.credit_refunded


# The hot statements are built once (bind names avoid the columns' own): building and
# cache-keying a statement per call cost more than running it (profiled: ~1 ms per reservation).
#
# reserve, in one conditional UPDATE (SET expressions all see the row as it was):
#   allowance = total if the window is due (the lazy reset) else remaining
#   available = allowance + credit;          the row qualifies iff available >= at_least
#   t = min(available, at_most);  from_allowance = min(allowance, t);  from_credit = t - it
# and the statement writes the split into last_reserved_* so RETURNING can report it.
_NOW = bindparam("p_now", type_=UtcDateTime())
_AT_MOST = bindparam("p_at_most", type_=BigInteger())
_EXPIRED = TokenPool.reset_at <= _NOW
_ALLOWANCE = case((_EXPIRED, TokenPool.total_tokens), else_=TokenPool.remaining_tokens)
_AVAILABLE = _ALLOWANCE + TokenPool.credit_tokens
_TAKEN = case((_AVAILABLE < _AT_MOST, _AVAILABLE), else_=_AT_MOST)
_FROM_ALLOWANCE = case((_ALLOWANCE < _TAKEN, _ALLOWANCE), else_=_TAKEN)
_RESERVE = (
    update(TokenPool)
    .where(
        TokenPool.owner_kind == bindparam("p_kind"),
        TokenPool.owner_id == bindparam("p_owner_id", type_=Uuid()),
        TokenPool.provider == bindparam("p_provider"),
        bindparam("p_at_least", type_=BigInteger()) <= _AVAILABLE,
    )
    .values(
        remaining_tokens=_ALLOWANCE - _FROM_ALLOWANCE,
        credit_tokens=TokenPool.credit_tokens - (_TAKEN - _FROM_ALLOWANCE),
        last_reserved_allowance=_FROM_ALLOWANCE,
        last_reserved_credit=_TAKEN - _FROM_ALLOWANCE,
        reset_at=case(
            (_EXPIRED, bindparam("p_next_reset", type_=UtcDateTime())), else_=TokenPool.reset_at
        ),
        updated_at=_NOW,
    )
    .returning(
        TokenPool.id,
        TokenPool.last_reserved_allowance,
        TokenPool.last_reserved_credit,
        TokenPool.remaining_tokens,
        TokenPool.credit_tokens,
        TokenPool.total_tokens,
        TokenPool.reset_at,
    )
    .execution_options(synchronize_session=False)
)
_SETTLE = (
    delete(Reservation)
    .where(Reservation.id == bindparam("p_id", type_=Uuid()))
    .returning(
        Reservation.pool_id,
        Reservation.tokens,
        Reservation.allowance_tokens,
        Reservation.credit_tokens,
        Reservation.pool_reset_at,
        Reservation.user_id,
        Reservation.org_id,
        Reservation.provider,
        Reservation.request_id,
    )
    .execution_options(synchronize_session=False)
)
# A refund: the credit part always; the allowance part only into the window it came from.
_REFUND = (
    update(TokenPool)
    .where(TokenPool.id == bindparam("p_pool_id", type_=Uuid()))
    .values(
        credit_tokens=TokenPool.credit_tokens + bindparam("p_credit", type_=BigInteger()),
        remaining_tokens=TokenPool.remaining_tokens
        + case(
            (
                TokenPool.reset_at == bindparam("p_reset_at", type_=UtcDateTime()),
                bindparam("p_allowance", type_=BigInteger()),
            ),
            else_=literal(0, BigInteger()),
        ),
        updated_at=_NOW,
    )
    .returning(TokenPool.reset_at)
    .execution_options(synchronize_session=False)
)
_POOL_OWNER = (
    TokenPool.owner_kind == bindparam("p_kind"),
    TokenPool.owner_id == bindparam("p_owner_id", type_=Uuid()),
    TokenPool.provider == bindparam("p_provider"),
)
_REMOVE_CREDIT = (
    update(TokenPool)
    .where(*_POOL_OWNER)
    .values(
        credit_tokens=TokenPool.credit_tokens - bindparam("p_tokens", type_=BigInteger()),
        updated_at=_NOW,
    )
    .returning(TokenPool.credit_tokens)
    .execution_options(synchronize_session=False)
)


_INSERT_RESERVATION = insert(cast(Table, Reservation.__table__))
_INSERT_EVENT = insert(cast(Table, OutboxEvent.__table__))


def _row_of(entity: Reservation | OutboxEvent) -> dict[str, Any]:
    return {c.key: getattr(entity, c.key) for c in entity.__table__.columns}


def _owner(kind: str, owner_id: uuid.UUID, provider: str) -> list[ColumnElement[bool]]:
    return [
        TokenPool.owner_kind == kind,
        TokenPool.owner_id == owner_id,
        TokenPool.provider == provider,
    ]


def _insert_for(executor: Executes) -> Any:
    """The dialect's INSERT (for ON CONFLICT), from a session or a Core connection."""
    get_bind = getattr(executor, "get_bind", None)
    source: Any = get_bind() if get_bind is not None else executor
    return postgresql.insert if source.dialect.name == "postgresql" else sqlite.insert


class QuotaLedger:
    """The two-balance ledger of a pool: the periodic allowance (reset every window) and the
    purchased credit (never reset, spent after the allowance). Every change is one conditional
    statement; the statements need only `execute`, so they run on a Core connection (half the
    cost of an ORM session) or inside a session alike.

    Reserve, then settle: `reserve` takes tokens (allowance first, then credit) and the caller
    records them in a reservation row; `settle` deletes that row (whoever deletes it settles, so
    a reservation is settled at most once) and gives back what was not used, credit first.
    """

    def __init__(self, executor: Executes) -> None:
        self.session = executor

    async def reserve(
        self,
        kind: str,
        owner_id: uuid.UUID,
        provider: str,
        *,
        at_least: int,
        at_most: int,
        now: datetime,
        window: timedelta,
    ) -> ReservedPool | None:
        """Take t = min(available, at_most) tokens if at least `at_least` are available, in one
        statement (`available` counts the allowance, reset first if its window is due, plus the
        credit): concurrent reservations can never overdraw or double-deduct. None: the pool
        is missing or holds fewer than `at_least`, and nothing changed."""
        if not 1 <= at_least <= at_most:
            raise ValueError(f"need 1 <= at_least <= at_most, got {at_least}, {at_most}")
        params = {
            "p_kind": kind,
            "p_owner_id": owner_id,
            "p_provider": provider,
            "p_at_least": at_least,
            "p_at_most": at_most,
            "p_now": now,
            "p_next_reset": now + window,
        }
        row = (await self.session.execute(_RESERVE, params)).one_or_none()
        if row is None:
            return None
        pool_id, from_allowance, from_credit, remaining, credit, total, reset_at = row
        return ReservedPool(
            pool_id,
            from_allowance + from_credit,
            from_allowance,
            from_credit,
            remaining,
            credit,
            total,
            reset_at,
        )

    async def add_reservation(self, reservation: Reservation) -> None:
        await self.session.execute(_INSERT_RESERVATION, _row_of(reservation))

    async def settle(
        self, reservation_id: uuid.UUID, used: int, now: datetime
    ) -> SettledReservation | None:
        """Delete the reservation and give back `reserved - used`: to the credit first (up to
        what came from it), the rest to the allowance, unless the pool's window reset since the
        reservation (the new window started full; that part is dropped). `used = reserved` is
        a full charge, `used = 0` a full refund. None: someone else settled it already."""
        row = (await self.session.execute(_SETTLE, {"p_id": reservation_id})).one_or_none()
        if row is None:
            return None
        pool_id, reserved, from_allowance, from_credit, reset_at, user_id, org_id, provider, rid = (
            row
        )
        if not 0 <= used <= reserved:
            raise ValueError(f"used must be within 0..{reserved}, got {used}")
        refund = reserved - used
        credit_back = min(refund, from_credit)
        allowance_back = refund - credit_back
        dropped = 0
        if refund:
            params = {
                "p_pool_id": pool_id,
                "p_credit": credit_back,
                "p_allowance": allowance_back,
                "p_reset_at": reset_at,
                "p_now": now,
            }
            current = (await self.session.execute(_REFUND, params)).one_or_none()
            if current is None or current[0] != reset_at:
                dropped, allowance_back = allowance_back, 0
        return SettledReservation(
            pool_id=pool_id,
            reserved=reserved,
            from_allowance=from_allowance,
            from_credit=from_credit,
            used=used,
            credit_refunded=credit_back if refund else 0,
            allowance_refunded=allowance_back,
            allowance_refund_dropped=dropped,
            pool_reset_at=reset_at,
            user_id=user_id,
            org_id=org_id,
            provider=provider,
            request_id=rid,
        )

    async def add_credit(
        self,
        kind: str,
        owner_id: uuid.UUID,
        provider: str,
        tokens: int,
        now: datetime,
        window: timedelta,
    ) -> None:
        """Add purchased credit (never reset by a window), creating the pool if absent with an
        allowance of zero."""
        statement = (
            _insert_for(self.session)(TokenPool)
            .values(
                id=uuid.uuid4(),
                owner_kind=kind,
                owner_id=owner_id,
                provider=provider,
                total_tokens=0,
                remaining_tokens=0,
                credit_tokens=tokens,
                last_reserved_allowance=0,
                last_reserved_credit=0,
                reset_at=now + window,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_update(
                index_elements=["owner_kind", "owner_id", "provider"],
                set_={"credit_tokens": TokenPool.credit_tokens + tokens, "updated_at": now},
            )
        )
        await self.session.execute(statement)

    async def remove_credit(
        self, kind: str, owner_id: uuid.UUID, provider: str, tokens: int, now: datetime
    ) -> int | None:
        """Take back exactly `tokens` of credit (a compensated purchase) and return the credit
        left: negative when some was already spent, a debt later credit and resets cannot
        erase; the allowance is never touched. None: no such pool."""
        params = {
            "p_kind": kind,
            "p_owner_id": owner_id,
            "p_provider": provider,
            "p_tokens": tokens,
            "p_now": now,
        }
        row = (await self.session.execute(_REMOVE_CREDIT, params)).one_or_none()
        return None if row is None else int(row[0])

    async def expired_reservations(self, now: datetime, limit: int) -> Sequence[uuid.UUID]:
        rows = await self.session.execute(
            select(Reservation.id)
            .where(Reservation.expires_at <= literal(now, UtcDateTime()))
            .order_by(Reservation.expires_at)
            .limit(limit)
        )
        return [uuid.UUID(str(value)) for value in rows.scalars()]

    async def add_event(self, event: OutboxEvent) -> None:
        # Core insert: an ORM add + flush cost more than the rest of the transaction.
        row = _row_of(event)
        row.pop("id", None)
        await self.session.execute(_INSERT_EVENT, row)


class TokensRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def pool(self, kind: str, owner_id: uuid.UUID, provider: str) -> TokenPool | None:
        rows = await self.session.execute(
            select(TokenPool).where(*_owner(kind, owner_id, provider))
        )
        return rows.scalar_one_or_none()

    async def pools_page(
        self, owners: Sequence[tuple[str, uuid.UUID]] | None, offset: int, limit: int
    ) -> tuple[Sequence[TokenPool], int]:
        """Pools of these (kind, owner id) pairs, or every pool (None), in a stable order."""
        clauses: list[ColumnElement[bool]] = []
        if owners is not None:
            if not owners:
                return [], 0
            clauses.append(
                or_(
                    *(
                        and_(TokenPool.owner_kind == kind, TokenPool.owner_id == owner_id)
                        for kind, owner_id in owners
                    )
                )
            )
        total = await self.session.scalar(
            select(func.count()).select_from(TokenPool).where(*clauses)
        )
        rows = await self.session.execute(
            select(TokenPool)
            .where(*clauses)
            .order_by(TokenPool.owner_kind.desc(), TokenPool.owner_id, TokenPool.provider)
            .offset(offset)
            .limit(limit)
        )
        return rows.scalars().all(), int(total or 0)

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
        statement = (
            _insert_for(self.session)(TokenPool)
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

    async def outbox(self, stream: str | None = None) -> Sequence[OutboxEvent]:
        query = select(OutboxEvent).order_by(OutboxEvent.id)
        if stream is not None:
            query = query.where(OutboxEvent.stream == stream)
        return (await self.session.execute(query)).scalars().all()
