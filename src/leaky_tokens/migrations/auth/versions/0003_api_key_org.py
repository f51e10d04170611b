"""auth: an API key may be created for an organisation (its calls charge the org's pool)

Revision ID: auth_0003
Revises: auth_0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "auth_0003"
down_revision: str | None = "auth_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no foreign key (SQLite cannot add one in place): membership is checked when the
    # key is created and again on every validation, so a deleted org's key charges nobody.
    op.add_column("api_key", sa.Column("org_id", sa.Uuid(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_key") as batch:
        batch.drop_column("org_id")
