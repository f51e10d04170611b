"""analytics: the model of a usage event and its token kinds (prompt, completion), latency

`model` is a nullable, indexed column (events of /consume name no model). Events stored before
this revision kept a model, when they had one, in `details`; it is copied into the column.

Revision ID: analytics_0003
Revises: analytics_0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "analytics_0003"
down_revision: str | None = "analytics_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_event", sa.Column("model", sa.String(128), nullable=True))
    op.add_column("usage_event", sa.Column("prompt_tokens", sa.BigInteger(), nullable=True))
    op.add_column("usage_event", sa.Column("completion_tokens", sa.BigInteger(), nullable=True))
    op.add_column("usage_event", sa.Column("latency_ms", sa.BigInteger(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE usage_event SET model = left(details->>'model', 128) "
            "WHERE json_typeof(details->'model') = 'string'"
        )
    else:
        op.execute(
            "UPDATE usage_event SET model = substr(json_extract(details, '$.model'), 1, 128) "
            "WHERE json_type(details, '$.model') = 'text'"
        )
    op.create_index("ix_usage_event_model_time", "usage_event", ["model", "occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_event_model_time", table_name="usage_event")
    with op.batch_alter_table("usage_event") as batch:
        batch.drop_column("latency_ms")
        batch.drop_column("completion_tokens")
        batch.drop_column("prompt_tokens")
        batch.drop_column("model")
