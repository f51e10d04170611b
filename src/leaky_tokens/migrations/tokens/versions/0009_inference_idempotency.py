"""tokens: Idempotency-Key records and stored-response owners of /v1 inference (issue 12)

Revision ID: tokens_0009
Revises: tokens_0008
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from leaky_tokens.shared.database import UtcDateTime

revision: str = "tokens_0009"
down_revision: str | None = "tokens_0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "inference_idempotency",
        sa.Column("scope", sa.String(64), primary_key=True),
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", sa.Uuid(), nullable=False),
        sa.Column("lease_until", UtcDateTime(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("content_type", sa.String(128), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_inference_idempotency_expires_at", "inference_idempotency", ["expires_at"])
    op.create_table(
        "inference_response",
        sa.Column("response_id", sa.String(128), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_inference_response_expires_at", "inference_response", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_inference_response_expires_at", "inference_response")
    op.drop_table("inference_response")
    op.drop_index("ix_inference_idempotency_expires_at", "inference_idempotency")
    op.drop_table("inference_idempotency")
