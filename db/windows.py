"""Deleting in primary-key windows: a walk over a whole table in bounded transactions.

For purges whose condition no index covers (audit rows by age, sessions by revocation):
each call looks at the next ``size`` ids only, so every transaction stays short however big
the table, and the walk reads each row once.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, Table, delete, select

Key = TypeVar("Key")


def delete_window(
    conn: Connection,
    table: Table,
    condition: ColumnElement[bool],
    *,
    after: Key | None,
    size: int,
) -> tuple[int, Key | None]:
    """Delete the rows matching ``condition`` among the next ``size`` ids after ``after``.

    Returns (rows deleted, the window's last id); the last id is None once no row is left
    after ``after``: the walk is over.
    """
    key: Any = table.c.id
    window = select(key).order_by(key).limit(size)
    if after is not None:
        window = window.where(key > after)
    ids = window.subquery()
    # No max(uuid) before PostgreSQL 16: the window's last id is its first, read backwards.
    last: Key | None = conn.execute(
        select(ids.c.id).order_by(ids.c.id.desc()).limit(1)
    ).scalar_one_or_none()
    if last is None:
        return 0, None
    in_window = key <= last if after is None else (key > after) & (key <= last)
    return conn.execute(delete(table).where(in_window, condition)).rowcount, last
