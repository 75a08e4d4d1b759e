"""Executing a batch's planned writes: a few set statements per table, never one per row."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, update

from db.errors import translated
from db.lookup import among
from db.rows import AuditRow, Writes
from db.tables import profiles, sync_audit, user_identities, user_sessions, users
from db.upsert import insert_rows, upsert_rows

_IDENTITY_UPDATE = [
    c.name
    for c in user_identities.columns
    if c.name not in ("provider", "external_id", "first_seen_at")
]
_SESSION_UPDATE = ["user_id", "ip", "user_agent", "last_seen_at", "expires_at", "revoked_at"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Stamp:
    """What every audit row of one batch shares."""

    now: datetime
    source: str
    run_id: uuid.UUID | None = None


@translated
def write(conn: Connection, writes: Writes, stamp: Stamp) -> None:
    """Execute ``writes`` inside the caller's transaction."""
    insert_rows(conn, users, writes.new_users)
    for group in writes.user_updates:
        upsert_rows(conn, users, group.rows, conflict=["id"], update=group.columns)
    insert_rows(conn, profiles, writes.new_profiles)
    for pgroup in writes.profile_updates:
        upsert_rows(conn, profiles, pgroup.rows, conflict=["user_id"], update=pgroup.columns)
    insert_rows(conn, user_identities, writes.new_identities)
    upsert_rows(
        conn,
        user_identities,
        writes.identity_updates,
        conflict=["provider", "external_id"],
        update=_IDENTITY_UPDATE,
    )
    insert_rows(conn, user_sessions, writes.new_sessions)
    upsert_rows(
        conn,
        user_sessions,
        writes.sessions,
        conflict=["provider", "external_session_id"],
        update=_SESSION_UPDATE,
    )
    _revoke_sessions(conn, writes.revoke_sessions_of, stamp.now)
    _insert_audit(conn, writes.audit, stamp)


@translated
def append_audit(conn: Connection, rows: Sequence[AuditRow], stamp: Stamp) -> None:
    """Audit rows alone (records isolated as failed)."""
    _insert_audit(conn, rows, stamp)


def _revoke_sessions(conn: Connection, targets: list[tuple[str, uuid.UUID]], now: datetime) -> None:
    by_provider: dict[str, list[uuid.UUID]] = {}
    for provider, user_id in targets:
        by_provider.setdefault(provider, []).append(user_id)
    for provider, user_ids in by_provider.items():
        conn.execute(
            update(user_sessions)
            .where(
                user_sessions.c.provider == provider,
                among(conn, user_sessions.c.user_id, user_ids),
                user_sessions.c.revoked_at.is_(None),
            )
            .values(revoked_at=now)
        )


def _insert_audit(conn: Connection, rows: Sequence[AuditRow], stamp: Stamp) -> None:
    stamped = [
        {**row, "occurred_at": stamp.now, "run_id": stamp.run_id, "source": stamp.source}
        for row in rows
    ]
    insert_rows(conn, sync_audit, stamped)
