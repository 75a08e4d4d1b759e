"""The profile-sync engine: applies a batch of normalized changes in one transaction.

Every path (pulls, webhooks, CLI) ends in ``SyncEngine.apply``. A batch is validated and
deduplicated, the rows it touches are loaded with a few set queries, ``plan`` decides the
writes, and they run as a few multi-row statements. A pull's cursor is saved in the same
transaction. A record the database refuses is isolated by bisecting the batch inside
savepoints; it is recorded as failed and the rest commits.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, update
from sqlalchemy.exc import DataError, IntegrityError

from db.lookup import among
from db.tables import profiles, sync_audit, user_identities, user_sessions, users
from db.upsert import insert_rows, upsert_rows
from sync_worker import plan as planning
from sync_worker import snapshot as snapshots
from sync_worker.changes import AuditAction, ChangeKind, Source, UserChange, utcnow
from sync_worker.config import Settings
from sync_worker.runtime import collector_paused
from sync_worker.state import mark_seen, save_cursor
from sync_worker.validate import problem

log = structlog.get_logger(__name__)

_IDENTITY_UPDATE = [
    c.name
    for c in user_identities.columns
    if c.name not in ("provider", "external_id", "first_seen_at")
]
_SESSION_UPDATE = ["user_id", "ip", "user_agent", "last_seen_at", "expires_at", "revoked_at"]


@dataclass(frozen=True, slots=True)
class BatchResult:
    outcomes: tuple[planning.Outcome, ...]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(o.action for o in self.outcomes))

    @property
    def failures(self) -> list[planning.Outcome]:
        return [o for o in self.outcomes if o.action == "failed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CursorUpdate:
    provider: str
    cursor: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """An upstream record that could not be mapped to a change."""

    provider: str
    external_id: str | None
    reason: str
    event_id: str | None = None

    def as_change(self) -> UserChange:
        return UserChange(
            provider=self.provider,
            external_id=self.external_id or "",
            kind=ChangeKind.UPSERT,
            event_id=self.event_id,
        )


@dataclass(slots=True)
class _Context:
    source: Source
    run_id: uuid.UUID | None
    now: datetime
    failed_audit: list[planning.Row] = field(default_factory=list)


class SyncEngine:
    def __init__(
        self,
        db: Engine,
        settings: planning.PlanSettings,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock

    @classmethod
    def from_settings(cls, db: Engine, settings: Settings) -> SyncEngine:
        return cls(db, plan_settings(settings))

    def apply(
        self,
        changes: Sequence[UserChange],
        *,
        source: Source,
        run_id: uuid.UUID | None = None,
        cursor: CursorUpdate | None = None,
        rejected: Sequence[Rejected] = (),
        seen: Sequence[str] = (),
        dry_run: bool = False,
    ) -> BatchResult:
        """Apply a batch in one transaction (rolled back instead when ``dry_run``).

        ``rejected`` are upstream records the adapter could not map: recorded as failed in
        the same transaction. ``seen`` are upstream ids a full pass observed (for reconcile).
        """
        with self.db.connect() as conn:
            transaction = conn.begin()
            try:
                result = self.apply_in(
                    conn, changes, source=source, run_id=run_id, rejected=rejected
                )
                if seen and run_id is not None:
                    mark_seen(conn, run_id, seen)
                if cursor is not None:
                    save_cursor(conn, cursor.provider, cursor.cursor, self.clock())
            except BaseException:
                transaction.rollback()
                raise
            if dry_run:
                transaction.rollback()
            else:
                transaction.commit()
        log.info("batch_applied", source=str(source), dry_run=dry_run, **result.counts)
        if not dry_run and result.counts.get(AuditAction.CREATED):
            # New users grow the tables the next batch looks up: keep the planner informed.
            with self.db.begin() as conn:
                snapshots.refresh_statistics(conn)
        return result

    def apply_in(
        self,
        conn: Connection,
        changes: Sequence[UserChange],
        *,
        source: Source,
        run_id: uuid.UUID | None = None,
        rejected: Sequence[Rejected] = (),
    ) -> BatchResult:
        """Apply a batch inside the caller's open transaction."""
        with collector_paused():
            return self._apply_batch(conn, changes, source, run_id, rejected)

    def _apply_batch(
        self,
        conn: Connection,
        changes: Sequence[UserChange],
        source: Source,
        run_id: uuid.UUID | None,
        rejected: Sequence[Rejected],
    ) -> BatchResult:
        ctx = _Context(source, run_id, self.clock())
        outcomes: list[planning.Outcome] = []
        for reject in rejected:
            self._record_failure(ctx, outcomes, reject.as_change(), reject.reason)
        valid: list[UserChange] = []
        for change in changes:
            reason = problem(change)
            if reason is None:
                valid.append(change)
            else:
                self._record_failure(ctx, outcomes, change, reason)
        outcomes += self._isolating(conn, planning.dedupe(valid), ctx)
        if ctx.failed_audit:
            _insert_audit(conn, ctx.failed_audit, ctx)
        return BatchResult(tuple(outcomes))

    def _isolating(
        self, conn: Connection, changes: list[UserChange], ctx: _Context
    ) -> list[planning.Outcome]:
        if not changes:
            return []
        try:
            with conn.begin_nested():
                return self._apply_once(conn, changes, ctx)
        except (IntegrityError, DataError) as exc:
            if len(changes) == 1:
                outcomes: list[planning.Outcome] = []
                self._record_failure(ctx, outcomes, changes[0], _reason(exc))
                return outcomes
            middle = len(changes) // 2
            return self._isolating(conn, changes[:middle], ctx) + self._isolating(
                conn, changes[middle:], ctx
            )

    def _apply_once(
        self, conn: Connection, changes: list[UserChange], ctx: _Context
    ) -> list[planning.Outcome]:
        snapshots.lock_writers(conn)
        identities = snapshots.load_identities(conn, changes)
        triaged = snapshots.triage(changes, identities)
        if not triaged.todo:
            return triaged.noop
        snap = snapshots.load_snapshot(
            conn, triaged.todo, identities, link_by_email=self.settings.link_by_verified_email
        )
        decided = planning.plan(triaged.todo, snap, self.settings, ctx.now)
        _execute(conn, decided, ctx)
        return triaged.noop + decided.outcomes

    def _record_failure(
        self, ctx: _Context, outcomes: list[planning.Outcome], change: UserChange, reason: str
    ) -> None:
        outcome, row = planning.failure(change, reason)
        outcomes.append(outcome)
        ctx.failed_audit.append(row)
        log.warning(
            "record_failed", provider=change.provider, external_id=change.external_id, reason=reason
        )


def plan_settings(settings: Settings) -> planning.PlanSettings:
    return planning.PlanSettings(
        link_by_verified_email=settings.sync.link_by_verified_email,
        profile_defaults=dict(settings.profile.defaults),
        profile_overwrite=frozenset(settings.profile.overwrite),
        default_role=settings.users.default_role,
    )


def _execute(conn: Connection, decided: planning.Plan, ctx: _Context) -> None:
    insert_rows(conn, users, decided.new_users)
    for group in decided.user_updates:
        upsert_rows(conn, users, group.rows, conflict=["id"], update=group.columns)
    insert_rows(conn, profiles, decided.new_profiles)
    for group in decided.profile_updates:
        upsert_rows(conn, profiles, group.rows, conflict=["user_id"], update=group.columns)
    insert_rows(conn, user_identities, decided.new_identities)
    upsert_rows(
        conn,
        user_identities,
        decided.identity_updates,
        conflict=["provider", "external_id"],
        update=_IDENTITY_UPDATE,
    )
    upsert_rows(
        conn,
        user_sessions,
        decided.sessions,
        conflict=["provider", "external_session_id"],
        update=_SESSION_UPDATE,
    )
    _revoke_sessions(conn, decided.revoke_sessions_of, ctx.now)
    _insert_audit(conn, decided.audit, ctx)


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


def _insert_audit(conn: Connection, rows: list[planning.Row], ctx: _Context) -> None:
    stamped = [
        {**row, "occurred_at": ctx.now, "run_id": ctx.run_id, "source": str(ctx.source)}
        for row in rows
    ]
    insert_rows(conn, sync_audit, stamped)


def _reason(exc: IntegrityError | DataError) -> str:
    # The first line names the constraint; later lines (DETAIL) can echo personal data.
    message = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    return f"database refused the record: {message}"
