"""sync_seen: upstream ids seen by a full pass, for reconcile.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sync_seen",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("external_id", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "external_id", name=op.f("pk_sync_seen")),
    )


def downgrade() -> None:
    op.drop_table("sync_seen")
