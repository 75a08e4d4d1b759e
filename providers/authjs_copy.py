"""Reading Auth.js queries as COPY text bytes, on connections that share one snapshot.

A digest pass hands the source's digests to the worker's ``COPY ... FROM STDIN`` undecoded
(``db.digests.stage_digests``): this module turns a query into those bytes. The database
builds the lines and hands them over in chunks of many rows: read a row at a time (``COPY
... TO STDOUT``), the driver's Python cost more per row than the database's work to build
them. The digest query is the pass's costliest read and PostgreSQL runs it on one backend,
so the adapter splits it by id range over two connections; the second joins the first
one's snapshot (``pg_export_snapshot``), so both halves read the same data as one would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from sqlalchemy import ColumnElement, Connection, Select, Text, cast, func, literal, select

from sync_worker.errors import UpstreamDataError, UpstreamUnavailable

__all__ = ["CHUNK_ROWS", "copy_chunks", "export_snapshot", "join_snapshot"]

#: At most about this many rows to a chunk (some 4 MB of digests). Up to this many in
#: all, one aggregate takes the query's rows as they come; beyond, grouping them into
#: chunks sorts them (the planner cannot tell that a bucket of ids has few values).
CHUNK_ROWS = 100_000

# COPY's text format: a backslash escapes itself and the separators; \N is NULL.
_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))


def copy_chunks(
    conn: Connection, query: Select[Any], *, rows: int, plain: Sequence[bool]
) -> Iterator[bytes]:
    """``query``'s rows as COPY text lines, in chunks of at most about ``CHUNK_ROWS`` rows
    (for ``rows`` rows in all), read in ``conn``'s transaction one chunk at a time. ``plain``
    says, column by column, which never hold a character COPY escapes nor NULL (integers,
    decimal digests): the others are escaped. Chunks follow no order; rows are grouped by the
    first column."""
    compiled = _chunked(query, rows=rows, plain=plain).compile(dialect=conn.dialect)
    processors: Mapping[str, Callable[[Any], Any]] = getattr(compiled, "_bind_processors", {})
    params = {
        k: processors[k](v) if k in processors else v
        for k, v in compiled.construct_params().items()
    }
    raw = conn.connection.driver_connection
    assert raw is not None
    try:
        with raw.cursor(name="sw_copy_chunks", binary=True) as cur:
            cur.itersize = 1  # one chunk in memory at a time
            cur.execute(str(compiled), params)
            for (chunk,) in cur:
                if chunk is not None:  # the aggregate of no rows
                    yield bytes(chunk)
    except psycopg.OperationalError as exc:
        raise UpstreamUnavailable(f"authjs: database unavailable: {_line(exc)}") from exc
    except psycopg.Error as exc:
        raise UpstreamDataError(f"authjs: database error: {_line(exc)}") from exc


def _chunked(query: Select[Any], *, rows: int, plain: Sequence[bool]) -> Select[Any]:
    table = query.subquery("copied")
    columns = list(table.c)
    line = _field(columns[0], plain=plain[0])
    for column, is_plain in zip(columns[1:], plain[1:], strict=True):
        line = line + literal("\t", Text) + _field(column, plain=is_plain)
    text = func.string_agg(line, literal("\n", Text)) + literal("\n", Text)
    chunks = select(func.convert_to(text, literal("UTF8")))
    buckets = -(-rows // CHUNK_ROWS)
    if buckets <= 1:
        return chunks
    first = columns[0] if plain[0] else func.hashtext(cast(columns[0], Text))
    return chunks.group_by(first % buckets)


def _field(column: ColumnElement[Any], *, plain: bool) -> ColumnElement[str]:
    text: ColumnElement[str] = cast(column, Text)
    if plain:
        return text
    for char, escaped in _ESCAPES:
        text = func.replace(text, literal(char, Text), literal(escaped, Text))
    return func.coalesce(text, literal("\\N", Text))


def export_snapshot(conn: Connection) -> str:
    """The id of ``conn``'s snapshot (REPEATABLE READ: its transaction's), for another
    connection to join while this transaction stays open."""
    return str(conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one())


def join_snapshot(conn: Connection, snapshot: str) -> None:
    """Make ``conn``'s transaction (REPEATABLE READ, not begun yet) see ``snapshot``."""
    conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{_literal(snapshot)}'")


def _literal(snapshot: str) -> str:
    # An id PostgreSQL made (hex digits and dashes); refuse anything else rather than quote.
    if not snapshot or any(c not in "0123456789ABCDEFabcdef-" for c in snapshot):
        raise UpstreamDataError(f"authjs: unexpected snapshot id {snapshot!r}")
    return snapshot


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
