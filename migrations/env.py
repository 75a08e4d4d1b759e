"""Alembic environment. `sync-worker migrate` passes an open connection; plain `alembic`
commands build one from the worker's config (config.yaml / $DATABASE_URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from db.tables import metadata


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    from db.connect import ensure_schema, make_engine
    from sync_worker.config import config_path, load_settings

    settings = load_settings(config_path(None))
    db = settings.database
    engine = make_engine(db.url, schema=db.schema_, pool_size=db.pool_size, echo=db.echo)
    ensure_schema(engine, settings.database.schema_)
    with engine.connect() as conn:
        run_with(conn)
        conn.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `sync-worker migrate`")
run_online()
