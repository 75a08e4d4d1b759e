"""Dialect-aware, set-based writes: one multi-row statement per chunk, never one per row.

Chunks are sized to stay under the bind-parameter limit of the dialect (PostgreSQL: 65,535
per statement; SQLite: 32,766 since 3.32).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, insert
from sqlalchemy.dialects import postgresql, sqlite

MAX_PARAMS = {"postgresql": 60_000, "sqlite": 30_000}


def chunks(
    rows: Sequence[Mapping[str, Any]], dialect: str
) -> Iterator[Sequence[Mapping[str, Any]]]:
    if not rows:
        return
    width = max(1, len(rows[0]))
    size = max(1, MAX_PARAMS.get(dialect, 30_000) // width)
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows (all with the same keys) in multi-row statements."""
    for chunk in chunks(rows, conn.dialect.name):
        conn.execute(insert(table).values(list(chunk)))


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
    dialect = conn.dialect.name
    for chunk in chunks(rows, dialect):
        stmt: Any
        if dialect == "postgresql":
            stmt = postgresql.insert(table).values(list(chunk))
        elif dialect == "sqlite":
            stmt = sqlite.insert(table).values(list(chunk))
        else:  # pragma: no cover - only the two supported dialects reach here
            raise ValueError(f"unsupported dialect {dialect}")
        if update:
            stmt = stmt.on_conflict_do_update(
                index_elements=list(conflict),
                set_={c: stmt.excluded[c] for c in update},
            )
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict))
        conn.execute(stmt)
