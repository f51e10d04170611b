"""auth: the revocation feed carries principal changes; addresses that logged in before

The feed (`api_key_revocation`, name kept) gains a `kind` (api_key, user, membership, role, org)
and the user / organisation a change is about, so other services refuse a session issued before
its user's membership or roles changed. `login_address` remembers where each account logged in
successfully, so its owner escapes the back-off an attacker elsewhere causes.

Revision ID: auth_0004
Revises: auth_0005 (re-chained after auth_0003/auth_0005 landed on main)
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from leaky_tokens.shared.database import UtcDateTime

revision: str = "auth_0004"
down_revision: str | None = "auth_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_key_revocation") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="api_key"))
        batch.add_column(sa.Column("user_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("org_id", sa.Uuid(), nullable=True))
        batch.alter_column("api_key_id", existing_type=sa.Uuid(), nullable=True)
    op.create_index("ix_api_key_revocation_kind_at", "api_key_revocation", ["kind", "revoked_at"])
    op.create_table(
        "login_address",
        sa.Column(
            "user_id",
            sa.Uuid(),
            sa.ForeignKey("user_account.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("address", sa.String(64), primary_key=True),
        sa.Column("last_success_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("login_address")
    op.drop_index("ix_api_key_revocation_kind_at", table_name="api_key_revocation")
    op.execute("DELETE FROM api_key_revocation WHERE kind != 'api_key'")
    with op.batch_alter_table("api_key_revocation") as batch:
        batch.alter_column("api_key_id", existing_type=sa.Uuid(), nullable=False)
        batch.drop_column("org_id")
        batch.drop_column("user_id")
        batch.drop_column("kind")
