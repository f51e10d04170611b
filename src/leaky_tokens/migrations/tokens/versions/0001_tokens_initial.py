"""tokens: quota pools, in-flight reservations, outbox

Revision ID: tokens_0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from leaky_tokens.shared.database import UtcDateTime

revision: str = "tokens_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AutoId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "token_pool",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("owner_kind", sa.String(8), nullable=False),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("remaining_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reset_at", UtcDateTime(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("owner_kind", "owner_id", "provider", name="uq_token_pool_owner"),
        sa.CheckConstraint("remaining_tokens >= 0", name="ck_token_pool_remaining_nonneg"),
        sa.CheckConstraint("total_tokens >= 0", name="ck_token_pool_total_nonneg"),
    )
    op.create_table(
        "token_reservation",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("pool_id", sa.Uuid(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("pool_reset_at", UtcDateTime(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_token_reservation_expires_at", "token_reservation", ["expires_at"])
    op.create_table(
        "token_outbox",
        sa.Column("id", AutoId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.Uuid(), nullable=False, unique=True),
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("aggregate_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("published_at", UtcDateTime(), nullable=True),
    )
    op.create_index("ix_token_outbox_unpublished", "token_outbox", ["published_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_token_outbox_unpublished", "token_outbox")
    op.drop_table("token_outbox")
    op.drop_index("ix_token_reservation_expires_at", "token_reservation")
    op.drop_table("token_reservation")
    op.drop_table("token_pool")
