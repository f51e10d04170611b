"""analytics: per-minute usage rollups and their horizon (retention), dead-lettered events

Revision ID: analytics_0004
Revises: analytics_0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from leaky_tokens.shared.database import UtcDateTime

revision: str = "analytics_0004"
down_revision: str | None = "analytics_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AutoId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_index("ix_usage_event_time", "usage_event", ["occurred_at"])
    op.create_index("ix_purchase_event_time", "purchase_event", ["occurred_at"])
    op.create_table(
        "usage_rollup",
        sa.Column("id", AutoId, primary_key=True, autoincrement=True),
        sa.Column("minute", UtcDateTime(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_usage_rollup_minute", "usage_rollup", ["minute"])
    op.create_index("ix_usage_rollup_provider_minute", "usage_rollup", ["provider", "minute"])
    op.create_index(
        "ix_usage_rollup_user_provider_minute", "usage_rollup", ["user_id", "provider", "minute"]
    )
    op.create_index(
        "ix_usage_rollup_org_provider_minute", "usage_rollup", ["org_id", "provider", "minute"]
    )
    op.create_index("ix_usage_rollup_model_minute", "usage_rollup", ["model", "minute"])
    state = op.create_table(
        "usage_rollup_state",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("rolled_until", UtcDateTime(), nullable=True),
    )
    op.bulk_insert(state, [{"name": "usage", "rolled_until": None}])
    op.create_table(
        "event_dead_letter",
        sa.Column("id", AutoId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("occurred_at", UtcDateTime(), nullable=False),
        sa.Column("dead_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("event_id", name="uq_event_dead_letter_event_id"),
    )
    op.create_index("ix_event_dead_letter_time", "event_dead_letter", ["dead_at"])


def downgrade() -> None:
    op.drop_table("event_dead_letter")
    op.drop_table("usage_rollup_state")
    op.drop_table("usage_rollup")
    op.drop_index("ix_purchase_event_time", table_name="purchase_event")
    op.drop_index("ix_usage_event_time", table_name="usage_event")
