"""The profile-sync engine: applies a batch of normalized changes inside its caller's transaction.

Every path (pulls, webhooks, CLI) ends in ``SyncEngine.apply(conn, changes, ...)``. The
caller owns the transaction, so it can commit what belongs with the batch in the same one (a
pull's cursor, a drainer's inbox rows). A batch is validated and deduplicated; unchanged
upserts and logins are set aside on two cheap reads (identities without ``raw``, and
sessions); the rows the rest touch are loaded with a few set queries (``db.snapshot``),
``plan`` decides the writes and ``db.writes`` runs them as a few multi-row statements. A
record the database refuses is isolated by bisecting the batch inside savepoints; it is
recorded as failed and the rest commits.

On PostgreSQL a batch with at least ``bulk_threshold`` changes left after triage first
writes its simple creates through the bulk path (``engine.bulk``, ``db.bulk``: rows straight
to COPY), then plans the rest as above, in the same savepoint. If the database refuses any
of it, the batch is applied again without the bulk path, which bisects as always.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from sqlalchemy import Connection

from db import bulk as bulk_store
from db import snapshot as store
from db.rows import AuditRow, IdentityRow, Key, SessionRow
from db.writes import Stamp, append_audit, write
from sync_worker.changes import Action, ChangeKind, Source, UserChange, utcnow
from sync_worker.config import Settings
from sync_worker.engine import bulk
from sync_worker.engine.ids import time_ordered_id, time_ordered_ids
from sync_worker.engine.plan import (
    Outcome,
    PlanSettings,
    audit_row,
    dedupe,
    failure,
    json_value,
    older,
    plan,
    superseded,
    triage,
)
from sync_worker.engine.validate import problem
from sync_worker.errors import RecordRefused
from sync_worker.runtime import collector_paused

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BatchResult:
    outcomes: tuple[Outcome, ...]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(str(o.action) for o in self.outcomes))

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action is Action.FAILED]

    @property
    def created(self) -> int:
        return sum(1 for o in self.outcomes if o.action is Action.CREATED)


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
class _Batch:
    stamp: Stamp
    outcomes: list[Outcome] = field(default_factory=list)
    #: audit rows of changes that never reach the planner: refused, or superseded in the batch
    audit_apart: list[AuditRow] = field(default_factory=list)


class SyncEngine:
    def __init__(
        self,
        settings: PlanSettings,
        *,
        clock: Callable[[], datetime] = utcnow,
        new_id: Callable[[], uuid.UUID] = time_ordered_id,
        bulk_threshold: int | None = None,
    ) -> None:
        """``bulk_threshold``: changes left after triage from which a batch takes the bulk
        create path on PostgreSQL (None: ``engine.bulk.THRESHOLD``, read now)."""
        self.settings = settings
        self.clock = clock
        self.new_id = new_id
        self.bulk_threshold = bulk.THRESHOLD if bulk_threshold is None else bulk_threshold

    @classmethod
    def from_settings(cls, settings: Settings) -> SyncEngine:
        return cls(plan_settings(settings))

    def apply(
        self,
        conn: Connection,
        changes: Sequence[UserChange],
        *,
        source: Source,
        run_id: uuid.UUID | None = None,
        rejected: Sequence[Rejected] = (),
    ) -> BatchResult:
        """Apply a batch inside the caller's open transaction; the caller commits.

        ``rejected`` are upstream records the adapter could not map: recorded as failed in
        the same transaction. Raises StoreError (never a driver error) when the database
        fails as a whole; a single refused record is isolated instead.
        """
        with collector_paused(), store.planned_per_run(conn):
            batch = _Batch(Stamp(now=self.clock(), source=str(source), run_id=run_id))
            for reject in rejected:
                self._record_failure(batch, reject.as_change(), reject.reason)
            valid = [c for c in changes if self._valid(batch, c)]
            kept = dedupe(valid)
            batch.outcomes += self._isolating(conn, kept, batch)
            self._record_superseded(batch, superseded(valid, kept))
            if batch.audit_apart:
                append_audit(conn, batch.audit_apart, batch.stamp)
        result = BatchResult(tuple(batch.outcomes))
        log.info("batch_applied", source=str(source), **result.counts)
        return result

    def _valid(self, batch: _Batch, change: UserChange) -> bool:
        reason = problem(change)
        if reason is not None:
            self._record_failure(batch, change, reason)
        return reason is None

    def _isolating(
        self, conn: Connection, changes: list[UserChange], batch: _Batch, *, bulk: bool = True
    ) -> list[Outcome]:
        if not changes:
            return []
        use_bulk = bulk and len(changes) >= self.bulk_threshold
        try:
            with conn.begin_nested():
                return self._apply_once(conn, changes, batch.stamp, bulk=use_bulk)
        except RecordRefused as exc:
            if use_bulk:  # the per-row path finds the refused record
                return self._isolating(conn, changes, batch, bulk=False)
            if len(changes) == 1:
                outcomes: list[Outcome] = []
                self._record_failure(batch, changes[0], str(exc), outcomes)
                return outcomes
            middle = len(changes) // 2
            return self._isolating(conn, changes[:middle], batch, bulk=False) + self._isolating(
                conn, changes[middle:], batch, bulk=False
            )

    def _apply_once(
        self, conn: Connection, changes: list[UserChange], stamp: Stamp, *, bulk: bool
    ) -> list[Outcome]:
        store.lock_writers(conn)
        identities = store.load_identities(conn, changes)
        sessions = store.load_sessions(conn, changes)
        noop, todo = triage(changes, identities, sessions, stamp.now)
        if bulk and len(todo) >= self.bulk_threshold and todo and conn.dialect.name == "postgresql":
            created, todo = self._bulk_creates(conn, todo, identities, sessions, stamp)
            noop += created
            if created and todo:  # the rest may log in to a user just created
                identities = store.load_identities(conn, todo)
                sessions = store.load_sessions(conn, todo)
        if not todo:
            return noop
        stale = [c for c in todo if c.event_id and _is_stale(c, identities)]
        snap = store.load_snapshot(
            conn,
            todo,
            identities,
            link_by_email=self.settings.link_by_verified_email,
            stale=stale,
            sessions=sessions,
        )
        decided = plan(todo, snap, self.settings, stamp.now, self.new_id)
        write(conn, decided.writes, stamp)
        return noop + decided.outcomes

    def _bulk_creates(
        self,
        conn: Connection,
        todo: list[UserChange],
        identities: Mapping[Key, IdentityRow],
        sessions: Mapping[Key, SessionRow],
        stamp: Stamp,
    ) -> tuple[list[Outcome], list[UserChange]]:
        """Write the batch's simple creates; (their outcomes, the changes left to plan)."""
        link = self.settings.link_by_verified_email
        wanted = bulk.candidates(todo, identities, link=link)
        creates, logins, rest = bulk.split(
            todo,
            identities,
            sessions,
            link=link,
            owned_emails=bulk_store.owned_emails(conn, wanted.emails) if wanted.emails else (),
            stored_linked=bulk_store.stored_keys(conn, wanted.linked) if wanted.linked else (),
        )
        if not creates:
            return [], todo
        rows = bulk.BulkPlan(creates, logins, self.settings, stamp.now, self._new_ids)
        bulk_store.write_creates(  # consumes the lazy row iterators, table by table
            conn,
            users_rows=rows.users,
            profile_rows=rows.profiles(),
            identity_rows=rows.identities(),
            session_rows=rows.sessions(),
            audit_rows=rows.audit(),
            stamp=stamp,
        )
        return rows.outcomes, rest

    def _new_ids(self, count: int) -> list[uuid.UUID]:
        if self.new_id is time_ordered_id:
            return time_ordered_ids(count)
        return [self.new_id() for _ in range(count)]

    def _record_superseded(
        self, batch: _Batch, dropped: Sequence[tuple[UserChange, UserChange]]
    ) -> None:
        users = {(o.provider, o.external_id): o.user_id for o in batch.outcomes
                 if not o.is_session}  # fmt: skip
        audited: set[tuple[str, str, str]] = set()
        for change, winner in dropped:
            user_id = users.get((change.provider, change.external_id))
            batch.outcomes.append(Outcome.of(change, Action.STALE_SKIPPED, user_id))
            marker = (change.provider, change.external_id, change.event_id or "")
            if change.event_id and change.event_id != winner.event_id and marker not in audited:
                audited.add(marker)
                diff = {"upstream_updated_at": [json_value(winner.version),
                                                json_value(change.version)]}  # fmt: skip
                batch.audit_apart.append(audit_row(change, Action.STALE_SKIPPED, user_id, diff))

    def _record_failure(
        self,
        batch: _Batch,
        change: UserChange,
        reason: str,
        outcomes: list[Outcome] | None = None,
    ) -> None:
        outcome, row = failure(change, reason)
        (batch.outcomes if outcomes is None else outcomes).append(outcome)
        batch.audit_apart.append(row)
        log.warning(
            "record_failed", provider=change.provider, external_id=change.external_id, reason=reason
        )


def _is_stale(change: UserChange, identities: Mapping[Key, IdentityRow]) -> bool:
    held = identities.get((change.provider, change.external_id))
    return held is not None and older(change.version, held["upstream_updated_at"])


def plan_settings(settings: Settings) -> PlanSettings:
    return PlanSettings(
        link_by_verified_email=settings.sync.link_by_verified_email,
        profile_defaults=dict(settings.profile.defaults),
        profile_overwrite=frozenset(settings.profile.overwrite),
        default_role=settings.users.default_role,
    )
