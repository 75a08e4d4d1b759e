"""Loading the current rows a batch touches: a handful of set queries, never one per change."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, and_, bindparam, func, select, text

from db.tables import profiles, sync_audit, user_identities, user_sessions, users
from sync_worker.changes import AuditAction, ChangeKind, UserChange
from sync_worker.plan import Key, Outcome, Row, Snapshot

IN_CHUNK = 5000
WRITER_LOCK = 0x5F1C_0001  # arbitrary, fixed: the engine's writer lock


@dataclass(slots=True, kw_only=True)
class Triage:
    """Changes split into those that certainly write nothing and those that need a plan."""

    noop: list[Outcome] = field(default_factory=list)
    todo: list[UserChange] = field(default_factory=list)


def lock_writers(conn: Connection) -> None:
    """Serialize engine writers on PostgreSQL with one transaction-scoped advisory lock.

    Two applies of the same new identity (a webhook and a backfill, say) would otherwise both
    create a user. One lock per batch rather than per identity: a 5,000-change batch would
    exhaust the lock table (max_locks_per_transaction), and batches are short. SQLite needs
    nothing: its write transactions are already serialized.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITER_LOCK})


def load_identities(conn: Connection, changes: Iterable[UserChange]) -> dict[Key, Row]:
    by_provider: dict[str, set[str]] = defaultdict(set)
    for change in changes:
        by_provider[change.provider].add(change.external_id)
    found: dict[Key, Row] = {}
    for provider, ids in by_provider.items():
        for chunk in _chunks(sorted(ids)):
            stmt = select(user_identities).where(
                user_identities.c.provider == provider, user_identities.c.external_id.in_(chunk)
            )
            found.update(_keyed(conn.execute(stmt).mappings()))
    return found


def triage(changes: Sequence[UserChange], identities: dict[Key, Row]) -> Triage:
    """Set aside upserts whose content is already stored: they write nothing at all."""
    result = Triage()
    for change in changes:
        held = identities.get((change.provider, change.external_id))
        if (
            change.kind is ChangeKind.UPSERT
            and held is not None
            and held["deleted_at"] is None
            and held["content_hash"] == change.content_hash()
            and not _older(change, held)
        ):
            result.noop.append(
                Outcome(change.provider, change.external_id, "unchanged", held["user_id"])
            )
        else:
            result.todo.append(change)
    return result


def load_snapshot(
    conn: Connection,
    changes: Sequence[UserChange],
    identities: dict[Key, Row],
    *,
    link_by_email: bool,
) -> Snapshot:
    snap = Snapshot(identities=dict(identities))
    user_ids = {row["user_id"] for row in identities.values()}
    if link_by_email:
        snap.verified_email_owner = _email_owners(conn, changes, identities)
        user_ids |= set(snap.verified_email_owner.values())
    for chunk in _chunks(sorted(user_ids)):
        snap.users.update(
            (r["id"], dict(r))
            for r in conn.execute(select(users).where(users.c.id.in_(chunk))).mappings()
        )
        snap.profiles.update(
            (r["user_id"], dict(r))
            for r in conn.execute(select(profiles).where(profiles.c.user_id.in_(chunk))).mappings()
        )
        stmt = select(user_identities).where(user_identities.c.user_id.in_(chunk))
        for key, row in _keyed(conn.execute(stmt).mappings()).items():
            snap.identities.setdefault(key, row)
    snap.sessions = _sessions(conn, changes)
    snap.stale_audited = _stale_audited(conn, changes, identities)
    return snap


def _email_owners(
    conn: Connection, changes: Sequence[UserChange], identities: dict[Key, Row]
) -> dict[str, uuid.UUID]:
    emails = {
        c.attributes.email.lower()
        for c in changes
        if c.kind is ChangeKind.UPSERT
        and c.attributes is not None
        and c.attributes.email
        and c.attributes.email_verified
        and (c.provider, c.external_id) not in identities
    }
    owners: dict[str, uuid.UUID] = {}
    lowered = func.lower(users.c.email)
    for chunk in _chunks(sorted(emails)):
        stmt = (
            select(lowered.label("email"), users.c.id)
            .where(
                lowered.in_(chunk), users.c.email_verified.is_(True), users.c.deleted_at.is_(None)
            )
            .order_by(users.c.created_at, users.c.id)
        )
        for row in conn.execute(stmt):
            owners.setdefault(row.email, row.id)
    return owners


def _sessions(conn: Connection, changes: Sequence[UserChange]) -> dict[Key, Row]:
    wanted: dict[str, set[str]] = defaultdict(set)
    for change in changes:
        if change.kind is ChangeKind.LOGIN and change.session is not None:
            wanted[change.provider].add(change.session.external_session_id)
    found: dict[Key, Row] = {}
    for provider, ids in wanted.items():
        for chunk in _chunks(sorted(ids)):
            stmt = select(user_sessions).where(
                user_sessions.c.provider == provider, user_sessions.c.external_session_id.in_(chunk)
            )
            found.update(
                ((provider, r["external_session_id"]), dict(r))
                for r in conn.execute(stmt).mappings()
            )
    return found


def _stale_audited(
    conn: Connection, changes: Sequence[UserChange], identities: dict[Key, Row]
) -> set[tuple[str, str, str]]:
    stale = [
        c for c in changes
        if c.event_id and (held := identities.get((c.provider, c.external_id))) and _older(c, held)
    ]  # fmt: skip
    if not stale:
        return set()
    stmt = select(sync_audit.c.provider, sync_audit.c.external_id, sync_audit.c.event_id).where(
        and_(
            sync_audit.c.action == str(AuditAction.STALE_SKIPPED),
            sync_audit.c.event_id.in_(bindparam("ids", expanding=True)),
        )
    )
    rows = conn.execute(stmt, {"ids": sorted({c.event_id for c in stale if c.event_id})})
    return {(r.provider, r.external_id, r.event_id) for r in rows}


def _older(change: UserChange, held: Row) -> bool:
    stored = held["upstream_updated_at"]
    return change.version is not None and stored is not None and change.version < stored


def _keyed(rows: Iterable[object]) -> dict[Key, Row]:
    out: dict[Key, Row] = {}
    for row in rows:
        data = dict(row)  # type: ignore[call-overload]
        out[(data["provider"], data["external_id"])] = data
    return out


def _chunks(values: Sequence[object]) -> Iterable[list[object]]:
    for start in range(0, len(values), IN_CHUNK):
        yield list(values[start : start + IN_CHUNK])
