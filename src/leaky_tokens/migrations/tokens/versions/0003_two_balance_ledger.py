"""tokens: two balances per pool (periodic allowance + purchased credit), reservation splits

Before this revision a completed purchase added its tokens to the pool's total, so every window
reset handed them out again. From here on purchases add `credit_tokens`, which never resets.

Existing pools are converted once: the tokens of every purchase still allocated to a pool
(`purchase_saga.tokens_allocated`) are moved from its total (the allowance) to its credit,
capped at the total. Of what the pool has left now (a window already due counts as full),
that credit is what remains first: under the new order the allowance is spent before the
credit, so the credit is what outlives the window. In-flight reservations were all taken from
the allowance.

Revision ID: tokens_0003
Revises: tokens_0002
Create Date: 2027-01-10
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "tokens_0003"
down_revision: str | None = "tokens_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 1000


def upgrade() -> None:
    zero = sa.text("0")
    op.add_column(
        "token_pool",
        sa.Column("credit_tokens", sa.BigInteger(), nullable=False, server_default=zero),
    )
    op.add_column(
        "token_pool",
        sa.Column("last_reserved_allowance", sa.BigInteger(), nullable=False, server_default=zero),
    )
    op.add_column(
        "token_pool",
        sa.Column("last_reserved_credit", sa.BigInteger(), nullable=False, server_default=zero),
    )
    op.add_column(
        "token_reservation",
        sa.Column("allowance_tokens", sa.BigInteger(), nullable=False, server_default=zero),
    )
    op.add_column(
        "token_reservation",
        sa.Column("credit_tokens", sa.BigInteger(), nullable=False, server_default=zero),
    )
    op.add_column("token_reservation", sa.Column("request_id", sa.String(128), nullable=True))
    op.execute("UPDATE token_reservation SET allowance_tokens = tokens")
    _move_purchases_to_credit()


def _move_purchases_to_credit() -> None:
    bind = op.get_bind()
    now = datetime.now(UTC)
    saga = sa.table(
        "purchase_saga",
        sa.column("user_id", sa.Uuid()),
        sa.column("org_id", sa.Uuid()),
        sa.column("provider", sa.String()),
        sa.column("tokens", sa.BigInteger()),
        sa.column("tokens_allocated", sa.Boolean()),
    )
    kind = sa.case((saga.c.org_id.is_not(None), "org"), else_="user")
    owner = sa.func.coalesce(saga.c.org_id, saga.c.user_id, type_=sa.Uuid())
    purchased = bind.execute(
        sa.select(kind, owner, saga.c.provider, sa.func.sum(saga.c.tokens))
        .select_from(saga)
        .where(saga.c.tokens_allocated.is_(True))
        .group_by(kind, owner, saga.c.provider)
    ).all()
    if not purchased:
        return
    pool = sa.table(
        "token_pool",
        sa.column("id", sa.Uuid()),
        sa.column("owner_kind", sa.String()),
        sa.column("owner_id", sa.Uuid()),
        sa.column("provider", sa.String()),
        sa.column("total_tokens", sa.BigInteger()),
        sa.column("remaining_tokens", sa.BigInteger()),
        sa.column("credit_tokens", sa.BigInteger()),
        sa.column("reset_at", sa.DateTime(timezone=True)),
    )
    bought = {(k, uuid.UUID(str(o)), p): int(n) for k, o, p, n in purchased}
    rows = bind.execute(
        sa.select(
            pool.c.id,
            pool.c.owner_kind,
            pool.c.owner_id,
            pool.c.provider,
            pool.c.total_tokens,
            pool.c.remaining_tokens,
            pool.c.reset_at,
        )
    ).all()
    changes = []
    for pool_id, owner_kind, owner_id, provider, total, remaining, reset_at in rows:
        tokens = bought.get((owner_kind, uuid.UUID(str(owner_id)), provider), 0)
        if tokens <= 0:
            continue
        moved = min(tokens, total)
        if reset_at.tzinfo is None:
            reset_at = reset_at.replace(tzinfo=UTC)
        left = total if reset_at <= now else remaining
        credit = min(moved, left)
        allowance = total - moved
        changes.append(
            {
                "p_id": pool_id,
                "p_total": allowance,
                "p_remaining": max(0, min(left - credit, allowance)),
                "p_credit": credit,
            }
        )
    statement = (
        sa.update(pool)
        .where(pool.c.id == sa.bindparam("p_id"))
        .values(
            total_tokens=sa.bindparam("p_total"),
            remaining_tokens=sa.bindparam("p_remaining"),
            credit_tokens=sa.bindparam("p_credit"),
        )
    )
    for start in range(0, len(changes), _BATCH):
        bind.execute(statement, changes[start : start + _BATCH])


def downgrade() -> None:
    # Credit folds back into the allowance (the old model had only one balance).
    op.execute(
        "UPDATE token_pool SET total_tokens = total_tokens + credit_tokens, "
        "remaining_tokens = remaining_tokens + credit_tokens WHERE credit_tokens > 0"
    )
    with op.batch_alter_table("token_reservation") as batch:
        batch.drop_column("request_id")
        batch.drop_column("credit_tokens")
        batch.drop_column("allowance_tokens")
    with op.batch_alter_table("token_pool") as batch:
        batch.drop_column("last_reserved_credit")
        batch.drop_column("last_reserved_allowance")
        batch.drop_column("credit_tokens")
