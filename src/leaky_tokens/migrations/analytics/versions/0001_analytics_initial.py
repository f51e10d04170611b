"""analytics: usage events (unique event id, time-window indexes) and purchase events

Revision ID: analytics_0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from leaky_tokens.shared.database import UtcDateTime

revision: str = "analytics_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AutoId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "usage_event",
        sa.Column("id", AutoId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("occurred_at", UtcDateTime(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("received_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("event_id", name="uq_usage_event_event_id"),
    )
    op.create_index("ix_usage_event_provider_time", "usage_event", ["provider", "occurred_at"])
    op.create_index(
        "ix_usage_event_user_provider_time", "usage_event", ["user_id", "provider", "occurred_at"]
    )
    op.create_index(
        "ix_usage_event_org_provider_time", "usage_event", ["org_id", "provider", "occurred_at"]
    )
    op.create_table(
        "purchase_event",
        sa.Column("id", AutoId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("saga_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("tokens", sa.BigInteger(), nullable=True),
        sa.Column("occurred_at", UtcDateTime(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("received_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("event_id", name="uq_purchase_event_event_id"),
    )
    op.create_index("ix_purchase_event_saga_time", "purchase_event", ["saga_id", "occurred_at"])
    op.create_index("ix_purchase_event_user_time", "purchase_event", ["user_id", "occurred_at"])


def downgrade() -> None:
    op.drop_table("purchase_event")
    op.drop_table("usage_event")
