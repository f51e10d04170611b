"""auth: the API-key revocation feed other services follow

Revision ID: auth_0002
Revises: auth_0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from leaky_tokens.shared.database import UtcDateTime

revision: str = "auth_0002"
down_revision: str | None = "auth_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AutoId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_key_revocation",
        sa.Column("seq", AutoId, primary_key=True, autoincrement=True),
        sa.Column("api_key_id", sa.Uuid(), nullable=False),
        sa.Column("revoked_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("api_key_revocation")
