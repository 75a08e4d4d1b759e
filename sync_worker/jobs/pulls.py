"""The ``pull`` and ``reconcile`` jobs: the pull runner, per provider with pull credentials.

``pull`` is an incremental pull from the stored cursor (a provider without a change log,
Stack or Auth.js, lists everyone and reconciles then, as ``sync`` does); ``reconcile`` is a
full pass that soft-deletes users missing upstream, unless the deletion guard refuses, which
fails the run. The runner writes the run's sync_runs row (kind ``incremental`` or ``full``).
At shutdown a pull stops after the page in hand: its committed pages and cursor are kept.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from db.runs import RunStatus
from providers import registry
from sync_worker.changes import Source
from sync_worker.config import Settings
from sync_worker.engine import SyncEngine
from sync_worker.jobs.base import JobContext, JobFailed, JobStopped
from sync_worker.pull import PullRunner, ReconcileRefused


class StopBetweenPages:
    """A pull's progress hook that ends the pull, between two pages, once ``stop`` is set."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def total(self, users: int) -> None:
        return None

    def advance(self, users: int, sessions: int) -> None:
        if self.stop.is_set():
            raise JobStopped("stopped between pages: the daemon is shutting down")


class PullJob:
    name = "pull"
    records_own_run = True
    lock = "pull"  # reconcile too: two passes at once would fight over the cursor
    full = False

    def providers(self, settings: Settings) -> list[str | None]:
        return list(settings.enabled_providers())

    def run(self, ctx: JobContext, provider: str | None) -> Mapping[str, int]:
        if provider is None:
            raise ValueError(f"{self.name}: runs per provider")
        settings = ctx.settings
        adapter = registry.build(provider, settings)
        try:
            runner = PullRunner(
                ctx.db,
                SyncEngine.from_settings(settings),
                adapter,
                max_delete_fraction=settings.sync.max_delete_fraction,
                source=Source.PULL,
                progress=StopBetweenPages(ctx.stop),
            )
            try:
                report = runner.run(full=self.full)
            except ReconcileRefused as refused:
                ctx.run_id = refused.report.run_id
                raise
        finally:
            adapter.close()
        ctx.run_id = report.run_id
        if report.status is RunStatus.FAILED:
            raise JobFailed(report.error or "the pull failed")
        return {**report.flat_counts(), "pages": report.pages}


class ReconcileJob(PullJob):
    name = "reconcile"
    full = True
