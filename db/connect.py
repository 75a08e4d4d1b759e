"""Engine setup for the worker's database (PostgreSQL via psycopg 3, or SQLite).

``url_problem`` tells, before any connection, what a URL would fail on; configuration uses
it so a bad URL is one line naming its key rather than a driver traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from db import jsoncodec

# libpq options whose values psycopg or libpq check before reaching the server (libpq docs,
# "Parameter Key Words"). Only long-stable value sets are listed: rejecting a value a newer
# libpq accepts would be worse than the one-line exit 1 libpq gives for it.
_INTEGER_OPTIONS = (
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout"
)  # fmt: skip
_OPTION_VALUES: Mapping[str, frozenset[str]] = {
    "sslmode": frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}),
    "gssencmode": frozenset({"disable", "prefer", "require"}),
    "channel_binding": frozenset({"disable", "prefer", "require"}),
    "target_session_attrs": frozenset(
        {"any", "read-write", "read-only", "primary", "standby", "prefer-standby"}
    ),
    "load_balance_hosts": frozenset({"disable", "random"}),
}


def make_engine(
    url: str,
    *,
    schema: str,
    pool_size: int = 5,
    echo: bool = False,
    prepared_statements: bool = True,
) -> Engine:
    """Create the engine; on PostgreSQL every connection works inside ``schema``.

    ``prepared_statements=False`` (PostgreSQL): no statement is ever prepared on the server,
    for poolers in transaction mode that cannot keep them (PgBouncer before 1.21, or without
    ``max_prepared_statements``); ``prepares`` tells the store's writers.
    """
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
    if not prepared_statements:
        _never_prepare(engine)
    return engine


def prepares(conn: Connection) -> bool:
    """Whether statements may be prepared on this connection's server session."""
    return bool(conn.connection.info.get(_PREPARES, True))


_PREPARES = "sync_worker.prepares"


def _never_prepare(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _no_prepares(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.prepare_threshold = None  # psycopg's automatic preparing, off
        record.info[_PREPARES] = False


def url_problem(url: str, *, ignore_params: Collection[str] = ()) -> str | None:
    """What connecting with ``url`` would fail on before reaching the server, else None.

    The URL is parsed as the engine parses it and turned into driver parameters as the
    dialect does; on PostgreSQL those are then checked as psycopg and libpq would check
    them. ``ignore_params`` are query parameters the caller strips before connecting. The
    answer never quotes any part of the URL: it may hold a password, anywhere.
    """
    try:
        parsed = make_url(url)
    except ValueError:  # SQLAlchemy's int() of the port; its message quotes the URL
        return "the host or port is malformed (a port is a number; an IPv6 host goes in [...])"
    except ArgumentError:
        return "not a URL SQLAlchemy can read"
    checked = parsed.difference_update_query(ignore_params)
    try:
        _args, params = checked.get_dialect()().create_connect_args(checked)
    except (ArgumentError, ValueError, TypeError):
        return "a query parameter or the host list is malformed"
    if checked.get_backend_name() != "postgresql":
        return None
    return _libpq_problem(checked, params)


def _libpq_problem(url: URL, params: Mapping[str, Any]) -> str | None:
    unknown = set(params) - _libpq_options()
    if unknown:
        return "the query string has a parameter libpq does not know"
    hosts = str(params.get("host") or "").split(",")
    if any("@" in host for host in hosts) or (url.username is None and "@" in (url.database or "")):
        # user:p@ss@host, or user:pass@ after one slash too many: the password would land in
        # the host or the database name, which connection errors print.
        return "an '@' outside user:password@ (write an '@' in a password as %40)"
    ports = str(params.get("port") or "").split(",")
    if (url.port is not None and not 1 <= url.port <= 65535) or not all(map(_is_port, ports)):
        return "the port is not a number from 1 to 65535"
    return _option_problem(params)


def _option_problem(params: Mapping[str, Any]) -> str | None:
    timeout = params.get("connect_timeout")
    if timeout not in (None, "") and not _is_number(str(timeout)):
        return "connect_timeout is not a number of seconds"
    for name in _INTEGER_OPTIONS:
        if params.get(name) not in (None, "") and not str(params[name]).lstrip("-").isdigit():
            return f"{name} is not a whole number"
    for name, allowed in _OPTION_VALUES.items():
        if params.get(name) not in (None, "") and params[name] not in allowed:
            return f"{name} is not one of {', '.join(sorted(allowed))}"
    return None


@functools.cache
def _libpq_options() -> frozenset[str]:
    from psycopg import pq

    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


def _is_port(text: str) -> bool:
    return text == "" or (text.isdigit() and 1 <= int(text) <= 65535)  # "": the default


def _is_number(text: str) -> bool:
    try:
        int(float(text))  # how psycopg reads connect_timeout
    except (ValueError, OverflowError):
        return False
    return True


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
