"""auth: API keys that are an agent session's credential (issue 13)

Revision ID: auth_0005
Revises: auth_0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "auth_0005"
down_revision: str | None = "auth_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_key") as batch:
        batch.add_column(sa.Column("session_id", sa.Uuid(), nullable=True))
        batch.create_index("ix_api_key_session_id", ["session_id"])


def downgrade() -> None:
    with op.batch_alter_table("api_key") as batch:
        batch.drop_index("ix_api_key_session_id")
        batch.drop_column("session_id")
