"""tokens: agent sessions and their events (issue 13)

Revision ID: tokens_0008
Revises: tokens_0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from leaky_tokens.shared.database import UtcDateTime

revision: str = "tokens_0008"
down_revision: str | None = "tokens_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AutoId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "agent_session",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("idempotency_key", sa.String(100), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("product_no", sa.String(64), nullable=False),
        sa.Column("product_type", sa.String(8), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("token_budget", sa.BigInteger(), nullable=False),
        sa.Column("funding_kind", sa.String(8), nullable=False),
        sa.Column("funding_owner_id", sa.Uuid(), nullable=False),
        sa.Column("funding_provider", sa.String(32), nullable=False),
        sa.Column("funded_allowance", sa.BigInteger(), nullable=False),
        sa.Column("funded_credit", sa.BigInteger(), nullable=False),
        sa.Column("funded_reset_at", UtcDateTime(), nullable=True),
        sa.Column("returned_credit", sa.BigInteger(), nullable=False),
        sa.Column("returned_allowance", sa.BigInteger(), nullable=False),
        sa.Column("returned_dropped", sa.BigInteger(), nullable=False),
        sa.Column("credential", sa.String(200), nullable=True),
        sa.Column("credential_key_id", sa.Uuid(), nullable=True),
        sa.Column("rotations", sa.Integer(), nullable=False),
        sa.Column("failure_code", sa.String(32), nullable=True),
        sa.Column("close_reason", sa.String(200), nullable=True),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("activated_at", UtcDateTime(), nullable=True),
        sa.Column("closed_at", UtcDateTime(), nullable=True),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_agent_session_user_key"),
    )
    op.create_index("ix_agent_session_user_created", "agent_session", ["user_id", "created_at"])
    op.create_index("ix_agent_session_status_expires", "agent_session", ["status", "expires_at"])
    op.create_table(
        "agent_session_event",
        sa.Column("id", AutoId, primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.Uuid(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("error_kind", sa.String(32), nullable=True),
        sa.Column("message", sa.String(500), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_agent_session_event_session", "agent_session_event", ["session_id", "id"])


def downgrade() -> None:
    op.drop_table("agent_session_event")
    op.drop_table("agent_session")
