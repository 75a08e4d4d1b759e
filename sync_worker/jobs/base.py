"""What a scheduled job is: a name, the providers it runs for, and a run that returns counts."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import Engine
from structlog.typing import FilteringBoundLogger

from sync_worker.config import Settings
from sync_worker.errors import SyncWorkerError


class JobFailed(SyncWorkerError):
    """A run that ended failed without an exception of its own (a pull marked failed)."""


class JobStopped(SyncWorkerError):
    """The daemon is shutting down: the run stopped at a safe point, work so far is kept."""


@dataclass(slots=True, kw_only=True)
class JobContext:
    """What one run of a job (for one provider) is given."""

    db: Engine
    settings: Settings
    #: when this run started; the tick it runs for is ``scheduled_at``
    now: datetime
    scheduled_at: datetime
    log: FilteringBoundLogger  # bound to the job, provider and tick
    #: set when the daemon shuts down: a long run stops at its next safe point
    stop: threading.Event
    wake_drainer: Callable[[], None] = lambda: None
    #: the run's sync_runs row: set by the scheduler before ``run`` for the jobs it records,
    #: by ``run`` itself for jobs that record their own (a pull)
    run_id: uuid.UUID | None = None


class Job(Protocol):
    """A scheduled job. ``run`` raises to fail (its message is the run's error)."""

    #: the config key under ``jobs:``, the ledger's and the metric's job label
    name: str
    #: True when ``run`` writes its own sync_runs row (the pull runner does)
    records_own_run: bool
    #: runs of jobs with the same lock never overlap for one provider, in any instance (a
    #: job's own name, or shared: pull and reconcile both move the provider's cursor)
    lock: str

    def providers(self, settings: Settings) -> list[str | None]:
        """What one tick runs for: provider names, or ``[None]`` for one run of no provider."""
        ...

    def run(self, ctx: JobContext, provider: str | None) -> Mapping[str, int]:
        """Do the work; returns the counts stored with the run."""
        ...
