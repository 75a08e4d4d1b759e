"""Dialect-aware, set-based writes: one statement per table and batch, never one per row.

New rows go straight to the driver: PostgreSQL ``COPY ... FROM STDIN`` (binary format),
SQLite one ``executemany``. ``upsert_rows`` runs one executemany of an ``INSERT ... ON
CONFLICT`` statement that SQLAlchemy compiles once and caches (psycopg pipelines the rows).
The multi-row VALUES statements these replace were compiled afresh for every batch, which
cost more than the database spent running them.

``write_steps`` runs a batch's inserts and upserts in order; on PostgreSQL they share one
psycopg pipeline, so a small batch's writes cost one round trip rather than one per table
(a COPY takes two of its own and cannot run in a pipeline: small inserts go as INSERTs).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from functools import lru_cache
from typing import Any

from psycopg import postgres
from sqlalchemy import Connection, Dialect, Executable, Table, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from db import jsoncodec
from db.connect import prepares
from db.types import UTCDateTime


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows (all with the same keys): COPY on PostgreSQL, executemany on SQLite.

    The rows go straight to the driver, through the bind processors SQLAlchemy would apply
    (UTC timestamps, UUIDs, JSON), and driver errors are wrapped as SQLAlchemy wraps them,
    so a refused row raises the same IntegrityError / DataError for the engine to isolate.
    """
    if not rows:
        return
    plan = _insert_plan(conn.dialect, table, tuple(rows[0]))
    _send(conn, plan, [plan.bind(row) for row in rows])


def _send(conn: Connection, plan: _InsertPlan, values: list[list[Any]]) -> None:
    driver = conn.connection.driver_connection
    dbapi = conn.dialect.loaded_dbapi
    try:
        if plan.copy:
            _copy(driver, plan, values)
        else:
            _executemany(driver, plan, values)
    except dbapi.Error as exc:
        raise DBAPIError.instance(
            plan.statement, None, exc, dbapi.Error, dialect=conn.dialect
        ) from exc


def insert_tuples(
    conn: Connection, table: Table, columns: tuple[str, ...], rows: Iterable[Sequence[Any]]
) -> None:
    """Insert rows given as tuples in ``columns``' order: ``insert_rows`` without the dicts.

    On PostgreSQL ``rows`` is consumed while the COPY streams: a generator's work (the bulk
    create path computes content hashes and audit diffs this way) runs while the server
    inserts the rows already sent, instead of before. On its binary COPY only the JSON
    columns need their bind processor (the psycopg ``Jsonb`` wrapper): the driver sends an
    aware datetime, a bool or a UUID as the same value the processors would hand it.
    """
    plan = _insert_plan(conn.dialect, table, columns)
    if not plan.copy or not plan.types:
        values = [plan.bind(dict(zip(columns, row, strict=True))) for row in rows]
        if values:
            _send(conn, plan, values)
        return
    pending = iter(rows)
    first = next(pending, None)
    if first is None:
        return
    wrap = [(i, f) for i, f in plan.processors if plan.types[i] in ("json", "jsonb")]
    driver: Any = conn.connection.driver_connection
    dbapi = conn.dialect.loaded_dbapi
    try:
        with driver.cursor() as cursor, cursor.copy(plan.statement) as copy:
            copy.set_types(plan.types)
            for row in itertools.chain((first,), pending):
                if wrap:
                    row = list(row)  # noqa: PLW2901
                    for index, process in wrap:
                        row[index] = process(row[index])
                copy.write_row(row)
    except dbapi.Error as exc:
        raise DBAPIError.instance(
            plan.statement, None, exc, dbapi.Error, dialect=conn.dialect
        ) from exc


def upsert_rows(
    conn: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    conflict: Sequence[str],
    update: Sequence[str],
) -> None:
    """INSERT ... ON CONFLICT (conflict) DO UPDATE SET update-columns = excluded values.

    Every row must carry the same keys. With an empty ``update`` conflicting rows are left alone.
    """
    if rows:
        stmt = _upsert(conn.dialect.name, table, tuple(conflict), tuple(update))
        conn.execute(stmt, list(rows))


@lru_cache(maxsize=256)
def _upsert(
    dialect: str, table: Table, conflict: tuple[str, ...], update: tuple[str, ...]
) -> Executable:
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table)
    else:  # pragma: no cover - only the two supported dialects reach here
        raise ValueError(f"unsupported dialect {dialect}")
    if update:
        return stmt.on_conflict_do_update(  # type: ignore[no-any-return]
            index_elements=list(conflict), set_={c: stmt.excluded[c] for c in update}
        )
    return stmt.on_conflict_do_nothing(index_elements=list(conflict))  # type: ignore[no-any-return]


def _copy(driver: Any, plan: _InsertPlan, values: list[list[Any]]) -> None:
    with driver.cursor() as cursor, cursor.copy(plan.statement) as copy:
        if plan.types:
            copy.set_types(plan.types)
        for row in values:
            copy.write_row(row)


def _executemany(driver: Any, plan: _InsertPlan, values: list[list[Any]]) -> None:
    cursor = driver.cursor()
    try:
        cursor.executemany(plan.statement, values)
    finally:
        cursor.close()


@dataclass(frozen=True, slots=True)
class _InsertPlan:
    statement: str
    columns: tuple[str, ...]  # in the statement's order
    processors: list[tuple[int, Callable[[Any], Any]]]
    copy: bool  # else executemany
    types: list[str]  # COPY in binary format when known

    def bind(self, row: Mapping[str, Any]) -> list[Any]:
        values = [row[c] for c in self.columns]
        for index, process in self.processors:
            values[index] = process(values[index])
        return values


@lru_cache(maxsize=256)
def _insert_plan(dialect: Dialect, table: Table, columns: tuple[str, ...]) -> _InsertPlan:
    unknown = set(columns) - set(table.c.keys())
    if unknown:
        raise ValueError(f"{table.name} has no column(s) {sorted(unknown)}")
    if dialect.name != "postgresql":
        compiled = insert(table).compile(dialect=dialect, column_keys=list(columns))
        order = tuple(compiled.positiontup or ())  # the driver's positional order
        return _InsertPlan(str(compiled), order, _processors(dialect, table, order), False, [])
    quote = dialect.identifier_preparer
    names = ", ".join(quote.quote(c) for c in columns)
    statement = f"COPY {quote.format_table(table)} ({names}) FROM STDIN"
    processors = _processors(dialect, table, columns)
    # The binary format spares both sides the text escaping and parsing (measured: a third
    # off the COPY time); it needs every column's type, so an unknown one keeps the text.
    types = [_TYPMOD.sub("", table.c[c].type.compile(dialect=dialect)).lower() for c in columns]
    if all(postgres.types.get(name) is not None for name in types):
        return _InsertPlan(f"{statement} (FORMAT BINARY)", columns, processors, True, types)
    return _InsertPlan(statement, columns, processors, True, [])


def _processors(
    dialect: Dialect, table: Table, columns: Sequence[str]
) -> list[tuple[int, Callable[[Any], Any]]]:
    """What an INSERT would do to each value on its way to the driver."""
    found: list[tuple[int, Callable[[Any], Any]]] = []
    for index, name in enumerate(columns):
        process = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            found.append((index, process))
    return found


_TYPMOD = re.compile(r"\(.*\)$")  # VARCHAR(320) -> VARCHAR


# -- a batch's writes in one pipeline ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One table's rows of a batch: inserted (``conflict`` None), or upserted."""

    table: Table
    rows: Sequence[Mapping[str, Any]]
    conflict: tuple[str, ...] | None = None
    update: tuple[str, ...] = ()


#: Up to this many new rows go as a pipelined INSERT rather than a COPY: below it the COPY's
#: own two round trips cost more than the server's per-row work it saves.
PIPELINE_INSERT_MAX = 100
_PREPARE_THRESHOLD = 5  # psycopg's default; ``prepare=True`` prepares at the first use anyway


def write_steps(conn: Connection, steps: Sequence[Step]) -> None:
    """Run ``steps`` in order (inserts and upserts alike: every row of a step with the same
    keys). On PostgreSQL the statements go through one psycopg pipeline, the rows of every
    step included, and are answered together; a large insert leaves the pipeline for a COPY.
    Errors come out as ``insert_rows`` raises them."""
    steps = [step for step in steps if step.rows]
    if conn.dialect.name != "postgresql":
        for step in steps:
            if step.conflict is None:
                insert_rows(conn, step.table, step.rows)
            else:
                upsert_rows(conn, step.table, step.rows, conflict=step.conflict, update=step.update)
        return
    pending: list[Step] = []
    for step in steps:
        if step.conflict is None and len(step.rows) > PIPELINE_INSERT_MAX:
            _pipelined(conn, pending)
            pending = []
            insert_rows(conn, step.table, step.rows)
        else:
            pending.append(step)
    _pipelined(conn, pending)


def _pipelined(conn: Connection, steps: Sequence[Step]) -> None:
    if not steps:
        return
    driver: Any = conn.connection.driver_connection
    dbapi = conn.dialect.loaded_dbapi
    statement = ""
    # Each step is one prepared statement taking its rows as one JSON document (see
    # ``_json_plan``); preparing is turned off during an apply (``planned_per_run``), for
    # lookups whose plans could go stale as tables grow, which an INSERT cannot. Unless the
    # engine may not prepare at all (``db.connect.prepares``: a pooler in transaction mode).
    prepare = prepares(conn)
    previous = driver.prepare_threshold
    if previous is None and prepare:
        driver.prepare_threshold = _PREPARE_THRESHOLD
    try:
        with driver.pipeline(), driver.cursor() as cursor:  # synced (errors raised) on exit
            for step in steps:
                plan = _json_plan(conn.dialect, step.table, tuple(step.rows[0]), step.conflict,
                                  step.update)  # fmt: skip
                statement = plan.statement
                # One statement may not update a row twice (PostgreSQL refuses it): a step
                # naming a row twice goes row by row, in order, the later row winning.
                parts = [step.rows] if _unique_keys(step) else [[row] for row in step.rows]
                for rows in parts:
                    cursor.execute(statement, [plan.document(rows)], prepare=prepare)
    except dbapi.Error as exc:
        raise DBAPIError.instance(statement, None, exc, dbapi.Error, dialect=conn.dialect) from exc
    finally:
        driver.prepare_threshold = previous


def _unique_keys(step: Step) -> bool:
    if step.conflict is None or len(step.rows) == 1:
        return True
    if len(step.conflict) == 1:
        (name,) = step.conflict
        return len({row[name] for row in step.rows}) == len(step.rows)
    return len({tuple(row[c] for c in step.conflict) for row in step.rows}) == len(step.rows)


@dataclass(frozen=True, slots=True)
class _JsonPlan:
    statement: str
    columns: tuple[str, ...]
    timestamps: tuple[int, ...]  # positions of UTC timestamp columns

    def document(self, rows: Sequence[Mapping[str, Any]]) -> str:
        values = [[row[c] for c in self.columns] for row in rows]
        # A naive timestamp is UTC (as ``UTCDateTime`` binds it); an aware one is written
        # with its offset, which PostgreSQL reads as the same instant.
        for line in values:
            for index in self.timestamps:
                value = line[index]
                if value is not None and value.tzinfo is None:
                    line[index] = value.replace(tzinfo=UTC)
        return jsoncodec.dumps_text(values)


@lru_cache(maxsize=256)
def _json_plan(
    dialect: Dialect,
    table: Table,
    columns: tuple[str, ...],
    conflict: tuple[str, ...] | None,
    update: tuple[str, ...],
) -> _JsonPlan:
    """``INSERT INTO t (columns) SELECT ... FROM jsonb_array_elements(%s)``: every row of a
    step in one statement and one parameter, each row a JSON array in column order.

    orjson writes the whole document in C; an executemany had psycopg adapt and send each
    value of each row (measured: a fifth of a drain's CPU). The values come out of the JSON
    cast to their column's type without its length (a cast to varchar(n) would cut a value
    that the column must refuse); JSON columns take the value as it is, so a None stays JSON
    null, as SQLAlchemy writes it.
    """
    unknown = set(columns) - set(table.c.keys())
    if unknown:
        raise ValueError(f"{table.name} has no column(s) {sorted(unknown)}")
    quote = dialect.identifier_preparer
    exprs, timestamps = [], []
    for index, name in enumerate(columns):
        column_type = table.c[name].type
        if isinstance(column_type, UTCDateTime):
            timestamps.append(index)
        sql_type = _TYPMOD.sub("", column_type.compile(dialect=dialect))
        if sql_type.upper() in ("JSON", "JSONB"):
            exprs.append(f"r->{index}")
        else:
            exprs.append(f"(r->>{index})::{sql_type}")
    names = ", ".join(quote.quote(c) for c in columns)
    # Only our own table's quoted names and types reach the text; the rows are a parameter.
    statement = (
        f"INSERT INTO {quote.format_table(table)} ({names}) SELECT {', '.join(exprs)}"  # noqa: S608
        " FROM jsonb_array_elements(%s::jsonb) AS e(r)"
    )
    if conflict is not None:
        target = ", ".join(quote.quote(c) for c in conflict)
        if update:
            sets = ", ".join(f"{quote.quote(c)} = excluded.{quote.quote(c)}" for c in update)
            statement += f" ON CONFLICT ({target}) DO UPDATE SET {sets}"
        else:
            statement += f" ON CONFLICT ({target}) DO NOTHING"
    return _JsonPlan(statement, columns, tuple(timestamps))
