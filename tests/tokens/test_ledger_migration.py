"""Migration tokens_0003 converts existing pools to two balances, on SQLite and PostgreSQL:
tokens bought before it (once folded into the pool's total, so every reset refilled them) become
credit, and what the pool has left is credit first."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from leaky_tokens.shared.database import Database
from leaky_tokens.shared.migrations import upgrade_database

NOW = datetime.now(UTC)


async def _insert_pool(
    db: Database, owner: uuid.UUID, total: int, remaining: int, **kw: object
) -> None:
    async with db.transaction() as session:
        await session.execute(
            text(
                "INSERT INTO token_pool (id, owner_kind, owner_id, provider, total_tokens, "
                "remaining_tokens, reset_at, created_at, updated_at) VALUES (:id, :kind, :owner, "
                "'openai', :total, :remaining, :reset, :now, :now)"
            ),
            {
                "id": _uuid(db, uuid.uuid4()),
                "kind": kw.get("kind", "user"),
                "owner": _uuid(db, owner),
                "total": total,
                "remaining": remaining,
                "reset": _time(db, kw.get("reset_at", NOW + timedelta(hours=1))),  # type: ignore[arg-type]
                "now": _time(db, NOW),
            },
        )


async def _insert_saga(
    db: Database, user_id: uuid.UUID, tokens: int, allocated: bool, org_id: uuid.UUID | None = None
) -> None:
    async with db.transaction() as session:
        await session.execute(
            text(
                "INSERT INTO purchase_saga (id, user_id, org_id, provider, tokens, "
                "idempotency_key, request_hash, status, payment_reserved, tokens_allocated, "
                "attempts, next_attempt_at, created_at, updated_at) VALUES (:id, :user, :org, "
                "'openai', :tokens, NULL, 'h', :status, :allocated, :allocated, 0, :now, :now, "
                ":now)"
            ),
            {
                "id": _uuid(db, uuid.uuid4()),
                "user": _uuid(db, user_id),
                "org": _uuid(db, org_id) if org_id else None,
                "tokens": tokens,
                "status": "COMPLETED" if allocated else "FAILED",
                "allocated": allocated,
                "now": _time(db, NOW),
            },
        )


def _uuid(db: Database, value: uuid.UUID) -> object:
    return value.hex if db.is_sqlite else value


def _time(db: Database, value: datetime) -> object:
    return value.replace(tzinfo=None).isoformat(sep=" ") if db.is_sqlite else value


async def _balances(db: Database, owner: uuid.UUID) -> tuple[int, int, int]:
    async with db.read() as session:
        row = (
            await session.execute(
                text(
                    "SELECT total_tokens, remaining_tokens, credit_tokens FROM token_pool "
                    "WHERE owner_id = :owner"
                ),
                {"owner": _uuid(db, owner)},
            )
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


async def test_purchased_tokens_move_from_the_total_to_the_credit(database_url: str) -> None:
    await upgrade_database(database_url, "tokens", "tokens_0002")
    db = Database(database_url)
    try:
        bought = uuid.uuid4()  # allowance 1000 + two purchases of 500 (one failed), 900 left
        await _insert_pool(db, bought, total=1500, remaining=900)
        await _insert_saga(db, bought, 500, allocated=True)
        await _insert_saga(db, bought, 700, allocated=False)
        spent = uuid.uuid4()  # bought 500, then spent all but 200 of everything
        await _insert_pool(db, spent, total=1500, remaining=200)
        await _insert_saga(db, spent, 500, allocated=True)
        due = uuid.uuid4()  # a window already over counts as full
        await _insert_pool(db, due, total=800, remaining=0, reset_at=NOW - timedelta(minutes=1))
        await _insert_saga(db, due, 300, allocated=True)
        plain = uuid.uuid4()  # never bought anything
        await _insert_pool(db, plain, total=1000, remaining=250)
        org, member = uuid.uuid4(), uuid.uuid4()  # an org purchase fills the org's pool
        await _insert_pool(db, org, total=400, remaining=400, kind="org")
        await _insert_saga(db, member, 400, allocated=True, org_id=org)
    finally:
        await db.dispose()

    await upgrade_database(database_url, "tokens")

    db = Database(database_url)
    try:
        assert await _balances(db, bought) == (1000, 400, 500)
        assert await _balances(db, spent) == (1000, 0, 200)
        assert await _balances(db, due) == (500, 500, 300)
        assert await _balances(db, plain) == (1000, 250, 0)
        assert await _balances(db, org) == (0, 0, 400)
    finally:
        await db.dispose()
