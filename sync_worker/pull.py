"""Running a pull: provider pages into engine batches, a cursor committed with each page.

A killed run resumes from the last committed cursor; a page that fails is never applied and
its cursor is never saved. Where the provider says it pays, the next page is read while the
current one is applied (``sync_worker.readahead``). A complete full pass ends with a
reconcile that soft-deletes users missing upstream, unless that would remove more than
``max_delete_fraction`` of them. Its deletions are dated when the run began: a user that was
created or changed since (by a webhook while the pass ran, say) holds a newer version, so the
engine skips its deletion as stale instead of deleting a user the pass could not have seen.
A source that digests its rows (``DigestSource``) hands over only the users whose digest
differs from the one stored by the pass that last applied them (``db.digests``); each page
stores its settled users' digests with its batch.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog
from sqlalchemy import Connection, Engine

from db import setbased as setstore
from db import setstage
from db.cursors import load_cursor, save_cursor
from db.digests import (
    STAGED,
    changed_staged,
    compare_staged,
    create_staged,
    digests_in_order,
    digests_of,
    holds_digests,
    stage_digests,
    store_digests,
    stored_totals,
)
from db.errors import translating
from db.runs import RunStatus, finish_run, start_run
from db.seen import (
    count_live,
    count_unseen,
    count_unseen_compared,
    forget_seen,
    live_ids,
    mark_seen,
    mark_seen_staged,
    unseen_ids,
)
from db.snapshot import refresh_statistics
from db.transaction import transaction
from providers.base import (
    Compared,
    Cursor,
    DigestSource,
    Page,
    Provider,
    RecordError,
)
from sync_worker.changes import Action, ChangeKind, Source, UserChange, utcnow
from sync_worker.digest_sum import DigestSum
from sync_worker.engine import BatchResult, Outcome, Rejected, SyncEngine
from sync_worker.engine.setbased import PerRow, apply_batch, page_bounds
from sync_worker.errors import GuardRefused
from sync_worker.progress import NoProgress, Progress
from sync_worker.readahead import read_ahead, reading_ahead
from sync_worker.runtime import collect_young, collector_paused

log = structlog.get_logger(__name__)

SAMPLE_SIZE = 10
RESUMED_REASON = "the pass resumed from a cursor and did not see every user"
#: Outcomes after which the engine, given the same change again, writes nothing: a user
#: whose every outcome is one of these may store its source digest.
_SETTLED = frozenset(
    {
        Action.CREATED, Action.UPDATED, Action.RESTORED, Action.LINKED,
        Action.UNCHANGED, Action.LOGIN, Action.SESSION_UPDATED,
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileReport:
    live: int
    missing: int
    deleted: int
    refused: bool


@dataclass(slots=True, kw_only=True)
class PullReport:
    """What a pull did. ``counts`` are outcomes of user records, ``sessions`` those of logins
    (new, updated, unchanged, failed), so that a user with two sessions counts once."""

    run_id: uuid.UUID
    provider: str
    kind: str
    started_at: datetime
    counts: Counter[str] = field(default_factory=Counter)
    sessions: Counter[str] = field(default_factory=Counter)
    pages: int = 0
    status: RunStatus = RunStatus.RUNNING
    error: str | None = None
    reconcile: ReconcileReport | None = None
    reconcile_skipped: str | None = None  # why a pass that reached its end did not reconcile
    samples: list[Outcome] = field(default_factory=list)
    path: str = "per_row"  # "set": the pass took the set-based path
    set_created: int = 0  # users the set-based path created in SQL

    def add(self, result: BatchResult) -> None:
        for outcome in result.outcomes:
            if outcome.is_session:
                self.sessions[_SESSION_NAMES.get(outcome.action, str(outcome.action))] += 1
            else:
                self.counts[str(outcome.action)] += 1
            if outcome.changes and len(self.samples) < SAMPLE_SIZE:
                self.samples.append(outcome)

    def add_skipped(self, users: int, sessions: int) -> None:
        """Users (and their sessions) a digest pass skipped as unchanged."""
        if users:
            self.counts[str(Action.UNCHANGED)] += users
        if sessions:
            self.sessions["unchanged"] += sessions

    def flat_counts(self) -> dict[str, int]:
        """One flat mapping (sync_runs.counts, logs): user outcomes, then ``sessions_*``."""
        return {**self.counts, **{f"sessions_{k}": n for k, n in sorted(self.sessions.items())}}


# How a login's outcome reads in the session counts.
_SESSION_NAMES = {Action.LOGIN: "new", Action.SESSION_UPDATED: "updated"}


class PullRunner:
    def __init__(
        self,
        db: Engine,
        engine: SyncEngine,
        provider: Provider,
        *,
        max_delete_fraction: float = 0.2,
        source: Source = Source.BACKFILL,
        progress: Progress | None = None,
        digests: bool = True,
        set_based: bool | None = None,
    ) -> None:
        """``digests``: let a source that digests its rows (``DigestSource``) skip the users
        unchanged since the pass that last applied them (off: every user is mapped).
        ``set_based``: let a full pass of a source that offers one (``SetPassSource``) into
        a PostgreSQL worker take the set-based path: None (the default) on an initial load
        only, i.e. while the worker holds no source digest of the provider (a later pass
        mostly skips unchanged users on their digests, which costs far less than staging
        the source); True on every pass; False never (nor with ``digests`` off): the
        per-row pass, which stays the reference."""
        self.db = db
        self.engine = engine
        self.provider = provider
        self.max_delete_fraction = max_delete_fraction
        self.source = source
        self.progress: Progress = progress or NoProgress()
        self.digests = digests
        self.set_based = set_based

    def run(
        self, *, full: bool = False, dry_run: bool = False, cursor: Cursor | None = None
    ) -> PullReport:
        """Pull from the stored cursor (or ``cursor``, or from scratch when ``full``)."""
        start = None if full else (cursor or load_cursor(self.db, self.provider.name))
        kind = "full" if start is None else "incremental"
        started_at = utcnow()  # before any upstream read of this run
        # A dry run writes nothing at all, not even its sync_runs row: its id only tags logs.
        run_id = uuid.uuid4() if dry_run else start_run(self.db, kind, self.provider.name)
        report = PullReport(
            run_id=run_id, provider=self.provider.name, kind=kind, started_at=started_at
        )
        bound = log.bind(provider=self.provider.name, run_id=str(report.run_id), kind=kind)
        bound.info("pull_started", dry_run=dry_run)
        seen: _Seen = _MemorySeen() if dry_run else _DbSeen(self.db, report.run_id)
        try:
            self._pages(start, full=full, dry_run=dry_run, report=report, seen=seen)
        except BaseException as exc:
            report.status, report.error = RunStatus.FAILED, _describe(exc)
            bound.error("pull_failed", error=report.error, pages=report.pages)
            raise
        else:
            if report.status is RunStatus.RUNNING:
                report.status = RunStatus.DRY_RUN if dry_run else RunStatus.SUCCEEDED
        finally:
            seen.close()
            if not dry_run:
                counts = {**report.flat_counts(), "pages": report.pages}
                finish_run(self.db, report.run_id, report.status, counts, report.error)
        bound.info(
            "pull_finished", status=str(report.status), pages=report.pages, **report.flat_counts()
        )
        if report.reconcile is not None and report.reconcile.refused:
            raise ReconcileRefused(report)  # recorded above; the caller decides what follows
        return report

    def _pages(
        self,
        start: Cursor | None,
        *,
        full: bool,
        dry_run: bool,
        report: PullReport,
        seen: _Seen,
    ) -> None:
        whole = full or start is None
        if not dry_run and self.db.dialect.name == "postgresql":
            # A killed set pass's staging schema goes at the next pass, whatever its path.
            setstage.sweep_orphans(self.db)
        set_pass = None if dry_run else self._set_source(start, whole)
        if set_pass is not None and self._set_pass(set_pass, report=report, seen=seen):
            return
        pending = self._listing(start, whole, seen if isinstance(seen, _DbSeen) else None)
        while True:
            # A page's objects live from its decoding until it is applied, and reference
            # counting frees them then: collections in between would only walk them. One
            # runs after each page instead, when the page is gone.
            with collector_paused():
                page = next(pending, None)
                if page is None:
                    return
                if page.total is not None:
                    self.progress.total(page.total)
                result = self._apply(page, report.run_id, seen, dry_run=dry_run)
                report.add(result)
                report.add_skipped(*page.skipped)
                report.pages += 1
                self.progress.advance(*_records(page))
                complete, partial = page.complete, page.partial_pass
                del page, result
            collect_young()
            self._completed(complete, partial, report=report, seen=seen, dry_run=dry_run)

    def _completed(
        self, complete: bool, partial: bool, *, report: PullReport, seen: _Seen, dry_run: bool
    ) -> None:
        # Stack and Auth.js list every user on every pull; the adapter says when a pass
        # saw everyone (complete, and not resumed halfway), whatever the run's kind.
        if complete and partial:
            report.reconcile_skipped = RESUMED_REASON
            log.info("reconcile_skipped", provider=self.provider.name, reason=RESUMED_REASON)
        elif complete:
            report.reconcile = self._reconcile(report, seen, dry_run=dry_run)

    def _set_source(self, start: Cursor | None, whole: bool) -> SetPassSource | None:
        """The provider's set-based pass, where it offers one and every switch allows it."""
        if self.set_based is False or not self.digests or self.db.dialect.name != "postgresql":
            return None
        offer = getattr(self.provider, "set_pass", None)
        if offer is None:
            return None
        if self.set_based is None and holds_digests(self.db, self.provider.name):
            return None  # not an initial load: the digest pass skips the unchanged users
        found: SetPassSource | None = offer(start, full=whole)
        return found

    def _set_pass(self, source: SetPassSource, *, report: PullReport, seen: _Seen) -> bool:
        """The pass on the set-based path (``sync_worker.engine.setbased``); False if the
        source cannot offer it after all (a column type it does not handle)."""
        relations = source.open()
        if relations is None:
            log.info("set_pass_unavailable", provider=self.provider.name)
            return False
        name = self.provider.name
        report.path = "set"
        # Read in a thread: the source's server produces the next bytes while the worker's
        # consumes these (two cores, not one).
        try:
            parts = source.parts(setstage.FIRST_PART, setstage.PART)
        except BaseException:
            source.close()
            raise
        streams = [
            setstage.SourcePart(
                part.first,
                part.last,
                [
                    (r.name, r.columns, read_ahead(source.copy_out(r), depth=64))
                    for r in part.relations
                ],
            )
            for part in parts
        ]
        with (
            translating(),
            self.db.connect() as conn,
            setstage.staged(
                self.db,
                conn,
                streams,
                provider=name,
                role=self.engine.settings.default_role,  # the creates' audit rows name it
                observed=source.observed,
                max_age_seconds=source.max_age_seconds,
                copied=source.close,  # everything is staged: the source snapshot can end
            ) as staged,
        ):
            columns = {r.name: {c for c, _ in r.columns} for r in relations}
            total = staged.total
            self.progress.total(total)
            log.info("set_pass_staged", provider=name, users=total)
            seen_max = source.seen_per_page

            def nth_changed(start: int, n: int) -> int | None:
                return staged.nth_changed(start, n, min(total, start + seen_max - 1))

            bounds = page_bounds(total, source.batch_size, seen_max, nth_changed)
            for lo, hi, last in bounds:
                with collector_paused():
                    self._set_page(conn, source, lo, hi, last=last, columns=columns, report=report)
                collect_young()
            with conn.begin():  # what follows the pass (webhooks, the next pass) plans
                refresh_statistics(conn)
                if not source.partial:
                    self._seen_staged(conn, seen, report.run_id, total)
        self._completed(True, source.partial, report=report, seen=seen, dry_run=False)
        return True

    def _seen_staged(self, conn: Connection, seen: _Seen, run_id: uuid.UUID, total: int) -> None:
        """Reconcile's counts for a whole set pass, from its staged users (every id it saw,
        still there before they are dropped): its batches record no seen ids. The ids go
        to ``sync_seen`` only where some live user is missing, for reconcile to list."""
        counted = None
        if isinstance(seen, _DbSeen):
            counted = setstore.count_unseen_staged(conn, self.provider.name)
            seen.compared(*counted, applying=False)
        if counted is None or counted[1] > 0:
            mark_seen_staged(conn, run_id, "sw_src_users", "id::text", rows=total)

    def _set_page(
        self,
        conn: Connection,
        source: SetPassSource,
        lo: int,
        hi: int,
        *,
        last: bool,
        columns: Mapping[str, set[str]],
        report: PullReport,
    ) -> None:
        """One batch of the set pass in one transaction: the simple creates in SQL, the
        other changed users through the engine, seen ids, digests and the cursor."""
        name = self.provider.name

        def per_row(changed: Sequence[tuple[int, str, str]]) -> PerRow:
            # The engine's lookups plan by the tables' statistics; the set writes need none,
            # so they are refreshed only when the per-row path is about to look up.
            refresh_statistics(conn)
            users, accounts, sessions = setstore.rows_of(
                conn,
                [position for position, _, _ in changed],
                user_created="created_at" in columns["users"],
                session_created="created_at" in columns["sessions"],
            )
            changes, errors = source.map_users(users, accounts, sessions)
            page = Page(
                changes=changes,
                cursor=None,
                errors=errors,
                digests={e: d for _, e, d in changed},
            )
            rejected = [
                Rejected(provider=name, external_id=e.external_id, reason=e.reason) for e in errors
            ]
            result = self.engine.apply(
                conn, changes, source=self.source, run_id=report.run_id, rejected=rejected
            )
            store_digests(conn, name, _settled(page, result))
            unmapped = {e.external_id for e in errors}
            isolated = any(
                o.action is Action.FAILED and o.external_id not in unmapped for o in result.outcomes
            )
            return PerRow(result=result, isolated=isolated)

        with conn.begin():
            done = apply_batch(
                conn,
                lo,
                hi,
                provider=name,
                settings=self.engine.settings,
                now=self.engine.clock(),
                version=source.observed,
                source=str(self.source),
                run_id=report.run_id,
                per_row=per_row,
            )
            result = done.per_row.result if done.per_row is not None else BatchResult(())
            if last:
                cursor = source.final_cursor()
            elif done.last_external_id is not None:
                cursor = source.cursor_after(done.last_external_id)
            else:
                cursor = None
            if cursor is not None:
                save_cursor(conn, name, cursor, utcnow())
        report.add(result)
        if done.created:
            report.counts[str(Action.CREATED)] += done.created
            report.set_created += done.created
        if done.logins:
            report.sessions["new"] += done.logins
        report.add_skipped(done.skipped_users, done.skipped_sessions)
        report.pages += 1
        logins = sum(1 for o in result.outcomes if o.is_session)
        self.progress.advance(done.users, done.skipped_sessions + done.logins + logins)

    def _listing(self, start: Cursor | None, whole: bool, seen: _DbSeen | None) -> Iterator[Page]:
        """The provider's pages: a digest pass where it offers one, else ``iter_changes``.
        ``seen``: the run's seen ids, which the store may record itself (None: a dry run)."""
        provider = self.provider
        if self.digests and isinstance(provider, DigestSource):
            run_id = None if seen is None else seen.run_id
            known = _Stored(self.db, provider.name, run_id, seen=seen)
            pages = provider.iter_digested(start, full=whole, known=known)
            if pages is not None:
                return pages
        return provider.iter_changes(start, full=whole)

    def _apply(self, page: Page, run_id: uuid.UUID, seen: _Seen, *, dry_run: bool) -> BatchResult:
        """The page's batch, its seen ids, its cursor and its users' source digests in one
        transaction."""
        rejected = [
            Rejected(provider=self.provider.name, external_id=e.external_id, reason=e.reason)
            for e in page.errors
        ]
        with transaction(self.db, rollback=dry_run) as conn:
            if page.changes or rejected:
                result = self.engine.apply(
                    conn, page.changes, source=self.source, run_id=run_id, rejected=rejected
                )
            else:  # a digest pass's page of unchanged users: nothing to hand the engine
                result = BatchResult(())
            if page.digests:
                store_digests(conn, self.provider.name, _settled(page, result))
            ids = seen.ids_to_store(page.seen_ids)
            if ids:
                mark_seen(conn, run_id, ids)
            if page.cursor is not None:
                save_cursor(conn, self.provider.name, page.cursor, utcnow())
        seen.remember(page.seen_ids)
        if result.created and not dry_run:
            self._refresh_statistics()
        return result

    def _refresh_statistics(self) -> None:
        # New users grow the tables the next batch looks up: keep the planner informed.
        with transaction(self.db) as conn:
            refresh_statistics(conn)

    def _reconcile(self, report: PullReport, seen: _Seen, *, dry_run: bool) -> ReconcileReport:
        live, missing = seen.count(self.db, self.provider.name)
        if live > 0 and missing / live > self.max_delete_fraction:
            report.status = RunStatus.FAILED
            report.error = (
                f"reconcile refused: {missing} of {live} {self.provider.name} users "
                f"are missing upstream, more than max_delete_fraction={self.max_delete_fraction}"
            )
            log.error("reconcile_refused", provider=self.provider.name, missing=missing, live=live)
            return ReconcileReport(live=live, missing=missing, deleted=0, refused=True)
        deleted = 0
        # Nothing missing (the usual pass): skip the second set difference over every id.
        missing_ids = seen.missing_ids(self.db, self.provider.name) if missing else []
        for batch in _batched(missing_ids, 500):
            deletions = [
                UserChange(
                    provider=self.provider.name,
                    external_id=e,
                    kind=ChangeKind.DELETE,
                    version=report.started_at,
                )
                for e in batch
            ]
            with transaction(self.db, rollback=dry_run) as conn:
                result = self.engine.apply(
                    conn, deletions, source=self.source, run_id=report.run_id
                )
            report.add(result)
            deleted += result.counts.get("deleted", 0)
        log.info("reconciled", provider=self.provider.name, live=live, deleted=deleted)
        return ReconcileReport(live=live, missing=missing, deleted=deleted, refused=False)


class SetPassSource(Protocol):
    """The source side of a set-based full pass (``providers.authjs_setpass``)."""

    observed: datetime
    partial: bool
    max_age_seconds: float
    batch_size: int
    seen_per_page: int

    def open(self) -> Sequence[Any] | None: ...

    def parts(self, first: int, size: int) -> Sequence[Any]: ...

    def copy_out(self, relation: Any) -> Iterator[bytes]: ...

    def map_users(
        self,
        users: Sequence[dict[str, Any]],
        accounts: Sequence[dict[str, Any]],
        sessions: Sequence[dict[str, Any]],
    ) -> tuple[tuple[UserChange, ...], tuple[RecordError, ...]]: ...

    def cursor_after(self, external_id: str) -> Cursor: ...

    def final_cursor(self) -> Cursor: ...

    def close(self) -> None: ...


class ReconcileRefused(GuardRefused):
    """The deletion guard refused a reconcile; the pass itself was applied and recorded
    (``report``, its sync_runs row failed with the reason)."""

    def __init__(self, report: PullReport) -> None:
        super().__init__(report.error or "reconcile refused")
        self.report = report


class _Stored:
    """The digests stored for the provider, as ``providers.base.StoredDigests``. ``seen``:
    the run's seen ids, told reconcile's counts where the worker compares."""

    def __init__(
        self,
        db: Engine,
        provider: str,
        run_id: uuid.UUID | None,
        *,
        seen: _DbSeen | None = None,
    ) -> None:
        self.db, self.provider, self.run_id = db, provider, run_id
        self.seen = seen

    def held(self) -> bool:
        return holds_digests(self.db, self.provider)

    def in_order(self, *, numeric: bool) -> Iterator[tuple[str, str]]:
        return digests_in_order(self.db, self.provider, numeric=numeric)

    def of(self, external_ids: Sequence[str]) -> Mapping[str, str]:
        return digests_of(self.db, self.provider, external_ids)

    def unchanged(self, summed: Callable[[], DigestSum]) -> Compared | None:
        """On PostgreSQL, outside a dry run: the source's total (``summed``, in a thread)
        against the stored digests' total and the live count, taken meanwhile."""
        if self.run_id is None or self.db.dialect.name != "postgresql":
            return None
        with reading_ahead(_called(summed)) as result, transaction(self.db) as conn:
            stored, live = stored_totals(conn, self.provider)
            source = next(result)
        if source.users != stored.users or stored.users != live or source.total != stored.total:
            log.info(
                "digest_totals_differ",
                provider=self.provider,
                source_users=source.users,
                stored_users=stored.users,
                live=live,
            )
            return None
        if self.seen is not None:
            self.seen.compared(live, 0, applying=False)
        return Compared(users=source.users, changed={}, skipped_sessions=source.sessions)

    def compare(self, digests: Iterable[bytes], *, limit: int) -> Compared | None:
        """On PostgreSQL, in one transaction: the digests copied in, compared, reconcile's
        counts taken (with ``seen``) and every id recorded as seen by the run (unless none
        is missing), with no per-user work in Python. Not for a dry run, whose seen ids
        stay in memory (``_MemorySeen``), nor on SQLite.

        The source is read at once, by a thread; while it computes its digests, the worker
        counts its live identities, then copies the digests in as they come."""
        if self.run_id is None or self.db.dialect.name != "postgresql":
            return None
        live: int | None = None
        with transaction(self.db) as conn:
            create_staged(conn)
            with reading_ahead(digests, depth=4) as blocks:
                if self.seen is not None:
                    live = count_live(conn, self.provider)
                stage_digests(conn, blocks)
            found = compare_staged(conn, self.provider)
            changes = found.users - found.unchanged
            if changes > limit:
                return Compared(users=found.users, changed=None, skipped_sessions=0)
            changed = changed_staged(conn, self.provider) if changes else {}
            counted = None
            if self.seen is not None:
                # Reconcile's counts, here where the seen ids were compared: counting them
                # later means unnesting them all again from sync_seen.
                counted = count_unseen_compared(
                    conn, self.provider, unchanged=found.unchanged, changed=list(changed), live=live
                )
                if counted is not None:
                    self.seen.compared(*counted, applying=bool(changed))
            if counted is None or counted[1] > 0:  # reconcile counts or lists from them
                mark_seen_staged(conn, self.run_id, STAGED, "ext", rows=found.users)
        return Compared(users=found.users, changed=changed, skipped_sessions=found.skipped_sessions)


def _called(summed: Callable[[], DigestSum]) -> Iterator[DigestSum]:
    yield summed()


class _Seen(Protocol):
    """Which upstream ids a full pass has observed."""

    def ids_to_store(self, ids: Iterable[str]) -> list[str]: ...

    def remember(self, ids: Iterable[str]) -> None: ...

    def count(self, db: Engine, provider: str) -> tuple[int, int]:
        """(live users of the provider, how many of them this pass did not see)"""
        ...

    def missing_ids(self, db: Engine, provider: str) -> list[str]: ...

    def close(self) -> None: ...


class _MemorySeen:
    """For dry runs, whose batches (and so their sync_seen rows) are rolled back."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def ids_to_store(self, ids: Iterable[str]) -> list[str]:
        return []

    def remember(self, ids: Iterable[str]) -> None:
        self.ids.update(ids)

    def count(self, db: Engine, provider: str) -> tuple[int, int]:
        live = live_ids(db, provider)
        return len(live), sum(1 for e in live if e not in self.ids)

    def missing_ids(self, db: Engine, provider: str) -> list[str]:
        return [e for e in live_ids(db, provider) if e not in self.ids]

    def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Counted:
    """Reconcile's counts as the worker compared the pass's digests (``_Stored.compare``)."""

    live: int
    missing: int
    applying: bool  # the pass then applies changed users: it may make identities live


class _DbSeen:
    """Stored in sync_seen with each batch, so memory stays flat however many users there are."""

    def __init__(self, db: Engine, run_id: uuid.UUID) -> None:
        self.db, self.run_id = db, run_id
        self.counted: _Counted | None = None

    def compared(self, live: int, missing: int, *, applying: bool) -> None:
        """The pass's every id was seen at once, where ``live`` and ``missing`` were
        counted (``db.seen.count_unseen_compared``)."""
        self.counted = _Counted(live, missing, applying)

    def ids_to_store(self, ids: Iterable[str]) -> list[str]:
        return list(ids)

    def remember(self, ids: Iterable[str]) -> None:
        return None

    def count(self, db: Engine, provider: str) -> tuple[int, int]:
        counted = self.counted
        if counted is None:
            return count_unseen(db, provider, self.run_id)
        if not counted.applying:
            return counted.live, counted.missing
        # The users the pass applied since are all seen: they leave the missing as counted,
        # but the ones it created or restored are live now.
        with translating(), db.connect() as conn:
            return count_live(conn, provider), counted.missing

    def missing_ids(self, db: Engine, provider: str) -> list[str]:
        if self.counted is not None and self.counted.missing == 0:
            return []  # nobody missing, so no seen ids recorded: every live id would be unseen
        return unseen_ids(db, provider, self.run_id)

    def close(self) -> None:
        forget_seen(self.db, self.run_id)


def _settled(page: Page, result: BatchResult) -> dict[str, tuple[str, str]]:
    """``{external_id: (source digest, content hash)}`` of the page's users the engine
    settled: every change of theirs applied or found unchanged, none failed, none stale."""
    digests = page.digests or {}
    unsettled = {e.external_id for e in page.errors}
    unsettled.update(o.external_id for o in result.outcomes if o.action not in _SETTLED)
    return {
        c.external_id: (digests[c.external_id], c.content_hash())
        for c in page.changes
        if c.kind is ChangeKind.UPSERT
        and c.external_id in digests
        and c.external_id not in unsettled
    }


def _records(page: Page) -> tuple[int, int]:
    """(users, sessions) a page holds: its logins are sessions of users counted once; on
    a digest pass, with the users (and sessions) it skipped."""
    users: set[str] = set()
    sessions = page.skipped[1]
    for change in page.changes:
        if change.kind is ChangeKind.LOGIN:
            sessions += 1
        else:
            users.add(change.external_id)
    # A record the adapter could not map is a user, unless it is one of a user's sessions.
    unmapped = sum(1 for e in page.errors if e.external_id is None or e.external_id not in users)
    return len(users) + unmapped + page.skipped[0], sessions


def _batched(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        # The CLI raises a KeyboardInterrupt naming the signal (SIGINT or SIGTERM); a bare
        # one comes from Python's own SIGINT handler.
        return str(exc) or "interrupted by SIGINT"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
