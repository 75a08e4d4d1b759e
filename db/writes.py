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
from db.upsert import Step, insert_rows, write_steps

_IDENTITY_UPDATE = tuple(
    c.name
    for c in user_identities.columns
    if c.name not in ("provider", "external_id", "first_seen_at")
)
_IDENTITY_KEY = ("provider", "external_id")
_SESSION_KEY = ("provider", "external_session_id")
_SESSION_UPDATE = ("user_id", "ip", "user_agent", "last_seen_at", "expires_at", "revoked_at")


@dataclass(frozen=True, slots=True, kw_only=True)
class Stamp:
    """What every audit row of one batch shares."""

    now: datetime
    source: str
    run_id: uuid.UUID | None = None


@translated
def write(conn: Connection, writes: Writes, stamp: Stamp) -> None:
    """Execute ``writes`` inside the caller's transaction: on PostgreSQL one pipeline (one
    round trip) for a small batch, a revocation of sessions splitting it in two."""
    steps = [
        Step(users, writes.new_users),
        *(Step(users, g.rows, ("id",), tuple(g.columns)) for g in writes.user_updates),
        Step(profiles, writes.new_profiles),
        *(Step(profiles, g.rows, ("user_id",), tuple(g.columns)) for g in writes.profile_updates),
        Step(user_identities, writes.new_identities),
        Step(user_identities, writes.identity_updates, _IDENTITY_KEY, _IDENTITY_UPDATE),
        Step(user_sessions, writes.new_sessions),
        Step(user_sessions, writes.sessions, _SESSION_KEY, _SESSION_UPDATE),
    ]
    audit = Step(sync_audit, _stamped(writes.audit, stamp))
    if writes.revoke_sessions_of:  # after the sessions' upsert, before the audit
        write_steps(conn, steps)
        _revoke_sessions(conn, writes.revoke_sessions_of, stamp.now)
        write_steps(conn, [audit])
    else:
        write_steps(conn, [*steps, audit])


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
    insert_rows(conn, sync_audit, _stamped(rows, stamp))


def _stamped(rows: Sequence[AuditRow], stamp: Stamp) -> list[dict[str, object]]:
    return [
        {**row, "occurred_at": stamp.now, "run_id": stamp.run_id, "source": stamp.source}
        for row in rows
    ]
