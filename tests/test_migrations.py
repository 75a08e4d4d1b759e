"""The migrated schema equals the table definitions in db/, on both dialects."""

from __future__ import annotations

import warnings

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from db.migrate import current_revision, head_revision, upgrade
from db.tables import metadata
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
