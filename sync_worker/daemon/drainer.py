"""The drainer: stored webhook deliveries into the engine, each batch in one transaction.

One pass (``drain_once``)::

    claim (commit)  ->  decode + re-read users from the IdP (no transaction open)
                    ->  one transaction: hold, engine.apply, complete  (or fail, with backoff)

A claim leases its rows, so rows claimed by a killed process come back when the lease runs
out; ``hold`` keeps a row that another worker took over from being applied twice. The
receiver wakes the drainer after each stored delivery, so it is applied within milliseconds;
other instances find it by polling.

Ordering: Auth0 payloads carry ``updated_at``, and the engine's version guard keeps an older
one from overwriting newer data. Stack and Auth.js payloads carry no version; where the
worker has pull credentials for them, their user events are resolved by re-reading the user
from the IdP (robust against a late retry of an old delivery); otherwise they apply in the
order received, versioned by ``received_at`` and claimed in id order.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Engine

from db import inbox
from db.transaction import transaction
from providers.base import UserLookup
from providers.webhook import Work, WorkDecoder
from sync_worker import config
from sync_worker.changes import ChangeKind, Source, UserChange, utcnow
from sync_worker.engine import BatchResult, SyncEngine
from sync_worker.errors import ProviderError, StoreError, StoreUnavailable, WebhookPayloadError

log = structlog.get_logger(__name__)

#: Providers whose payloads carry no version: re-read where a lookup exists.
REREAD = frozenset({"stack", "authjs"})


#: A claim that came back full means a backlog: the next claims take this many times
#: ``batch_size`` (fewer statements, commits and round trips per row; measured on a
#: 20,000-delivery backlog: 1,750/s in claims of 200, 2,350/s in claims of 1,000).
BACKLOG_FACTOR = 5
#: ... as long as a claim that size, at the pace of the last one, takes at most this share
#: of the lease.
LEASE_SHARE = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainSettings:
    batch_size: int = 100
    #: Rows a claim takes while a backlog lasts (after a full claim); None: BACKLOG_FACTOR x
    #: ``batch_size``, at most what one claim may take.
    backlog_batch_size: int | None = None
    lease: timedelta = timedelta(minutes=5)
    max_attempts: int = 8
    backoff: inbox.Backoff = field(default_factory=inbox.Backoff)
    poll_seconds: float = 1.0  # how often an idle drainer looks for other instances' rows

    @classmethod
    def from_config(cls, config: config.DrainSettings) -> DrainSettings:
        backoff = inbox.Backoff(
            base=timedelta(seconds=config.backoff_seconds),
            cap=timedelta(seconds=max(config.backoff_seconds, config.backoff_max_seconds)),
        )
        return cls(
            batch_size=config.batch_size,
            lease=timedelta(seconds=config.lease_seconds),
            max_attempts=config.max_attempts,
            backoff=backoff,
            poll_seconds=config.poll_seconds,
        )

    @property
    def backlog_batch(self) -> int:
        if self.backlog_batch_size is not None:
            return max(self.batch_size, self.backlog_batch_size)
        return max(self.batch_size, min(BACKLOG_FACTOR * self.batch_size, inbox.MAX_BATCH))


@dataclass(slots=True)
class _Resolved:
    """Claimed rows turned into changes, and the rows that failed on the way."""

    changes: dict[int, list[UserChange]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    poison: dict[int, str] = field(default_factory=dict)


Observer = Callable[[BatchResult, float], None]


class Drainer:
    def __init__(
        self,
        db: Engine,
        engine: SyncEngine,
        decoders: Mapping[str, WorkDecoder],
        lookups: Mapping[str, UserLookup],
        settings: DrainSettings = DrainSettings(),
        *,
        clock: Callable[[], datetime] = utcnow,
        observe: Observer | None = None,
        claiming: Callable[[], None] = lambda: None,
    ) -> None:
        """``claiming`` runs just before each claim: a wake-up that comes after it may be
        for rows that claim does not see (``drain_host`` sends wake-ups only then)."""
        self.db, self.engine = db, engine
        self.claiming = claiming
        self.decoders, self.lookups = decoders, lookups
        self.settings, self.clock = settings, clock
        self.observe = observe or (lambda _result, _seconds: None)
        self.worker = inbox.new_worker_id()
        self.heartbeat = time.monotonic()
        self._wake = threading.Event()
        self._rng = random.Random()
        # Rows claimed but not finished because the database went away: still ours (``hold``
        # checks the claimant, not the lease), so they are finished first once it is back
        # instead of waiting out their lease.
        self._unfinished: list[inbox.InboxRow] = []
        self._limit = settings.batch_size  # rows the next claim takes (larger in a backlog)

    # -- the loop ----------------------------------------------------------------------

    def wake(self) -> None:
        """A delivery was stored: drain now instead of at the next poll."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Drain until ``stop`` is set; the batch in hand is finished first."""
        log.info("drainer_started", worker=self.worker)
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                handled = self.drain_once()
            except StoreError as exc:  # the database is down: wait, then try again
                log.warning("drainer_store_unavailable", error=str(exc))
                handled = 0
            if handled < self.settings.batch_size:
                self._wake.wait(self.settings.poll_seconds)
                self._wake.clear()
        log.info("drainer_stopped", worker=self.worker)

    def drain_once(self) -> int:
        """Claim one batch and see it through; returns the number of rows claimed."""
        if self._unfinished:
            rows, self._unfinished = self._unfinished, []
            self._process(rows)
            return len(rows)
        limit = self._limit
        self.claiming()
        with transaction(self.db) as conn:
            rows = inbox.claim(
                conn,
                limit=limit,
                now=self.clock(),
                lease=self.settings.lease,
                worker=self.worker,
                max_attempts=self.settings.max_attempts,
            )
        self._limit = self.settings.batch_size  # a trickle: small, quick batches
        if not rows:
            return 0
        started = time.monotonic()
        self._process(rows)
        took = time.monotonic() - started
        # Full: more are waiting, so the next claim takes more, provided that a claim that
        # size would still be seen through well within its lease at this pace (re-reading
        # users from an IdP costs a network call each).
        backlog = self.settings.backlog_batch
        fits = took / len(rows) * backlog < self.settings.lease.total_seconds() * LEASE_SHARE
        if len(rows) == limit and fits:
            self._limit = backlog
        return len(rows)

    # -- one batch ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the IdP clients of the lookups (their HTTP sessions)."""
        for lookup in self.lookups.values():
            close = getattr(lookup, "close", None)
            if close is not None:
                close()

    def drain_until(self, deadline: float) -> int:
        """Drain until nothing is due or ``time.monotonic()`` passes ``deadline`` (shutdown:
        what the server acknowledged while stopping is applied before the process exits)."""
        total = 0
        while time.monotonic() < deadline and (claimed := self.drain_once()):
            total += claimed
        return total

    def _process(self, rows: Sequence[inbox.InboxRow]) -> None:
        resolved = self._resolve(rows)
        try:
            self._apply(resolved)
        except StoreUnavailable:
            self._unfinished = list(rows)  # the database went away: finish them when it is back
            raise
        except StoreError as exc:
            # The whole batch failed to write (not one record: the engine isolates those).
            self._fail({i: str(exc) for i in resolved.changes}, resolved.poison)
            raise
        if resolved.errors or resolved.poison:
            self._fail(resolved.errors, resolved.poison)

    def _resolve(self, rows: Sequence[inbox.InboxRow]) -> _Resolved:
        resolved = _Resolved()
        work: dict[int, Work] = {}
        for row in rows:
            try:
                work[row.id] = self._decode(row)
            except WebhookPayloadError as exc:  # it can never be applied: dead at once
                resolved.poison[row.id] = str(exc)
        fetched, failed = self._fetch(rows, work)
        for row in rows:
            item = work.get(row.id)
            if item is None:
                continue
            keys = [(row.provider, e) for e in item.fetch]
            errors = [failed[k] for k in keys if k in failed]
            if errors:
                resolved.errors[row.id] = errors[0]
                continue
            # A re-read user carries the event that asked for it, for the audit trail.
            found = [replace(c, event_id=row.event_id) for k in keys if (c := fetched.get(k))]
            resolved.changes[row.id] = [*item.changes, *found]
        return resolved

    def _decode(self, row: inbox.InboxRow) -> Work:
        decoder = self.decoders.get(row.provider)
        if decoder is None:
            raise WebhookPayloadError(f"no decoder for provider {row.provider!r}")
        work = decoder.to_work(row.payload, event_id=row.event_id, received_at=row.received_at)
        if row.provider in REREAD and row.provider in self.lookups:
            work = _reread(work)
        return work

    def _fetch(
        self, rows: Sequence[inbox.InboxRow], work: Mapping[int, Work]
    ) -> tuple[dict[tuple[str, str], UserChange | None], dict[tuple[str, str], str]]:
        """Re-read each wanted user once (deduplicated across the batch), outside any
        transaction. A user the IdP says is gone becomes a deletion."""
        provider_of = {r.id: r.provider for r in rows}
        wanted: dict[str, set[str]] = defaultdict(set)
        for row_id, item in work.items():
            wanted[provider_of[row_id]].update(item.fetch)
        fetched: dict[tuple[str, str], UserChange | None] = {}
        failed: dict[tuple[str, str], str] = {}
        for provider, ids in wanted.items():
            lookup = self.lookups.get(provider)
            for external_id in sorted(ids):
                key = (provider, external_id)
                if lookup is None:
                    fetched[key] = None  # no API access: the payload's changes stand alone
                    continue
                try:
                    fetched[key] = lookup.fetch_user(external_id) or _gone(key, self.clock())
                except ProviderError as exc:
                    failed[key] = f"{provider}: re-reading a user failed: {exc}"
        return fetched, failed

    def _apply(self, resolved: _Resolved) -> None:
        if not resolved.changes:
            return
        started = time.perf_counter()
        with transaction(self.db) as conn:
            held = inbox.hold(conn, list(resolved.changes), worker=self.worker)
            kept = set(held)  # in the claim's order (received), whatever order hold's is
            batch = [c for i, cs in resolved.changes.items() if i in kept for c in cs]
            results = [self.engine.apply(conn, turn, source=Source.WEBHOOK)
                       for turn in in_turns(batch)]  # fmt: skip
            result = BatchResult(tuple(o for r in results for o in r.outcomes))
            poison = _failed_rows(held, resolved.changes, result)
            inbox.complete(conn, [i for i in held if i not in poison], worker=self.worker,
                           now=self.clock())  # fmt: skip
            if poison:  # a later delivery may mend it (a sign-in before its user): retry
                inbox.fail(conn, poison, worker=self.worker, now=self.clock(), rng=self._rng,
                           max_attempts=self.settings.max_attempts,
                           backoff=self.settings.backoff)  # fmt: skip
        self.observe(result, time.perf_counter() - started)
        log.info("inbox_batch_applied", rows=len(held), changes=len(batch), dead=len(poison))

    def _fail(self, errors: Mapping[int, str], poison: Mapping[int, str]) -> None:
        now = self.clock()
        with transaction(self.db) as conn:
            if errors:
                inbox.fail(conn, errors, worker=self.worker, now=now, rng=self._rng,
                           max_attempts=self.settings.max_attempts,
                           backoff=self.settings.backoff)  # fmt: skip
            if poison:
                inbox.fail(conn, poison, worker=self.worker, now=now, max_attempts=1,
                           backoff=self.settings.backoff)  # fmt: skip
        for row_id, error in {**errors, **poison}.items():
            log.warning("inbox_row_failed", row=row_id, dead=row_id in poison, error=error)


def in_turns(changes: Sequence[UserChange]) -> list[list[UserChange]]:
    """``changes`` in turns the engine applies one after another (in one transaction):
    turn k holds the k-th change of each identity, in the order given.

    Within one call the engine keeps one upsert or delete per identity (the newest; the
    others are audited as superseded). A claim holding a rename and then a delete of one user
    would then leave the deleted user with its old name, where two claims leave it renamed:
    the drainer's batch boundaries would decide the outcome. In turns, every delivery is
    applied as if one at a time, so a claim ends where single deliveries would. A claim of
    distinct users, the usual case, is one turn."""
    turns: list[list[UserChange]] = []
    seen: defaultdict[tuple[str, str], int] = defaultdict(int)
    for change in changes:
        key = (change.provider, change.external_id)
        turn = seen[key]
        seen[key] = turn + 1
        if turn == len(turns):
            turns.append([])
        turns[turn].append(change)
    return turns


def _reread(work: Work) -> Work:
    """User events of a provider without versions: re-read the user instead of trusting
    the payload; logins and sessions stay as delivered."""
    users = [c for c in work.changes if c.kind is not ChangeKind.LOGIN]
    kept = tuple(c for c in work.changes if c.kind is ChangeKind.LOGIN)
    fetch = tuple(dict.fromkeys([*work.fetch, *(c.external_id for c in users)]))
    return Work(changes=kept, fetch=fetch)


def _gone(key: tuple[str, str], now: datetime) -> UserChange:
    provider, external_id = key
    return UserChange(provider=provider, external_id=external_id, kind=ChangeKind.DELETE,
                      version=now)  # fmt: skip


def _failed_rows(
    held: Iterable[int], changes: Mapping[int, list[UserChange]], result: BatchResult
) -> dict[int, str]:
    """Rows whose own changes the engine isolated as failed records: retried with backoff,
    dead after max_attempts (``replay`` brings them back once the cause is fixed)."""
    failed = {(o.provider, o.external_id): o.error or "failed" for o in result.failures}
    poison: dict[int, str] = {}
    for row_id in held:
        for change in changes[row_id]:
            reason = failed.get((change.provider, change.external_id))
            if reason is not None:
                poison[row_id] = reason
                break
    return poison
