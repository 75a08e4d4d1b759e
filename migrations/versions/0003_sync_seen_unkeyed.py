"""sync_seen without a primary key: rows are bulk-copied, duplicates are harmless.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sync_seen") as batch:
        batch.drop_constraint("pk_sync_seen", type_="primary")
    op.create_index("ix_sync_seen_run_id_external_id", "sync_seen", ["run_id", "external_id"])


def downgrade() -> None:
    op.drop_index("ix_sync_seen_run_id_external_id", table_name="sync_seen")
    # Rows only live while a pass runs, and the key would refuse an id listed twice.
    op.execute("DELETE FROM sync_seen")
    with op.batch_alter_table("sync_seen") as batch:
        batch.create_primary_key("pk_sync_seen", ["run_id", "external_id"])
