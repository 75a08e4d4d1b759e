"""The migrated schema equals the table definitions in db/, on both dialects."""

from __future__ import annotations

import uuid
import warnings

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, String, Uuid, column, func, inspect, select, table

from db.migrate import alembic_config, current_revision, head_revision, upgrade
from db.tables import metadata, sync_seen
from tests.conftest import SCHEMA


def schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as conn, warnings.catch_warnings():
        # SQLite cannot reflect expression indexes; that one is checked by name below.
        warnings.filterwarnings("ignore", message=".*expression-based index.*")
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def index_names(engine: Engine, table: str) -> set[str]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*expression-based index.*")
        return {str(ix["name"]) for ix in inspect(engine).get_indexes(table)}


def test_migrated_schema_equals_table_definitions(engine: Engine) -> None:
    assert schema_diff(engine) == []
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            names = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='index'")
            assert "ix_users_lower_email" in {row[0] for row in names}
    else:
        assert "ix_users_lower_email" in index_names(engine, "users")


def test_migrate_is_idempotent(engine: Engine) -> None:
    assert current_revision(engine) == head_revision()
    before, after = upgrade(engine, SCHEMA)
    assert before == after == head_revision()
    assert schema_diff(engine) == []


def test_postgres_tables_live_in_their_own_schema(pg_engine: Engine) -> None:
    tables = set(inspect(pg_engine).get_table_names(schema=SCHEMA))
    assert {t.name for t in metadata.sorted_tables} <= tables
    assert "users" not in inspect(pg_engine).get_table_names(schema="public")


def test_sync_seen_round_trips_through_its_earlier_shapes(engine: Engine) -> None:
    """0004 (a row per page) and 0003 (no key) downgrade with rows in the table: 0003's
    downgrade must cope with an id listed twice, and the way back up starts empty."""
    run = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(sync_seen.insert(), [{"run_id": run, "external_ids": ["u1", "u2"]}])
    per_id = table("sync_seen", column("run_id", Uuid()), column("external_id", String()))
    config = alembic_config()
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0003")
            conn.execute(per_id.insert(), [{"run_id": run, "external_id": "u1"}] * 2)
            command.downgrade(config, "0002")
        assert current_revision(engine) == "0002"
    finally:
        upgrade(engine, SCHEMA)
    assert schema_diff(engine) == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(sync_seen)).scalar_one() == 0


def test_the_head_read_from_the_files_is_alembics() -> None:
    from alembic.script import ScriptDirectory

    assert head_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()
