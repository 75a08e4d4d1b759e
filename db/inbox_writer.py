"""The webhook inbox's INSERT on the event loop: PostgreSQL through a psycopg AsyncConnection.

The daemon's receiver stores each group of waiting requests with one statement
(``group_store``). On PostgreSQL it runs here, on the receiver's own event loop: no writer
thread, so no GIL handoff and no wake-up of the loop from another thread per group, and no
SQLAlchemy per-row work. The statement is compiled once by SQLAlchemy Core: an
``INSERT ... SELECT`` over ``jsonb_array_elements`` of one JSON document holding every row
of the group (one parameter), ``ON CONFLICT DO NOTHING`` for redeliveries, ``RETURNING``
what was new. Measured in-process on groups of 16 Stack deliveries: 30-40 us of CPU per
row, against 83-125 us through the engine's ``inbox.store_arrivals``.

The connection is in autocommit mode: the one statement is its own transaction, so the
answer from the server means the group is committed (durable: ``synchronous_commit`` as the
database sets it, as for every other write of the worker). It works inside the search path
of ``engine``'s connections (the worker's schema), read once per connection. A broken
connection is dropped and a new one opened: at once, for the group at hand, when the broken
one was kept from before (a restarted server), else for the next group. psycopg's errors
come out as the store's own (StoreUnavailable, RecordRefused, StoreError), as
``db/errors.py`` does for SQLAlchemy's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import psycopg
from sqlalchemy import (
    ColumnElement,
    Engine,
    bindparam,
    cast,
    column,
    false,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP
from sqlalchemy.engine import Dialect
from sqlalchemy.types import String

from db import jsoncodec
from db.connect import prepares
from db.errors import translating
from db.inbox import Arrival, StoreResult, planned_rows, results_of
from db.tables import sync_inbox
from db.types import UTCDateTime
from sync_worker.errors import RecordRefused, StoreError, StoreUnavailable

_t = sync_inbox
#: The columns each row gives, in the order of its JSON array.
_COLUMNS = (
    "provider", "event_id", "event_type", "status", "payload", "received_at", "processed_at"
)  # fmt: skip
_TIMES = frozenset({"received_at", "processed_at"})
_DIALECT: Dialect = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]


@cache
def _statement() -> str:
    """The group INSERT's text for psycopg: every row in one parameter, ``%(rows)s``.

    The rows are one JSON document, an array of rows each an array in ``_COLUMNS`` order
    (the pattern of db/upsert.py): orjson writes it in C, where psycopg's adaptation of a
    text array escaped every quote of every payload in Python (measured: the writer's
    largest cost). Each value is cast to its column's type without its length, so a value
    too wide is refused by the column; the payload is taken as the JSON it is.
    """
    element = (
        func.jsonb_array_elements(cast(bindparam("rows", type_=String()), JSONB()))
        .table_valued(column("r", JSONB()), with_ordinality="ordinal")
        .render_derived(name="arrived")
    )
    values: list[ColumnElement[Any]] = []
    for index, name in enumerate(_COLUMNS):
        position: ColumnElement[int] = literal_column(str(index))
        if name == "payload":
            values.append(element.c.r.op("->", return_type=JSONB())(position))
            continue
        sql_type = TIMESTAMP(timezone=True) if name in _TIMES else String()
        values.append(cast(element.c.r.op("->>", return_type=String())(position), sql_type))
    statement = (
        postgresql.insert(_t)
        .from_select(list(_COLUMNS), select(*values).order_by(element.c.ordinal))
        .on_conflict_do_nothing(index_elements=[_t.c.provider, _t.c.event_id])
        .returning(_t.c.provider, _t.c.event_id)
    )
    return str(statement.compile(dialect=_DIALECT))


def _document(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as the statement takes them (``_COLUMNS``' order), as the engine's JSONB
    columns encode (db/jsoncodec.py); times normalized to UTC as their column type does."""
    to_utc = UTCDateTime().process_bind_param
    return jsoncodec.dumps_text(
        [[to_utc(row[n], _DIALECT) if n in _TIMES else row[n] for n in _COLUMNS] for row in rows]
    )


class InboxWriter:
    """Stores groups of arrivals on the running event loop (PostgreSQL only).

    Serial: the caller runs one ``store`` at a time (the group store's flusher). One
    connection, opened on first use and by ``store`` again after it broke; ``close`` it
    from the loop that used it.
    """

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("inbox writer: PostgreSQL only")
        self.engine = engine
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def store(self, arrivals: Sequence[Arrival]) -> list[StoreResult]:
        """Store the arrivals' deliveries in one committed statement; one result each.

        Arrivals are checked (``inbox.check``) by the caller, as for ``store_arrivals``.
        """
        rows, first = planned_rows(arrivals)
        inserted = [0] * len(arrivals)
        if rows:
            document = _document(rows)
            with _translating():
                returned = await self._execute(document)
            for provider, event_id in returned:
                inserted[first[(provider, event_id)]] += 1
        return results_of(arrivals, inserted)

    async def _execute(self, document: str) -> list[tuple[str, str]]:
        """Run the statement; once more on a new connection if the one kept from before
        turned out broken (the server restarted meanwhile), as a pool's pre-ping would.
        Running it again is safe: rows the first try stored come back as duplicates."""
        while True:
            kept = self._conn is not None and not self._conn.closed
            conn = await self._connection()
            try:
                cursor = await conn.execute(_statement(), {"rows": document})
                return [(str(p), str(e)) for p, e in await cursor.fetchall()]
            except psycopg.Error:
                if not (conn.broken or conn.closed):
                    raise
                self._conn = None
                if not kept:  # a connection opened just now: the server is really away
                    raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            # The engine's search path (its connect hook sets the worker's schema), read
            # through one of its own connections; a thread: the engine is synchronous.
            with translating():  # SQLAlchemy's errors, from the engine
                path, kwargs = await asyncio.to_thread(_search_path_and_arguments, self.engine)
            conn = await psycopg.AsyncConnection.connect(**kwargs, autocommit=True)
            try:
                await conn.execute(_set_search_path(), {"path": path})
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn


def _search_path_and_arguments(engine: Engine) -> tuple[str, dict[str, Any]]:
    with engine.connect() as conn:
        path = str(conn.execute(select(func.current_setting("search_path"))).scalar_one())
        allowed = prepares(conn)
    _args, kwargs = engine.dialect.create_connect_args(engine.url)
    if not allowed:  # database.prepared_statements: false (a pooler that cannot keep them)
        kwargs["prepare_threshold"] = None
    return path, dict(kwargs)


@cache
def _set_search_path() -> str:
    name: ColumnElement[str] = literal_column("'search_path'")
    statement = select(func.set_config(name, bindparam("path", type_=String()), false()))
    return str(statement.compile(dialect=_DIALECT))


@contextmanager
def _translating() -> Iterator[None]:
    """psycopg's errors as the store's own (db/errors.py does this for SQLAlchemy's)."""
    try:
        yield
    except (psycopg.IntegrityError, psycopg.DataError) as exc:
        raise RecordRefused(f"database refused the record: {_first_line(exc)}") from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise StoreUnavailable(f"database unavailable: {_first_line(exc)}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"database error: {_first_line(exc)}") from exc


def _first_line(exc: psycopg.Error) -> str:
    """The first line only: later ones (DETAIL) can echo a row's values."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
