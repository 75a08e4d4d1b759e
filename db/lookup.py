"""Set lookups whose statement text does not grow with the number of values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, any_, bindparam
from sqlalchemy.dialects import postgresql


def among(
    conn: Connection, column: ColumnElement[Any], values: Sequence[Any]
) -> ColumnElement[bool]:
    """``column IN (values)``; on PostgreSQL ``column = ANY(:array)``.

    One array parameter keeps the statement text the same whatever the count, and the
    generic plan ``lock_writers`` asks for is planned without looking at the values. An IN
    list of hundreds of values was planned value by value on every execution (~20 ms for
    2,000), and without statistics (a fresh bulk load) it was taken to match the whole table
    and scanned it: ~1 s per lookup at 100,000 users. The text of an IN list also differs
    with its length, so neither SQLAlchemy's nor psycopg's statement caches could hold it.
    """
    if conn.dialect.name != "postgresql":
        return column.in_(values)
    return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
