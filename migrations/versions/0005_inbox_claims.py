"""sync_inbox: claim lease, event type, 'ignored' status; partial indexes for claim and retention.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out (not imported from db.tables) so this revision keeps meaning what it meant.
CLAIMABLE = sa.text("status IN ('pending', 'failed')")
FINISHED = sa.text("status IN ('done', 'ignored')")
STATUS_NEW = "status IN ('pending', 'done', 'failed', 'dead', 'ignored')"
STATUS_OLD = "status IN ('pending', 'done', 'failed', 'dead')"


def upgrade() -> None:
    op.drop_index("ix_sync_inbox_status_next_attempt_at", table_name="sync_inbox")
    # Batch mode: SQLite changes a CHECK constraint by copying the table.
    with op.batch_alter_table("sync_inbox") as batch:
        batch.add_column(sa.Column("event_type", sa.String(128)))
        batch.add_column(sa.Column("claimed_by", sa.String(128)))
        batch.add_column(sa.Column("claimed_until", UTCDateTime()))
        batch.drop_constraint(op.f("ck_sync_inbox_status"), type_="check")
        batch.create_check_constraint(op.f("ck_sync_inbox_status"), sa.text(STATUS_NEW))
    op.create_index(
        "ix_sync_inbox_claimable",
        "sync_inbox",
        ["id"],
        postgresql_where=CLAIMABLE,
        sqlite_where=CLAIMABLE,
    )
    op.create_index(
        "ix_sync_inbox_finished_processed_at",
        "sync_inbox",
        ["processed_at"],
        postgresql_where=FINISHED,
        sqlite_where=FINISHED,
    )


def downgrade() -> None:
    op.drop_index("ix_sync_inbox_finished_processed_at", table_name="sync_inbox")
    op.drop_index("ix_sync_inbox_claimable", table_name="sync_inbox")
    # The old constraint has no 'ignored': such a row was processed with nothing to apply,
    # which the old schema calls done (retention still finds it by processed_at).
    op.execute("UPDATE sync_inbox SET status = 'done' WHERE status = 'ignored'")
    with op.batch_alter_table("sync_inbox") as batch:
        batch.drop_constraint(op.f("ck_sync_inbox_status"), type_="check")
        batch.create_check_constraint(op.f("ck_sync_inbox_status"), sa.text(STATUS_OLD))
        batch.drop_column("claimed_until")
        batch.drop_column("claimed_by")
        batch.drop_column("event_type")
    op.create_index(
        "ix_sync_inbox_status_next_attempt_at", "sync_inbox", ["status", "next_attempt_at"]
    )
