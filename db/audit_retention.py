"""Deleting old ``sync_audit`` rows (the ``retention`` job), in windows of the primary key.

``occurred_at`` has no index of its own (``ix_sync_audit_user_id_occurred_at`` leads with
the user and cannot serve a range of times), and the table is append-only: every applied
change writes a row, so a new index would cost every batch to serve one nightly job. The
primary key already orders rows by time closely enough: ids are handed out as rows are
inserted, and a row's occurred_at is its batch's start, so they disagree by at most one
batch's duration (or the clock skew between instances).

So the purge walks the oldest ids in windows: each window reads the next ``size`` ids off
the key (an index range), and deletes those of them older than the cutoff (a key range).
The walk stops at the first window with nothing to delete, i.e. at the time boundary; a
row just past it that is older than the cutoff goes on the next run. No row younger than
the cutoff is ever deleted, whatever the order: the delete states the time condition.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection

from db.errors import translated
from db.tables import sync_audit
from db.windows import delete_window

_a = sync_audit


@translated
def purge_window(
    conn: Connection, *, before: datetime, after: int | None, size: int
) -> tuple[int, int | None]:
    """Delete the rows older than ``before`` among the next ``size`` ids after ``after``.

    Returns (rows deleted, the window's last id), the last id None when no row is left.
    """
    return delete_window(conn, _a, _a.c.occurred_at < before, after=after, size=size)
