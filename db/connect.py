"""Engine setup for the worker's database (PostgreSQL via psycopg 3, or SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url

from db import jsoncodec


def make_engine(url: str, *, schema: str, pool_size: int = 5, echo: bool = False) -> Engine:
    """Create the engine; on PostgreSQL every connection works inside ``schema``."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, echo=echo)
    engine = create_engine(
        parsed,
        pool_size=pool_size,
        pool_pre_ping=True,
        echo=echo,
        json_serializer=jsoncodec.dumps_bytes,
        json_deserializer=jsoncodec.loads,
    )
    _use_schema(engine, schema)
    return engine


def ensure_schema(engine: Engine, schema: str) -> None:
    """Create the PostgreSQL schema if needed (no-op on SQLite)."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))


def _use_schema(engine: Engine, schema: str) -> None:
    @event.listens_for(engine, "connect")
    def _set_search_path(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute(f'SET search_path TO "{schema}"')
        dbapi_conn.commit()


def _sqlite_engine(url: URL, *, echo: bool) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"timeout": 30},
        json_serializer=jsoncodec.dumps_text,
        json_deserializer=jsoncodec.loads,
    )

    # pysqlite's own transaction handling breaks SAVEPOINT; take it over (SQLAlchemy recipe).
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        # A bulk load's indexes outgrow the default 2 MB page cache, and the default WAL
        # checkpoint (every 1,000 pages) ran several times per batch: both measured. The
        # cache is per pooled connection: at 64 MiB it added ~58 MiB to the peak RSS of a
        # 100,000-user backfill (bench/pull.py memory part), so 16 MiB is the compromise.
        cur.execute("PRAGMA cache_size = -16384")  # KiB: 16 MiB
        cur.execute("PRAGMA wal_autocheckpoint = 10000")  # pages: ~40 MB of WAL
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
