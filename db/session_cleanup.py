"""Deleting ended ``user_sessions`` rows, in bounded batches (the ``session_cleanup`` job).

Three kinds of rows end: expired ones (``expires_at`` passed), revoked ones (a logout, or
the user's deletion), and idle ones: a row that states no expiry (an Auth0 login: its log
carries none) and has not been seen for longer than any session can stay idle upstream.
Expired rows are found through ``ix_user_sessions_expires_at``, oldest first, so a batch
costs what it deletes. ``revoked_at`` and ``last_seen_at`` have no index (a migration for
them would be the only one this job needs): revoked and idle rows are found by walking the
primary key in windows, each window one bounded range read and one range delete, so a run
reads the table once, in pieces, never a scan per batch. Each function is one batch in the
caller's transaction; the job commits between them.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Connection, delete, func, or_, select

from db.errors import translated
from db.lookup import among
from db.tables import user_sessions
from db.windows import delete_window

_s = user_sessions


@translated
def delete_expired(conn: Connection, *, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` rows that expired before ``before``, oldest first."""
    expired = _s.c.expires_at < before
    ids = list(
        conn.execute(
            select(_s.c.id).where(expired).order_by(_s.c.expires_at).limit(limit)
        ).scalars()
    )
    if not ids:
        return 0
    # By key, as db.inbox.purge_done does: PostgreSQL planned ``id IN (subquery)`` as a
    # hash join over the whole table.
    return conn.execute(delete(_s).where(among(conn, _s.c.id, ids), expired)).rowcount


@translated
def delete_revoked_window(
    conn: Connection,
    *,
    before: datetime,
    after: uuid.UUID | None,
    size: int,
    idle_before: datetime | None = None,
) -> tuple[int, uuid.UUID | None]:
    """Delete the rows revoked before ``before`` among the next ``size`` ids after ``after``,
    and (``idle_before``) those with neither an expiry nor a revocation last seen (else
    created) before ``idle_before``: the same walk reads the table once for both.

    Returns (rows deleted, the window's last id); the last id is None once no row is left
    after ``after``: the walk is over.
    """
    ended = _s.c.revoked_at < before
    if idle_before is not None:
        idle = (
            _s.c.expires_at.is_(None)
            & _s.c.revoked_at.is_(None)
            & (func.coalesce(_s.c.last_seen_at, _s.c.created_at) < idle_before)
        )
        ended = or_(ended, idle)
    return delete_window(conn, _s, ended, after=after, size=size)
