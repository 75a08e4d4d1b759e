"""The worker's tables, as SQLAlchemy Core. Names and columns: docs/architecture.md.

Tables are defined without a schema; on PostgreSQL every connection's ``search_path`` is the
configured schema (``identity`` by default), so they never collide with an app's own
``users`` or Auth.js's ``sessions`` in the same database.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    ColumnElement,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    literal_column,
    text,
)

from db.types import BigIntPK, JSONType, UTCDateTime

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

EMAIL_MAX = 320
TEXT_MAX = 2048

users = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("email", String(EMAIL_MAX)),
    Column("email_verified", Boolean, nullable=False, server_default=text("false")),
    Column("name", String(TEXT_MAX)),
    Column("given_name", String(TEXT_MAX)),
    Column("family_name", String(TEXT_MAX)),
    Column("phone", String(64)),
    Column("avatar_url", Text),
    Column("role", String(64), nullable=False, server_default=text("'member'")),
    Column("tenant_id", String(255)),
    Column("blocked", Boolean, nullable=False, server_default=text("false")),
    Column("last_login_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime),
    CheckConstraint("email IS NULL OR email LIKE '%_@_%'", name="email_shape"),
)
Index("ix_users_lower_email", func.lower(users.c.email))
Index("ix_users_tenant_id", users.c.tenant_id)

profiles = Table(
    "profiles",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("display_name", String(TEXT_MAX)),
    Column("avatar_url", Text),
    Column("timezone", String(64), nullable=False, server_default=text("'UTC'")),
    Column("currency", String(3), nullable=False, server_default=text("'USD'")),
    Column("locale", String(35), nullable=False, server_default=text("'en'")),
    Column("settings", JSONType, nullable=False, server_default=text("'{}'")),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("user_id"),
)

user_identities = Table(
    "user_identities",
    metadata,
    Column("provider", String(64), primary_key=True),
    Column("external_id", String(255), primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("email", String(EMAIL_MAX)),
    Column("upstream_updated_at", UTCDateTime),
    Column("content_hash", String(64)),
    Column("raw", JSONType),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("last_synced_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime),
)
Index("ix_user_identities_user_id", user_identities.c.user_id)

user_sessions = Table(
    "user_sessions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("external_session_id", String(255), nullable=False),
    Column("ip", String(64)),
    Column("user_agent", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime),
    Column("expires_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
    UniqueConstraint("provider", "external_session_id"),
)
Index("ix_user_sessions_user_id", user_sessions.c.user_id)
Index("ix_user_sessions_expires_at", user_sessions.c.expires_at)

sync_audit = Table(
    "sync_audit",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("run_id", Uuid),
    Column("source", String(16), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("external_id", String(255)),
    Column("user_id", Uuid),
    Column("action", String(32), nullable=False),
    Column("changes", JSONType),
    Column("event_id", String(255)),
    Column("error", Text),
)
Index("ix_sync_audit_user_id_occurred_at", sync_audit.c.user_id, sync_audit.c.occurred_at)
Index("ix_sync_audit_provider_external_id", sync_audit.c.provider, sync_audit.c.external_id)
Index("ix_sync_audit_run_id", sync_audit.c.run_id)

INBOX_STATUSES = ("pending", "done", "failed", "dead", "ignored")
INBOX_CLAIMABLE = ("pending", "failed")  # rows a drainer may still claim
INBOX_FINISHED = ("done", "ignored")  # rows retention deletes once old enough

sync_inbox = Table(
    "sync_inbox",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("provider", String(64), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("event_type", String(128)),
    Column("received_at", UTCDateTime, nullable=False),
    Column("payload", JSONType, nullable=False),
    Column("status", String(16), nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", UTCDateTime),
    Column("last_error", Text),
    Column("processed_at", UTCDateTime),
    Column("claimed_by", String(128)),
    Column("claimed_until", UTCDateTime),
    UniqueConstraint("provider", "event_id"),
    CheckConstraint("status IN ('pending', 'done', 'failed', 'dead', 'ignored')", name="status"),
)


def inbox_status_in(statuses: tuple[str, ...]) -> ColumnElement[bool]:
    """``status IN ('a', 'b')`` with the values written into the SQL text, never bound.

    A partial index is only used when the planner can prove the query's WHERE implies the
    index's: SQLite never proves it against parameters, nor PostgreSQL for a generic plan
    (psycopg prepares a statement after five runs). The indexes below and the queries in
    db/inbox.py share this expression, so their texts match.
    """
    return sync_inbox.c.status.in_([literal_column(f"'{s}'") for s in statuses])


# Only claimable rows: the claim walks this in id order and stops at its limit, however many
# done rows retention keeps (days of them). Keyed on id alone so a claim or a release, which
# change neither id nor status, stay HOT updates on PostgreSQL.
_claimable = inbox_status_in(INBOX_CLAIMABLE)
Index(
    "ix_sync_inbox_claimable",
    sync_inbox.c.id,
    postgresql_where=_claimable,
    sqlite_where=_claimable,
)
# Only finished rows, by processed_at: retention reads its oldest batch off the front.
_finished = inbox_status_in(INBOX_FINISHED)
Index(
    "ix_sync_inbox_finished_processed_at",
    sync_inbox.c.processed_at,
    postgresql_where=_finished,
    sqlite_where=_finished,
)

sync_cursors = Table(
    "sync_cursors",
    metadata,
    Column("provider", String(64), primary_key=True),
    Column("cursor", JSONType, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("provider", String(64)),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("status", String(16), nullable=False),
    Column("counts", JSONType, nullable=False, server_default=text("'{}'")),
    Column("error", Text),
)
Index("ix_sync_runs_started_at", sync_runs.c.started_at)

# Upstream ids seen by a full pass still in progress, so reconcile can find users missing
# upstream without holding every id in memory: one row per applied page, its ids as a JSON
# array that reconcile unnests in the database. A row per id cost ~14 us to copy and index
# each (0.7 s of a 50,000-user pull, inside the batches' transactions); a page's row costs
# one insert.
sync_seen = Table(
    "sync_seen",
    metadata,
    Column("run_id", Uuid, nullable=False),
    Column("external_ids", JSONType, nullable=False),
)
Index("ix_sync_seen_run_id", sync_seen.c.run_id)

# The source digest of the full pass that last applied each identity (db/digests.py). Its
# own table, not a column of user_identities, whose column list other writers follow; rows
# are deleted by triggers (migration 0007) on any other write to the identity or to its
# user's sessions, and with the identity.
sync_source_digests = Table(
    "sync_source_digests",
    metadata,
    Column("provider", String(64), primary_key=True),
    Column("external_id", String(255), primary_key=True),
    Column("digest", String(32), nullable=False),
)

JOB_TICK_STATUSES = ("running", "succeeded", "failed", "skipped")
NO_PROVIDER = ""  # the ledger's provider for a job that is not per provider (a key: not NULL)

# The scheduler's run ledger: one row per tick of a job (per provider). Every instance tries
# to insert the tick's row and the primary key lets exactly one win, so with several
# instances on one database each tick runs once. Rows older than a few weeks are purged.
sync_job_ticks = Table(
    "sync_job_ticks",
    metadata,
    Column("job", String(64), primary_key=True),
    Column("provider", String(64), primary_key=True),
    Column("scheduled_at", UTCDateTime, primary_key=True),
    Column("instance", String(128), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("status", String(16), nullable=False),
    Column("run_id", Uuid),
    Column("error", Text),
    CheckConstraint("status IN ('running', 'succeeded', 'failed', 'skipped')", name="status"),
)
Index("ix_sync_job_ticks_scheduled_at", sync_job_ticks.c.scheduled_at)
