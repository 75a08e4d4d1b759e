"""The bulk create path's statements (PostgreSQL): two lookups, then one COPY per table.

``sync_worker.engine.bulk`` builds the rows of a large batch's simple creates as tuples in
the column orders below; ``write_creates`` COPYs them. The lookups answer what the engine
must know before it may call a create simple: which of the batch's verified emails a live
user owns, and which of its linked accounts are stored already.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from typing import Any

from sqlalchemy import Connection, func, select

from db.errors import translated
from db.lookup import among
from db.rows import Key
from db.tables import profiles, sync_audit, user_identities, user_sessions, users
from db.upsert import insert_tuples
from db.writes import Stamp

# Each table's columns in the order engine/bulk.py builds its tuples (the table's own).
USER_COLUMNS = tuple(c.name for c in users.columns)
PROFILE_COLUMNS = tuple(c.name for c in profiles.columns)
IDENTITY_COLUMNS = tuple(c.name for c in user_identities.columns)
SESSION_COLUMNS = tuple(c.name for c in user_sessions.columns)
AUDIT_COLUMNS = (
    "occurred_at", "run_id", "source",  # stamped here
    "provider", "external_id", "user_id", "action", "changes", "event_id", "error",
)  # fmt: skip
_CHUNK = 5000


@translated
def owned_emails(conn: Connection, emails: Collection[str]) -> set[str]:
    """Those of ``emails`` (lower-cased) that a live user holds verified: the rows
    ``db.snapshot`` looks up as link targets."""
    lowered = func.lower(users.c.email, type_=users.c.email.type)
    found: set[str] = set()
    ordered = sorted(emails)
    for start in range(0, len(ordered), _CHUNK):
        stmt = select(lowered).where(
            among(conn, lowered, ordered[start : start + _CHUNK]),
            users.c.email_verified.is_(True),
            users.c.deleted_at.is_(None),
        )
        found.update(conn.execute(stmt).scalars())
    return found


@translated
def stored_keys(conn: Connection, keys: Collection[Key]) -> set[Key]:
    """Those of ``keys`` (provider, external id) stored in user_identities, deleted or not."""
    by_provider: dict[str, list[str]] = defaultdict(list)
    for provider, external_id in keys:
        by_provider[provider].append(external_id)
    found: set[Key] = set()
    for provider, ids in by_provider.items():
        ids.sort()
        for start in range(0, len(ids), _CHUNK):
            stmt = select(user_identities.c.external_id).where(
                user_identities.c.provider == provider,
                among(conn, user_identities.c.external_id, ids[start : start + _CHUNK]),
            )
            found.update((provider, e) for e in conn.execute(stmt).scalars())
    return found


@translated
def write_creates(
    conn: Connection,
    *,
    users_rows: Iterable[tuple[Any, ...]],
    profile_rows: Iterable[tuple[Any, ...]],
    identity_rows: Iterable[tuple[Any, ...]],
    session_rows: Iterable[tuple[Any, ...]],
    audit_rows: Iterable[tuple[Any, ...]],
    stamp: Stamp,
) -> None:
    """COPY the creates' rows, in the order the foreign keys need. Each iterable is consumed
    while its COPY streams (the engine computes rows lazily to overlap with the server)."""
    insert_tuples(conn, users, USER_COLUMNS, users_rows)
    insert_tuples(conn, profiles, PROFILE_COLUMNS, profile_rows)
    insert_tuples(conn, user_identities, IDENTITY_COLUMNS, identity_rows)
    insert_tuples(conn, user_sessions, SESSION_COLUMNS, session_rows)
    head = (stamp.now, stamp.run_id, stamp.source)
    insert_tuples(conn, sync_audit, AUDIT_COLUMNS, (head + row for row in audit_rows))
