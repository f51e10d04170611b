"""tokens: purchase sagas, feature flags, payment stub ledger

Revision ID: tokens_0002
Revises: tokens_0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from leaky_tokens.shared.database import UtcDateTime

revision: str = "tokens_0002"
down_revision: str | None = "tokens_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "purchase_saga",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(100), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("payment_reserved", sa.Boolean(), nullable=False),
        sa.Column("tokens_allocated", sa.Boolean(), nullable=False),
        sa.Column("failure_reason", sa.String(500), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", UtcDateTime(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_purchase_saga_user_key"),
    )
    op.create_index("ix_purchase_saga_due", "purchase_saga", ["status", "next_attempt_at"])
    op.create_index("ix_purchase_saga_user_created", "purchase_saga", ["user_id", "created_at"])
    op.create_table(
        "feature_flag",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "stub_payment_operation",
        sa.Column("saga_id", sa.Uuid(), primary_key=True),
        sa.Column("step", sa.String(16), primary_key=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("stub_payment_operation")
    op.drop_table("feature_flag")
    op.drop_index("ix_purchase_saga_user_created", "purchase_saga")
    op.drop_index("ix_purchase_saga_due", "purchase_saga")
    op.drop_table("purchase_saga")
