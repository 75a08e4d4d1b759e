"""Shared by the scheduler tests: a probe job, a settings builder, polling, ledger reads, and
the entry point of a scheduler instance run in a process of its own (multiprocessing spawn
imports it from here)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from db.connect import make_engine
from db.tables import sync_job_ticks, sync_runs
from sync_worker.config import Settings, settings_from_mapping
from sync_worker.daemon.metrics import Metrics
from sync_worker.daemon.scheduler import Scheduler
from sync_worker.jobs.base import JobContext
from sync_worker.jobs.registry import Planned
from sync_worker.jobs.schedule import Schedule

SCHEMA = "identity"


@dataclass
class Probe:
    """A job of no provider: sleeps (``sleep``, deaf to the scheduler's stop unless
    ``stoppable``; ``release`` ends it, so a test leaves no run behind), then fails with
    ``fail`` or returns ``{"ran": 1}``."""

    name: str = "probe"
    sleep: float = 0.0
    fail: str | None = None
    stoppable: bool = False
    records_own_run: bool = False
    lock: str = ""  # the job's name unless given
    runs: list[datetime] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.lock = self.lock or self.name

    def providers(self, settings: Settings) -> list[str | None]:
        return [None]

    def run(self, ctx: JobContext, provider: str | None) -> Mapping[str, int]:
        self.runs.append(ctx.scheduled_at)
        if self.stoppable:
            ctx.stop.wait(self.sleep)
        elif self.sleep:
            self.release.wait(self.sleep)
        if self.fail is not None:
            raise RuntimeError(self.fail)
        return {"ran": 1}


def settings(**jobs: Any) -> Settings:
    """Settings whose database is never opened from here (tests pass their engine)."""
    return settings_from_mapping({"database": {"url": "sqlite:///:memory:"}, "jobs": jobs})


def every(seconds: float, job: Probe) -> Planned:
    return Planned(job, Schedule(every=timedelta(seconds=seconds)))


def scheduler(
    db: Engine,
    *planned: Planned,
    metrics: Metrics | None = None,
    config: Settings | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Scheduler:
    extra: dict[str, Any] = {} if clock is None else {"clock": clock}
    return Scheduler(
        db,
        config or settings(),
        (metrics or Metrics()).job_runs,
        planned=planned,
        heartbeat_seconds=0.2,
        **extra,
    )


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def ticks(db: Engine, job: str) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(
            select(sync_job_ticks)
            .where(sync_job_ticks.c.job == job)
            .order_by(sync_job_ticks.c.scheduled_at)
        ).mappings()
        return [dict(r) for r in rows]


def runs(db: Engine, kind: str) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(
            select(sync_runs).where(sync_runs.c.kind == kind).order_by(sync_runs.c.started_at)
        ).mappings()
        return [dict(r) for r in rows]


def run_instance(url: str, job: str, every_seconds: float, sleep: float, seconds: float) -> None:
    """A scheduler instance in a process of its own: ``job`` every ``every_seconds``, each run
    sleeping ``sleep``; it runs for ``seconds``, then shuts down."""
    db = make_engine(url, schema=SCHEMA)
    instance = scheduler(db, every(every_seconds, Probe(name=job, sleep=sleep)))
    instance.start()
    done = threading.Event()
    done.wait(seconds)
    instance.shutdown(grace=sleep + 5)
    db.dispose()
