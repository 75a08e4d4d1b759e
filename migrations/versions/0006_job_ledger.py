"""sync_job_ticks: the scheduler's run ledger, one row per tick of a job and provider.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out (not imported from db.tables) so this revision keeps meaning what it meant.
STATUS = "status IN ('running', 'succeeded', 'failed', 'skipped')"


def upgrade() -> None:
    op.create_table(
        "sync_job_ticks",
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("scheduled_at", UTCDateTime(), nullable=False),
        sa.Column("instance", sa.String(128), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("run_id", sa.Uuid()),
        sa.Column("error", sa.Text()),
        sa.PrimaryKeyConstraint("job", "provider", "scheduled_at", name=op.f("pk_sync_job_ticks")),
        sa.CheckConstraint(STATUS, name=op.f("ck_sync_job_ticks_status")),
    )
    op.create_index(op.f("ix_sync_job_ticks_scheduled_at"), "sync_job_ticks", ["scheduled_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_sync_job_ticks_scheduled_at"), table_name="sync_job_ticks")
    op.drop_table("sync_job_ticks")
