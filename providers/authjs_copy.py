"""Reading Auth.js queries as COPY text bytes, on connections that share one snapshot.

A digest pass hands the source's digests to the worker's ``COPY ... FROM STDIN`` undecoded
(``db.digests.stage_digests``): this module turns a query into those bytes. The digest query
is the pass's costliest read and PostgreSQL runs it on one backend, so the adapter splits it
by id range over two connections; the second joins the first one's snapshot
(``pg_export_snapshot``), so both halves read the same data as one query would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg
from sqlalchemy import Connection, Select

from sync_worker.errors import UpstreamDataError, UpstreamUnavailable

__all__ = ["copy_rows", "export_snapshot", "join_snapshot"]

#: The driver hands over a row at a time: rows are passed on in blocks of about this size.
BLOCK = 1 << 18


def copy_rows(conn: Connection, query: Select[Any]) -> Iterator[bytes]:
    """``query``'s rows as COPY text, in blocks, read in ``conn``'s transaction."""
    compiled = query.compile(dialect=conn.dialect)
    processors: Mapping[str, Callable[[Any], Any]] = getattr(compiled, "_bind_processors", {})
    params = {
        k: processors[k](v) if k in processors else v
        for k, v in compiled.construct_params().items()
    }
    raw = conn.connection.driver_connection
    assert raw is not None
    block = bytearray()
    try:
        with raw.cursor() as cur, cur.copy(f"COPY ({compiled}) TO STDOUT", params) as copy:
            for row in copy:
                block += row
                if len(block) >= BLOCK:
                    yield bytes(block)
                    block.clear()
    except psycopg.OperationalError as exc:
        raise UpstreamUnavailable(f"authjs: database unavailable: {_line(exc)}") from exc
    except psycopg.Error as exc:
        raise UpstreamDataError(f"authjs: database error: {_line(exc)}") from exc
    if block:
        yield bytes(block)


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
