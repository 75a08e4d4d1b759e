"""Every scheduled job by name, and what the scheduler plans from ``jobs:`` in config.

The maintenance jobs (``backfill_profiles``, ``session_cleanup``, ``retention``) call the
functions of ``sync_worker.jobs.maintenance``, which the CLI's one-off commands call too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from providers import registry as providers
from sync_worker.config import JobSettings, Settings
from sync_worker.jobs import maintenance
from sync_worker.jobs.base import Job, JobContext
from sync_worker.jobs.pulls import PullJob, ReconcileJob
from sync_worker.jobs.retry import RetryJob
from sync_worker.jobs.schedule import Schedule

if TYPE_CHECKING:
    from providers.authjs import AuthjsProvider


class _Once:
    """A job of no provider, whose run the scheduler records in sync_runs."""

    records_own_run = False

    def providers(self, settings: Settings) -> list[str | None]:
        return [None]


class BackfillProfilesJob(_Once):
    """A profile for every user without one, with the configured defaults."""

    name = lock = "backfill_profiles"

    def run(self, ctx: JobContext, provider: str | None) -> Mapping[str, int]:
        settings = ctx.settings
        return maintenance.backfill_profiles(
            ctx.db,
            defaults=settings.profile.defaults,
            batch_size=settings.sync.batch_size,
            now=ctx.now,
            run_id=ctx.run_id,
        )


class SessionCleanupJob(_Once):
    """Sessions ended longer than ``retention.sessions`` ago; with
    ``retention.authjs_sessions``, also the expired rows of the Auth.js app's own table."""

    name = lock = "session_cleanup"

    def run(self, ctx: JobContext, provider: str | None) -> Mapping[str, int]:
        retention = ctx.settings.retention
        authjs = _authjs(ctx.settings) if retention.authjs_sessions else None
        try:
            return maintenance.cleanup_sessions(
                ctx.db,
                older_than=ctx.now - timedelta(seconds=retention.sessions),
                batch_size=retention.batch_size,
                authjs=authjs,
                idle_before=maintenance.idle_cutoff(retention, ctx.now),
            )
        finally:
            if authjs is not None:
                authjs.close()


class RetentionJob(_Once):
    """Audit rows past ``retention.audit`` (unless off) and done inbox rows past
    ``retention.inbox_done``."""

    name = lock = "retention"

    def run(self, ctx: JobContext, provider: str | None) -> Mapping[str, int]:
        retention = ctx.settings.retention
        audit = retention.audit
        return maintenance.purge_retention(
            ctx.db,
            audit_before=None if audit is None else ctx.now - timedelta(seconds=audit),
            inbox_done_before=ctx.now - timedelta(seconds=retention.inbox_done),
            batch_size=retention.batch_size,
        )


def _authjs(settings: Settings) -> AuthjsProvider | None:
    """The Auth.js adapter, when its database is configured (else there is no table)."""
    if "authjs" not in settings.enabled_providers():
        return None
    from providers.authjs import AuthjsProvider

    adapter = providers.build("authjs", settings)
    assert isinstance(adapter, AuthjsProvider)
    return adapter


def all_jobs() -> dict[str, Job]:
    """Every job, by the name its config key has under ``jobs:``."""
    jobs: list[Job] = [
        PullJob(),
        ReconcileJob(),
        BackfillProfilesJob(),
        SessionCleanupJob(),
        RetentionJob(),
        RetryJob(),
    ]
    return {job.name: job for job in jobs}


@dataclass(frozen=True, slots=True)
class Planned:
    """A job and when it runs."""

    job: Job
    schedule: Schedule
    enabled: bool = True


def job_settings(settings: Settings, name: str) -> JobSettings:
    configured: JobSettings = getattr(settings.jobs, name)
    return configured


def plan(settings: Settings, jobs: Mapping[str, Job] | None = None) -> list[Planned]:
    """Every job with its configured schedule, disabled ones included (status shows them)."""
    found = all_jobs() if jobs is None else jobs
    planned = []
    for name, job in found.items():
        configured = job_settings(settings, name)
        planned.append(Planned(job, Schedule.of(configured), enabled=configured.enabled))
    return planned
