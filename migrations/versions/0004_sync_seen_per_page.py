"""sync_seen holds one row per page (its ids as a JSON array) instead of one per id.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rows only live while a full pass runs; a pass cut off by the upgrade is not reconciled
# (its resumed run is a partial pass), so both directions start the table empty.


def upgrade() -> None:
    op.drop_index("ix_sync_seen_run_id_external_id", table_name="sync_seen")
    op.drop_table("sync_seen")
    op.create_table(
        "sync_seen",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column(
            "external_ids",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
    )
    op.create_index("ix_sync_seen_run_id", "sync_seen", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_sync_seen_run_id", table_name="sync_seen")
    op.drop_table("sync_seen")
    op.create_table(
        "sync_seen",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("external_id", sa.String(255), nullable=False),
    )
    op.create_index("ix_sync_seen_run_id_external_id", "sync_seen", ["run_id", "external_id"])
