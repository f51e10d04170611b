"""tokens: where each feature flag's value came from (settings seed it once; the admin API wins)

Rows written before this revision were written by both (every start re-applied the settings);
they count as set, so settings no longer override them.

Revision ID: tokens_0004
Revises: tokens_0003
Create Date: 2027-01-11
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "tokens_0004"
down_revision: str | None = "tokens_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "feature_flag",
        sa.Column("source", sa.String(16), nullable=False, server_default=sa.text("'admin'")),
    )


def downgrade() -> None:
    with op.batch_alter_table("feature_flag") as batch:
        batch.drop_column("source")
