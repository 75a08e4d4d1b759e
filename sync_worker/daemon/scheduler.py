"""The daemon's scheduler: APScheduler 3 fires each job's ticks; the ledger runs each once.

APScheduler 3 cannot share a job store between processes (its maintainer: duplicate or
missed runs), so every instance keeps the whole schedule in memory and fires every tick,
and the database decides who runs it (``sync_worker.jobs.ticks``): the ledger's primary key
lets one instance claim a tick, an advisory lock per (job, provider) keeps a run that
outlasts its interval from being started again, here or in another instance.

APScheduler's options are set, not left to defaults: UTC; ``coalesce`` (ticks missed while
the process was busy or asleep run once, not once each); ``max_instances=1``; and
``misfire_grace_time`` from ``jobs.misfire_grace`` (the default of 1 s silently drops a
fire that is a second late). At start, a tick missed while every instance was down runs
once at once (``catch_up_tick``). A heartbeat job runs in the scheduler's own thread, so
its age tells /readyz whether that loop still turns.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.executors.debug import DebugExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import Counter
from sqlalchemy import Engine

from db import inbox, ledger
from db.transaction import transaction
from sync_worker.changes import utcnow
from sync_worker.config import Settings
from sync_worker.errors import StoreError
from sync_worker.jobs.base import Job
from sync_worker.jobs.registry import Planned, plan
from sync_worker.jobs.schedule import catch_up_tick
from sync_worker.jobs.ticks import TickRunner

log = structlog.get_logger(__name__)

HEARTBEAT_JOB = "_heartbeat"
_fired = threading.local()


def scheduled_time() -> datetime:
    """The tick the job running in this thread was fired for (set by ``_ThreadPerRun``)."""
    run_time: datetime = _fired.run_time
    return run_time


class _ThreadPerRun(BaseExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped
    """Runs each fire in a daemon thread of its own and tells it its scheduled time.

    APScheduler 3 does not pass a job its scheduled run time, and every instance must name
    the tick alike. A thread per run (max_instances=1: a handful at a time) lets shutdown
    wait for runs a bounded time, and the process exit even if one hangs.
    """

    def __init__(self) -> None:
        super().__init__()
        self._threads: set[threading.Thread] = set()
        self._guard = threading.Lock()

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        thread = threading.Thread(
            target=self._run, args=(job, run_times), name=f"job-{job.id}", daemon=True
        )
        with self._guard:
            self._threads.add(thread)
        thread.start()

    def _run(self, job: Any, run_times: list[datetime]) -> None:
        events: list[Any] = []
        try:
            for run_time in run_times:  # one, as jobs coalesce
                _fired.run_time = run_time
                # run_job drops a run later than the job's misfire grace, as APScheduler does
                events += run_job(job, job._jobstore_alias, [run_time], self._logger.name)
        except BaseException as exc:
            self._run_job_error(job.id, exc, exc.__traceback__)
        else:
            self._run_job_success(job.id, events)
        finally:
            with self._guard:
                self._threads.discard(threading.current_thread())

    def threads(self) -> list[threading.Thread]:
        with self._guard:
            return list(self._threads)

    def shutdown(self, wait: bool = True) -> None:
        return None  # Scheduler.shutdown waits for the runs, with a deadline


class Scheduler:
    """The jobs of ``plan(settings)`` (or ``planned``), on an in-memory APScheduler."""

    def __init__(
        self,
        db: Engine,
        settings: Settings,
        job_runs: Counter,
        *,
        planned: Sequence[Planned] | None = None,
        stop: threading.Event | None = None,
        wake_drainer: Callable[[], None] = lambda: None,
        instance: str | None = None,
        heartbeat_seconds: float = 5.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.planned = plan(settings) if planned is None else list(planned)
        self.stop = stop or threading.Event()
        self.instance = instance or inbox.new_worker_id()
        self.grace = timedelta(seconds=settings.jobs.misfire_grace)
        self.clock = clock
        self.ticks = TickRunner(
            db,
            settings,
            job_runs,
            instance=self.instance,
            stop=self.stop,
            wake_drainer=wake_drainer,
            clock=clock,
        )
        self.heartbeat_seconds = heartbeat_seconds
        self.heartbeat = time.monotonic()
        self.executor = _ThreadPerRun()
        self.aps = BackgroundScheduler(
            timezone=UTC,
            executors={"default": self.executor, "inline": DebugExecutor()},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                # APScheduler takes whole seconds; rounding up never drops a run it should keep
                "misfire_grace_time": max(1, math.ceil(self.grace.total_seconds())),
            },
        )

    def start(self) -> None:
        now = self.clock()
        for item in self.planned:
            if item.enabled:
                self._add(item, now)
            else:
                log.info("job_disabled", job=item.job.name, schedule=item.schedule.describe())
        self.aps.add_job(
            self._beat,
            IntervalTrigger(seconds=self.heartbeat_seconds, timezone=UTC),
            id=HEARTBEAT_JOB,
            executor="inline",  # in the scheduler's thread: it beats while that loop turns
        )
        self._beat()
        self.aps.start()
        log.info("scheduler_started", instance=self.instance)

    def _add(self, item: Planned, now: datetime) -> None:
        name, schedule = item.job.name, item.schedule
        first = self._catch_up(item, now)
        # next_run_time in the past: APScheduler fires it at once, within the misfire grace
        options = {} if first is None else {"next_run_time": first}
        self.aps.add_job(
            self._fire, schedule.trigger(), args=[item.job], id=name, name=name, **options
        )
        next_run = first or schedule.next_tick(now)
        log.info(
            "job_scheduled",
            job=name,
            schedule=schedule.describe(),
            next_run=next_run.isoformat(),
            catch_up=first is not None,
            providers=item.job.providers(self.ticks.settings),
        )

    def _catch_up(self, item: Planned, now: datetime) -> datetime | None:
        """The missed tick to run at once, if every instance was down when it came."""
        latest_due = item.schedule.latest_tick(now, within=self.grace)
        if latest_due is None:
            return None
        try:
            with transaction(self.db, rollback=True) as conn:
                last = ledger.last_scheduled(conn, item.job.name)
        except StoreError as exc:  # no catch-up: the next tick runs as scheduled
            log.warning("job_catch_up_unknown", job=item.job.name, error=str(exc))
            return None
        return catch_up_tick(latest_due, last, now, self.grace)

    def _fire(self, job: Job) -> None:
        if self.stop.is_set():  # shutting down: leave the tick to another instance
            return
        self.ticks.run(job, scheduled_time())

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    def heartbeat_age(self) -> float | None:
        """Seconds since the scheduler's loop last turned; None when it is not running."""
        if not self.aps.running or self.stop.is_set():
            return None
        return time.monotonic() - self.heartbeat

    def shutdown(self, grace: float) -> bool:
        """Fire nothing more; wait up to ``grace`` seconds for the runs in progress (a pull
        stops after its page in hand). True if every run ended in time."""
        self.stop.set()
        if self.aps.running:
            self.aps.shutdown(wait=False)
        deadline = time.monotonic() + grace
        for thread in self.executor.threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        still = [t.name for t in self.executor.threads() if t.is_alive()]
        if still:
            log.warning("scheduler_runs_still_going", jobs=still)
        log.info("scheduler_stopped", instance=self.instance)
        return not still
