"""user_identities.source_digest, and the triggers that clear it on any other write.

A full pass stores, per identity, the digest of the source rows it last applied
(db/digests.py); a later pass skips an identity whose digest still matches. That is only
sound if the stored digest means "the engine would write nothing for this identity", so
every write the engine's skip decision depends on clears it here, in the database, whoever
makes it (engine, jobs, an operator's SQL):

- an UPDATE of the identity row that does not itself set the digest (its content hash,
  version, deletion, owner: the whole of the engine's unchanged-upsert test);
- an UPDATE or DELETE of a session, for every identity of the session's user (the engine's
  unchanged-login test reads the stored session).

Deleting an identity (or its user, by cascade) takes the digest with it, and new rows start
without one, so INSERTs need no trigger: the bulk load pays nothing.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PG_FUNCTIONS = """
CREATE FUNCTION {s}.sync_clear_own_digest() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.source_digest := NULL;
    RETURN NEW;
END $$;

CREATE FUNCTION {s}.sync_clear_session_digests() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {s}.user_identities SET source_digest = NULL
     WHERE user_id = OLD.user_id AND source_digest IS NOT NULL;
    IF TG_OP = 'UPDATE' AND NEW.user_id IS DISTINCT FROM OLD.user_id THEN
        UPDATE {s}.user_identities SET source_digest = NULL
         WHERE user_id = NEW.user_id AND source_digest IS NOT NULL;
    END IF;
    RETURN NULL;
END $$;

-- WHEN: no function call at all for the rows that hold no digest (every identity but a
-- full pass's), nor for the statement that stores one.
CREATE TRIGGER user_identities_clear_digest BEFORE UPDATE ON {s}.user_identities
    FOR EACH ROW
    WHEN (OLD.source_digest IS NOT NULL
          AND NEW.source_digest IS NOT DISTINCT FROM OLD.source_digest)
    EXECUTE FUNCTION {s}.sync_clear_own_digest();

CREATE TRIGGER user_sessions_clear_digest AFTER UPDATE OR DELETE ON {s}.user_sessions
    FOR EACH ROW EXECUTE FUNCTION {s}.sync_clear_session_digests();
"""

_PG_DROP = """
DROP TRIGGER IF EXISTS user_sessions_clear_digest ON {s}.user_sessions;
DROP TRIGGER IF EXISTS user_identities_clear_digest ON {s}.user_identities;
DROP FUNCTION IF EXISTS {s}.sync_clear_session_digests();
DROP FUNCTION IF EXISTS {s}.sync_clear_own_digest();
"""

# SQLite has no BEFORE-trigger assignment to NEW: an AFTER trigger updates the row again
# (recursive_triggers is off, and the second update would not match the WHEN anyway).
_SQLITE_TRIGGERS = (
    """
CREATE TRIGGER user_identities_clear_digest AFTER UPDATE ON user_identities
WHEN OLD.source_digest IS NOT NULL AND NEW.source_digest IS OLD.source_digest
BEGIN
    UPDATE user_identities SET source_digest = NULL
     WHERE provider = NEW.provider AND external_id = NEW.external_id;
END
""",
    """
CREATE TRIGGER user_sessions_clear_digest_update AFTER UPDATE ON user_sessions
BEGIN
    UPDATE user_identities SET source_digest = NULL
     WHERE user_id IN (OLD.user_id, NEW.user_id) AND source_digest IS NOT NULL;
END
""",
    """
CREATE TRIGGER user_sessions_clear_digest_delete AFTER DELETE ON user_sessions
BEGIN
    UPDATE user_identities SET source_digest = NULL
     WHERE user_id = OLD.user_id AND source_digest IS NOT NULL;
END
""",
)
_SQLITE_NAMES = (
    "user_identities_clear_digest",
    "user_sessions_clear_digest_update",
    "user_sessions_clear_digest_delete",
)


def _schema() -> str:
    bind = op.get_bind()
    name = bind.execute(sa.text("SELECT current_schema()")).scalar_one()
    return str(bind.dialect.identifier_preparer.quote(str(name)))


def upgrade() -> None:
    op.add_column("user_identities", sa.Column("source_digest", sa.String(32)))
    if op.get_bind().dialect.name == "postgresql":
        # Schema-qualified: a trigger runs under whatever search_path its writer has.
        op.execute(_PG_FUNCTIONS.format(s=_schema()))
    else:
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_DROP.format(s=_schema()))
    else:
        for name in _SQLITE_NAMES:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    # Plain ALTER on SQLite too (3.35+): a batch copy would reflect, and lose, the
    # expression index on users' emails.
    op.execute("ALTER TABLE user_identities DROP COLUMN source_digest")
