"""Initial schema: users, profiles, identities, sessions, audit, inbox, cursors, runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.types import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = UTCDateTime()


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(320)),
        sa.Column("email_verified", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("name", sa.String(2048)),
        sa.Column("given_name", sa.String(2048)),
        sa.Column("family_name", sa.String(2048)),
        sa.Column("phone", sa.String(64)),
        sa.Column("avatar_url", sa.Text()),
        sa.Column("role", sa.String(64), server_default=sa.text("'member'"), nullable=False),
        sa.Column("tenant_id", sa.String(255)),
        sa.Column("blocked", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("last_login_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("deleted_at", TS),
        sa.CheckConstraint(
            "email IS NULL OR email LIKE '%_@_%'", name=op.f("ck_users_email_shape")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
    )
    op.create_index("ix_users_lower_email", "users", [sa.text("lower(email)")])
    op.create_index("ix_users_tenant_id", "users", ["tenant_id"])

    op.create_table(
        "profiles",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("display_name", sa.String(2048)),
        sa.Column("avatar_url", sa.Text()),
        sa.Column("timezone", sa.String(64), server_default=sa.text("'UTC'"), nullable=False),
        sa.Column("currency", sa.String(3), server_default=sa.text("'USD'"), nullable=False),
        sa.Column("locale", sa.String(35), server_default=sa.text("'en'"), nullable=False),
        sa.Column("settings", JSON, server_default=sa.text("'{}'"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_profiles_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profiles")),
        sa.UniqueConstraint("user_id", name=op.f("uq_profiles_user_id")),
    )

    op.create_table(
        "user_identities",
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("external_id", sa.String(255), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(320)),
        sa.Column("upstream_updated_at", TS),
        sa.Column("content_hash", sa.String(64)),
        sa.Column("raw", JSON),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("last_synced_at", TS, nullable=False),
        sa.Column("deleted_at", TS),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_identities_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("provider", "external_id", name=op.f("pk_user_identities")),
    )
    op.create_index("ix_user_identities_user_id", "user_identities", ["user_id"])

    op.create_table(
        "user_sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("external_session_id", sa.String(255), nullable=False),
        sa.Column("ip", sa.String(64)),
        sa.Column("user_agent", sa.Text()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_seen_at", TS),
        sa.Column("expires_at", TS),
        sa.Column("revoked_at", TS),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_sessions_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_sessions")),
        sa.UniqueConstraint(
            "provider",
            "external_session_id",
            name=op.f("uq_user_sessions_provider_external_session_id"),
        ),
    )
    op.create_index("ix_user_sessions_user_id", "user_sessions", ["user_id"])
    op.create_index("ix_user_sessions_expires_at", "user_sessions", ["expires_at"])

    op.create_table(
        "sync_audit",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("run_id", sa.Uuid()),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("external_id", sa.String(255)),
        sa.Column("user_id", sa.Uuid()),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("changes", JSON),
        sa.Column("event_id", sa.String(255)),
        sa.Column("error", sa.Text()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_audit")),
    )
    op.create_index("ix_sync_audit_user_id_occurred_at", "sync_audit", ["user_id", "occurred_at"])
    op.create_index("ix_sync_audit_provider_external_id", "sync_audit", ["provider", "external_id"])
    op.create_index("ix_sync_audit_run_id", "sync_audit", ["run_id"])

    op.create_table(
        "sync_inbox",
        sa.Column("id", BIGID, autoincrement=True, nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("status", sa.String(16), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", TS),
        sa.Column("last_error", sa.Text()),
        sa.Column("processed_at", TS),
        sa.CheckConstraint(
            "status IN ('pending', 'done', 'failed', 'dead')", name=op.f("ck_sync_inbox_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_inbox")),
        sa.UniqueConstraint("provider", "event_id", name=op.f("uq_sync_inbox_provider_event_id")),
    )
    op.create_index(
        "ix_sync_inbox_status_next_attempt_at", "sync_inbox", ["status", "next_attempt_at"]
    )

    op.create_table(
        "sync_cursors",
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("cursor", JSON, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("provider", name=op.f("pk_sync_cursors")),
    )

    op.create_table(
        "sync_runs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("provider", sa.String(64)),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("counts", JSON, server_default=sa.text("'{}'"), nullable=False),
        sa.Column("error", sa.Text()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_runs")),
    )
    op.create_index("ix_sync_runs_started_at", "sync_runs", ["started_at"])


def downgrade() -> None:
    for table in (
        "sync_runs", "sync_cursors", "sync_inbox", "sync_audit",
        "user_sessions", "user_identities", "profiles", "users",
    ):  # fmt: skip
        op.drop_table(table)
