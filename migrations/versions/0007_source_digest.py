"""sync_source_digests, and the triggers that delete a digest on any other write.

A full pass stores, per identity, the digest of the source rows it last applied
(db/digests.py); a later pass skips an identity whose digest still matches. That is only
sound if a stored digest means "the engine would write nothing for this identity", so every
write the engine's skip decision depends on deletes it here, in the database, whoever makes
it (engine, bulk load, jobs, an operator's SQL):

- an UPDATE or DELETE of the identity row (its content hash, version, deletion, owner: the
  whole of the engine's unchanged-upsert test), deleted users' identities included;
- an UPDATE or DELETE of a session, for every identity of the session's user (the engine's
  unchanged-login test reads the stored session).

New identities and sessions start without a digest, so INSERTs need no trigger: the bulk
load pays nothing. A table of its own rather than a column of user_identities: writers
build that table's rows from its column list, positionally (db/bulk.py).

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
CREATE FUNCTION {s}.sync_forget_identity_digest() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {s}.sync_source_digests
     WHERE provider = OLD.provider AND external_id = OLD.external_id;
    RETURN NULL;
END $$;

CREATE FUNCTION {s}.sync_forget_session_digests() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {s}.sync_source_digests d USING {s}.user_identities i
     WHERE i.user_id = OLD.user_id AND d.provider = i.provider
       AND d.external_id = i.external_id;
    IF TG_OP = 'UPDATE' AND NEW.user_id IS DISTINCT FROM OLD.user_id THEN
        DELETE FROM {s}.sync_source_digests d USING {s}.user_identities i
         WHERE i.user_id = NEW.user_id AND d.provider = i.provider
           AND d.external_id = i.external_id;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER user_identities_forget_digest AFTER UPDATE OR DELETE ON {s}.user_identities
    FOR EACH ROW EXECUTE FUNCTION {s}.sync_forget_identity_digest();

CREATE TRIGGER user_sessions_forget_digests AFTER UPDATE OR DELETE ON {s}.user_sessions
    FOR EACH ROW EXECUTE FUNCTION {s}.sync_forget_session_digests();
"""

_PG_DROP = """
DROP TRIGGER IF EXISTS user_sessions_forget_digests ON {s}.user_sessions;
DROP TRIGGER IF EXISTS user_identities_forget_digest ON {s}.user_identities;
DROP FUNCTION IF EXISTS {s}.sync_forget_session_digests();
DROP FUNCTION IF EXISTS {s}.sync_forget_identity_digest();
"""

_SQLITE_FORGET_USER = """
    DELETE FROM sync_source_digests WHERE (provider, external_id) IN
        (SELECT provider, external_id FROM user_identities WHERE user_id = {who});
"""
_SQLITE_TRIGGERS = {
    "user_identities_forget_digest_update": """
CREATE TRIGGER user_identities_forget_digest_update AFTER UPDATE ON user_identities
BEGIN
    DELETE FROM sync_source_digests
     WHERE provider = OLD.provider AND external_id = OLD.external_id;
END""",
    "user_identities_forget_digest_delete": """
CREATE TRIGGER user_identities_forget_digest_delete AFTER DELETE ON user_identities
BEGIN
    DELETE FROM sync_source_digests
     WHERE provider = OLD.provider AND external_id = OLD.external_id;
END""",
    "user_sessions_forget_digests_update": f"""
CREATE TRIGGER user_sessions_forget_digests_update AFTER UPDATE ON user_sessions
BEGIN{_SQLITE_FORGET_USER.format(who="OLD.user_id")}{_SQLITE_FORGET_USER.format(who="NEW.user_id")}END""",
    "user_sessions_forget_digests_delete": f"""
CREATE TRIGGER user_sessions_forget_digests_delete AFTER DELETE ON user_sessions
BEGIN{_SQLITE_FORGET_USER.format(who="OLD.user_id")}END""",
}


def _schema() -> str:
    bind = op.get_bind()
    name = bind.execute(sa.text("SELECT current_schema()")).scalar_one()
    return str(bind.dialect.identifier_preparer.quote(str(name)))


def upgrade() -> None:
    op.create_table(
        "sync_source_digests",
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("external_id", sa.String(255), nullable=False),
        sa.Column("digest", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("provider", "external_id", name=op.f("pk_sync_source_digests")),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Schema-qualified: a trigger runs under whatever search_path its writer has.
        op.execute(_PG_FUNCTIONS.format(s=_schema()))
    else:
        for statement in _SQLITE_TRIGGERS.values():
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_DROP.format(s=_schema()))
    else:
        for name in _SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("sync_source_digests")
