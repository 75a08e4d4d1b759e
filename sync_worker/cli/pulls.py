"""The one-off commands: migrate, status, backfill and sync."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from db import ledger
from db.runs import PASS_KINDS, RunStatus, abandon_runs
from db.transaction import transaction
from providers.base import Provider
from sync_worker.changes import Source, utcnow
from sync_worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Commands,
    command,
    open_database,
    timestamp,
)
from sync_worker.config import Settings
from sync_worker.engine import SyncEngine
from sync_worker.errors import ConfigError, SyncWorkerError
from sync_worker.progress import Progress, progress
from sync_worker.pull import PullReport, PullRunner, ReconcileRefused
from sync_worker.runtime import allow_collector_pauses


def register(commands: Commands) -> None:
    command(commands, "migrate", "create or upgrade the worker's tables (safe to repeat)",
            cmd_migrate)  # fmt: skip
    show = command(commands, "status", "users, profiles, cursors, inbox, jobs and recent runs",
                   cmd_status)  # fmt: skip
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    backfill = command(commands, "backfill", "one-off sync of one provider", cmd_backfill)
    backfill.add_argument(
        "--provider",
        required=True,
        choices=["auth0", "stack", "authjs"],
        help="the identity provider to pull (its credentials come from the environment)",
    )
    backfill.add_argument("--full", action="store_true", help="list every user, then reconcile")
    backfill.add_argument(
        "--dry-run", action="store_true", help="show what would change; write nothing"
    )
    backfill.add_argument("--since", type=timestamp, help="start from this time (ISO 8601; auth0)")
    command(commands, "sync", "one incremental pull of every configured provider", cmd_sync)


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    # Imported by the commands that use them: a backfill loads neither Alembic's commands
    # nor the scheduler.
    from db.migrate import upgrade

    with open_database(settings, require_head=False) as engine:
        before, after = upgrade(engine, settings.database.schema_)
    if before == after:
        print(f"database already at {after}")
    else:
        print(f"database migrated from {before or 'empty'} to {after}")
    return EXIT_OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from db.report import collect as collect_status
    from sync_worker import status
    from sync_worker.jobs.registry import plan

    with open_database(settings) as engine:
        report = status.with_jobs(collect_status(engine), plan(settings), utcnow())
    print(json.dumps(report, indent=2, default=str) if args.json else status.render(report))
    return EXIT_OK


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from providers import registry

    allow_collector_pauses()  # one batch job at a time in this process

    provider = registry.build(args.provider, settings)
    try:
        cursor = _since_cursor(provider, args.since)
        with open_database(settings) as engine, progress(f"{args.provider} users") as bar:
            runner = _runner(engine, settings, provider, Source.BACKFILL, bar)
            # A dry run writes no cursor and no run: it may go beside a pass.
            alone = nullcontext() if args.dry_run else one_pass(engine, args.provider)
            with alone:
                report = _refusal_reported(
                    runner, full=args.full, dry_run=args.dry_run, cursor=cursor
                )
    finally:
        provider.close()
    _print_report(report, dry_run=args.dry_run)
    return _exit_for(report)


class PassRunning(SyncWorkerError):
    """Another pass of the provider holds its lock: the command does not start one."""


@contextmanager
def one_pass(db: Engine, provider: str) -> Iterator[None]:
    """Hold the provider's pass lock for the command's pass, as the daemon's pull and
    reconcile jobs do (two passes at once would fight over the provider's cursor).

    Busy: ``PassRunning``, at once. Held, on PostgreSQL (whose lock spans processes): the
    provider's runs still ``running`` died with their process, and are recorded so.
    """
    from sync_worker.jobs.pulls import PullJob

    with ledger.job_lock(db, PullJob.lock, provider) as held:
        if not held:
            raise PassRunning(
                f"{provider}: a pass is already running (the daemon's scheduled pull, or "
                "another backfill); try again when it has finished"
            )
        if ledger.locks_across_processes(db):
            now = utcnow()
            with transaction(db) as conn:
                abandon_runs(conn, PASS_KINDS, provider, before=now, now=now)
        yield


def _runner(
    db: Engine, settings: Settings, provider: Provider, source: Source, bar: Progress | None = None
) -> PullRunner:
    return PullRunner(
        db,
        SyncEngine.from_settings(settings),
        provider,
        max_delete_fraction=settings.sync.max_delete_fraction,
        source=source,
        progress=bar,
    )


def _refusal_reported(runner: PullRunner, **kwargs: Any) -> PullReport:
    """The pass's report, also when the deletion guard refused its reconcile (the report
    says so, and the exit code is 1)."""
    try:
        return runner.run(**kwargs)
    except ReconcileRefused as refused:
        return refused.report


def cmd_sync(settings: Settings, _args: argparse.Namespace) -> int:
    from providers import registry

    allow_collector_pauses()  # one batch job at a time in this process

    enabled = settings.enabled_providers()
    if not enabled:
        print("no provider configured: set AUTH0_*, STACK_* or AUTHJS_DATABASE_URL (see README)")
        return EXIT_OK
    worst = EXIT_OK
    with open_database(settings) as engine:
        for name in enabled:
            provider = registry.build(name, settings)
            try:
                with one_pass(engine, name):
                    report = _refusal_reported(_runner(engine, settings, provider, Source.PULL))
            except SyncWorkerError as exc:
                print(f"sync-worker: {_naming(name, exc)}", file=sys.stderr)
                worst = EXIT_FAILURE
                continue
            finally:
                provider.close()
            _print_report(report, dry_run=False)
            worst = max(worst, _exit_for(report))
    return worst


def _naming(provider: str, exc: SyncWorkerError) -> str:
    """The error's message, prefixed with the provider unless it already starts with it."""
    message = str(exc)
    return message if message.startswith(f"{provider}: ") else f"{provider}: {message}"


def _since_cursor(provider: Provider, since: datetime | None) -> dict[str, Any] | None:
    if since is None:
        return None
    cursor = provider.cursor_since(since)
    if cursor is None:
        raise ConfigError(
            f"--since: {provider.name} has no change log to start from; every pull lists all users"
        )
    return dict(cursor)


def _print_report(report: PullReport, *, dry_run: bool) -> None:
    counts = _pairs(report.counts) or "no changes"
    if report.sessions:  # logins apart: a user with two sessions is one user
        counts += f" (sessions: {_pairs(report.sessions)})"
    prefix = "dry run (nothing written): " if dry_run else ""
    print(
        f"{prefix}{report.provider} {report.kind} {report.status}: {counts} in {report.pages} pages"
    )
    if report.reconcile is not None:
        r = report.reconcile
        verdict = "REFUSED" if r.refused else f"{r.deleted} soft-deleted"
        print(f"reconcile: {r.missing} of {r.live} missing upstream, {verdict}")
    elif report.reconcile_skipped:
        print(
            f"reconcile skipped: {report.reconcile_skipped}; "
            f"run `sync-worker backfill --provider {report.provider} --full` to reconcile"
        )
    if dry_run:
        for sample in report.samples:
            diff = json.dumps(sample.changes)
            print(f"  {sample.action:<9} {sample.provider}:{sample.external_id}  {diff}")
    if report.error:
        print(f"sync-worker: {report.error}", file=sys.stderr)


def _pairs(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def _exit_for(report: PullReport) -> int:
    if report.status is RunStatus.FAILED:
        return EXIT_FAILURE
    return EXIT_OK
