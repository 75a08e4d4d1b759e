"""One tick of one job, run exactly once across every instance sharing the database.

For each provider the job runs for::

    claim_tick (commit)  --lost-->  another instance runs it: nothing to do
        | won
    job_lock  --busy-->  a run holding the job's lock is still going (here or elsewhere):
        |                 tick skipped
        | held
    earlier ticks of the job still 'running' (their process died): marked failed
    run the job  ->  sync_runs row (the job's own, or one written here), finish_tick, metric

Each provider's run stands alone: one failing does not keep the next from running. A run
that fails is recorded failed with its error; no exception of a job, nor a database that
cannot be reached, escapes ``run``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from prometheus_client import Counter
from sqlalchemy import Engine
from structlog.typing import FilteringBoundLogger

from db import ledger
from db.ledger import TickStatus
from db.runs import PASS_KINDS, RunStatus, abandon_runs, finish_run, start_run
from db.transaction import transaction
from sync_worker.changes import utcnow
from sync_worker.config import Settings
from sync_worker.errors import StoreError
from sync_worker.jobs.base import Job, JobContext

log = structlog.get_logger(__name__)

#: Outcome of one (tick, provider) here: ``taken`` means another instance claimed it.
TAKEN = "taken"
PREVIOUS_RUNNING = "a run holding the job's lock is still going"


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    job: str
    provider: str | None
    scheduled_at: datetime
    status: str  # a TickStatus, or TAKEN
    run_id: uuid.UUID | None = None
    error: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Tick:
    job: Job
    provider: str | None
    scheduled_at: datetime

    def outcome(
        self,
        status: str,
        *,
        run_id: uuid.UUID | None = None,
        error: str | None = None,
        counts: Mapping[str, int] | None = None,
    ) -> Outcome:
        return Outcome(
            job=self.job.name,
            provider=self.provider,
            scheduled_at=self.scheduled_at,
            status=str(status),
            run_id=run_id,
            error=error,
            counts=counts or {},
        )


class TickRunner:
    def __init__(
        self,
        db: Engine,
        settings: Settings,
        job_runs: Counter,
        *,
        instance: str,
        stop: threading.Event,
        wake_drainer: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db, self.settings, self.job_runs = db, settings, job_runs
        self.instance, self.stop, self.wake_drainer = instance, stop, wake_drainer
        self.clock = clock

    def run(self, job: Job, scheduled_at: datetime) -> list[Outcome]:
        """Run the tick for every provider of the job (those this instance wins)."""
        return [self.run_one(job, p, scheduled_at) for p in job.providers(self.settings)]

    def run_one(self, job: Job, provider: str | None, scheduled_at: datetime) -> Outcome:
        tick = _Tick(job, provider, scheduled_at)
        bound = log.bind(job=job.name, provider=provider, tick=scheduled_at.isoformat())
        try:
            return self._claimed(tick, bound)
        except StoreError as exc:  # the ledger is unreachable: no instance can run it now
            bound.error("job_tick_unrecorded", error=str(exc))
            self.job_runs.labels(job=job.name, status=str(TickStatus.FAILED)).inc()
            return tick.outcome(TickStatus.FAILED, error=str(exc))

    def _claimed(self, tick: _Tick, bound: FilteringBoundLogger) -> Outcome:
        job, provider = tick.job, tick.provider
        with transaction(self.db) as conn:
            won = ledger.claim_tick(
                conn,
                job.name,
                provider,
                tick.scheduled_at,
                instance=self.instance,
                now=self.clock(),
            )
        if not won:
            bound.debug("job_tick_taken")
            return tick.outcome(TAKEN)
        with ledger.job_lock(self.db, job.lock, provider) as held:
            if held:
                self._abandon_earlier(tick, bound)
                outcome = self._execute(tick, bound)
            else:
                outcome = tick.outcome(TickStatus.SKIPPED, error=PREVIOUS_RUNNING)
                bound.warning("job_tick_skipped", reason=PREVIOUS_RUNNING)
        self._finish(outcome, bound)
        return outcome

    def _abandon_earlier(self, tick: _Tick, bound: FilteringBoundLogger) -> None:
        """Earlier ticks of the job still ``running``, and on PostgreSQL the runs of its kind,
        died with their process: with the lock held, none of them can be going
        (``ledger.abandon_ticks``, ``runs.abandon_runs``)."""
        job, now = tick.job, self.clock()
        # A pull records its run as the pass it made; other jobs under their own name.
        kinds = PASS_KINDS if job.records_own_run else (job.name,)
        with transaction(self.db) as conn:
            ticks = ledger.abandon_ticks(
                conn, job.name, tick.provider, before=tick.scheduled_at, now=now
            )
            runs = 0
            if ledger.locks_across_processes(self.db):
                runs = abandon_runs(conn, kinds, tick.provider, before=now, now=now)
        if ticks or runs:
            bound.warning("job_runs_abandoned", ticks=ticks, runs=runs, reason=ledger.ABANDONED)

    def _execute(self, tick: _Tick, bound: FilteringBoundLogger) -> Outcome:
        job = tick.job
        ctx = JobContext(
            db=self.db,
            settings=self.settings,
            now=self.clock(),
            scheduled_at=tick.scheduled_at,
            log=bound,
            stop=self.stop,
            wake_drainer=self.wake_drainer,
        )
        counts: dict[str, int] = {}
        error: str | None = None
        try:
            if not job.records_own_run:
                ctx.run_id = start_run(self.db, job.name, tick.provider)
            bound.debug("job_started")
            counts = dict(job.run(ctx, tick.provider))
        except Exception as exc:
            error = describe(exc)
            bound.error("job_failed", error=error)
        else:
            bound.info("job_finished", **counts)
        status = TickStatus.SUCCEEDED if error is None else TickStatus.FAILED
        if not job.records_own_run and ctx.run_id is not None:
            self._record_run(ctx.run_id, counts, error, bound)
        return tick.outcome(status, run_id=ctx.run_id, error=error, counts=counts)

    def _record_run(
        self,
        run_id: uuid.UUID,
        counts: Mapping[str, int],
        error: str | None,
        bound: FilteringBoundLogger,
    ) -> None:
        status = RunStatus.SUCCEEDED if error is None else RunStatus.FAILED
        try:
            finish_run(self.db, run_id, status, counts, error)
        except StoreError as exc:  # the tick's own record may still get through
            bound.error("job_run_unrecorded", error=str(exc))

    def _finish(self, outcome: Outcome, bound: FilteringBoundLogger) -> None:
        self.job_runs.labels(job=outcome.job, status=outcome.status).inc()
        try:
            with transaction(self.db) as conn:
                ledger.finish_tick(
                    conn,
                    outcome.job,
                    outcome.provider,
                    outcome.scheduled_at,
                    instance=self.instance,
                    status=TickStatus(outcome.status),
                    now=self.clock(),
                    run_id=outcome.run_id,
                    error=outcome.error,
                )
        except StoreError as exc:  # the tick stays 'running' in the ledger; it did run
            bound.error("job_tick_unrecorded", error=str(exc))


def describe(exc: BaseException) -> str:
    """An exception as a run's error: its type, then its message if it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
