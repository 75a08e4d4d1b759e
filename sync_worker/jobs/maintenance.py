"""The housekeeping jobs: profile backfill, session cleanup and retention.

Plain functions over the worker's engine, called alike by the CLI commands and the
scheduler; recording a ``sync_runs`` row is the caller's business. Each works in bounded
batches, one transaction per batch, so a job never holds locks for long and a killed one
keeps what it committed (and a rerun carries on: every job is idempotent). Counts come back
as a dict for the run's ``counts``; logs carry counts, never personal data.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Engine

from db import audit_retention, inbox, profile_backfill, session_cleanup
from db.errors import translating
from db.transaction import transaction
from sync_worker.changes import Source
from sync_worker.config import RetentionSettings

if TYPE_CHECKING:
    from providers.authjs import AuthjsProvider

__all__ = ["MAX_BATCH", "backfill_profiles", "cleanup_sessions", "purge_retention"]

#: Rows per transaction at most: ids go back as one parameter each on SQLite, and the inbox
#: purge takes no more (``db.inbox.MAX_BATCH``).
MAX_BATCH = inbox.MAX_BATCH

log = structlog.get_logger(__name__)


def backfill_profiles(
    db: Engine,
    *,
    defaults: Mapping[str, Any],
    batch_size: int,
    now: datetime,
    run_id: uuid.UUID | None = None,
) -> dict[str, int]:
    """Give every user without a profile one, with ``defaults`` (``profile.defaults``).

    ``display_name`` and ``avatar_url`` come from the user. Each profile created is audited
    (action ``profile_created``, source ``backfill``, its fields as changes, the run's
    ``run_id``). A second run creates none. Returns ``{"created": n, "users": total users}``.
    """
    _check_batch(batch_size)
    created = 0
    after: uuid.UUID | None = None
    while True:
        with transaction(db) as conn:
            bare = profile_backfill.users_without_profile(conn, after=after, limit=batch_size)
            made = profile_backfill.create_profiles(
                conn, bare, defaults=defaults, now=now, source=str(Source.BACKFILL), run_id=run_id
            )
        created += len(made)
        if len(bare) < batch_size:
            break
        after = bare[-1].id
    with transaction(db) as conn:
        users = profile_backfill.count_users(conn)
    log.info("profiles_backfilled", created=created, users=users)
    return {"created": created, "users": users}


def cleanup_sessions(
    db: Engine,
    *,
    older_than: datetime,
    batch_size: int,
    authjs: AuthjsProvider | None,
    idle_before: datetime | None = None,
) -> dict[str, int]:
    """Delete ``user_sessions`` rows that expired or were revoked before ``older_than``, and
    (``idle_before``) rows stating neither an expiry nor a revocation last seen before it.

    With ``authjs``, also delete the rows of the Auth.js app's own sessions table that
    expired before ``older_than`` (Auth.js never does), through the adapter. Live sessions
    are never touched. Returns ``{"deleted": n, "authjs_deleted": m}``.
    """
    _check_batch(batch_size)
    deleted = _delete_expired(db, older_than, batch_size)
    deleted += _delete_revoked(db, older_than, batch_size, idle_before)
    authjs_deleted = 0 if authjs is None else _delete_authjs(authjs, older_than, batch_size)
    log.info("sessions_cleaned", deleted=deleted, authjs_deleted=authjs_deleted)
    return {"deleted": deleted, "authjs_deleted": authjs_deleted}


def purge_retention(
    db: Engine, *, audit_before: datetime | None, inbox_done_before: datetime, batch_size: int
) -> dict[str, int]:
    """Delete audit rows older than ``audit_before`` (None keeps them all) and done or
    ignored inbox rows processed before ``inbox_done_before``.

    Pending, failed and dead inbox rows are never purged, whatever their age. Returns
    ``{"audit_deleted": n, "inbox_deleted": m}``.
    """
    _check_batch(batch_size)
    audit_deleted = 0 if audit_before is None else _purge_audit(db, audit_before, batch_size)
    with translating():
        inbox_deleted = inbox.purge_done_in_batches(
            db, older_than=inbox_done_before, batch=batch_size
        )
    log.info("retention_purged", audit_deleted=audit_deleted, inbox_deleted=inbox_deleted)
    return {"audit_deleted": audit_deleted, "inbox_deleted": inbox_deleted}


# -- the batches --------------------------------------------------------------------------


def _delete_expired(db: Engine, before: datetime, batch_size: int) -> int:
    total = 0
    while True:
        with transaction(db) as conn:
            count = session_cleanup.delete_expired(conn, before=before, limit=batch_size)
        total += count
        if count < batch_size:
            return total


def _delete_revoked(
    db: Engine, before: datetime, batch_size: int, idle_before: datetime | None
) -> int:
    # Walks every window: ids are random, revoked rows may be anywhere.
    total = 0
    after: uuid.UUID | None = None
    while True:
        with transaction(db) as conn:
            count, after = session_cleanup.delete_revoked_window(
                conn, before=before, after=after, size=batch_size, idle_before=idle_before
            )
        total += count
        if after is None:
            return total


def _delete_authjs(authjs: AuthjsProvider, before: datetime, batch_size: int) -> int:
    total = 0
    while True:
        count = authjs.delete_expired_sessions(before, limit=batch_size)
        total += count
        if count < batch_size:
            return total


def _purge_audit(db: Engine, before: datetime, batch_size: int) -> int:
    # Oldest ids first, until a window holds nothing old enough (see db.audit_retention).
    total = 0
    after: int | None = None
    while True:
        with transaction(db) as conn:
            count, after = audit_retention.purge_window(
                conn, before=before, after=after, size=batch_size
            )
        total += count
        if after is None or count == 0:
            return total


def idle_cutoff(retention: RetentionSettings, now: datetime) -> datetime | None:
    """Before when a session stating no expiry was last seen to be deleted: idle for
    ``retention.idle_sessions`` (it ended), then kept ``retention.sessions`` like any other."""
    if retention.idle_sessions is None:
        return None
    return now - timedelta(seconds=retention.idle_sessions + retention.sessions)


def _check_batch(batch_size: int) -> None:
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be 1 to {MAX_BATCH}")
