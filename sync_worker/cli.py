"""The `sync-worker` command line.

Exit codes: 0 success; 2 bad usage or configuration (one line on stderr, no traceback);
1 failure (a provider that keeps failing, a refused reconcile, an unreachable database).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from db.connect import make_engine
from db.migrate import current_revision, head_revision, upgrade
from db.report import collect as collect_status
from db.runs import RunStatus
from providers.base import Provider
from sync_worker import __version__, status
from sync_worker.changes import Source, as_utc
from sync_worker.config import Settings, config_path, load_settings
from sync_worker.engine import SyncEngine
from sync_worker.errors import ConfigError, StoreError, SyncWorkerError
from sync_worker.logging import configure
from sync_worker.progress import progress
from sync_worker.pull import PullReport, PullRunner, reconcile_guard_error
from sync_worker.runtime import allow_collector_pauses, tune_gc

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sync-worker",
        description="Keep your app's users and profiles in step with Auth0, Stack Auth or Auth.js.",
    )
    parser.add_argument(
        "--config", help="config file (default $SYNC_WORKER_CONFIG or ./config.yaml)"
    )
    parser.add_argument("--version", action="version", version=f"sync-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _command(commands, "migrate", "create or upgrade the worker's tables (safe to repeat)")

    show = _command(commands, "status", "users, profiles, cursors, inbox and recent runs")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")

    backfill = _command(commands, "backfill", "one-off sync of one provider")
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
    backfill.add_argument("--since", type=_timestamp, help="start from this time (ISO 8601; auth0)")

    _command(commands, "sync", "one incremental pull of every configured provider")
    return parser


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
) -> argparse.ArgumentParser:
    """A subcommand whose one-line text shows in the command list and in its own --help."""
    return commands.add_parser(name, help=text, description=text)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, alike: unwinds like Ctrl-C, so the open batch rolls back, committed
    pages stay, and the run is recorded as failed with this message."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` while a command runs; the handlers before
    are restored after it (``main`` may be called in-process, as the tests do)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum, handler in previous.items():
        # A signal the parent chose to ignore (e.g. SIGINT of a background job) stays ignored.
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def console() -> int:
    """The console script: the worker's process settings, then ``main``."""
    tune_gc()
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _interruptible():
            settings = load_settings(config_path(args.config))
            configure(settings.logging.level, settings.logging.format)
            return _COMMANDS[args.command](settings, args)
    except ConfigError as exc:
        print(f"sync-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SyncWorkerError as exc:
        print(f"sync-worker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        print(f"sync-worker: database unavailable: {first}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        reason = str(exc) or "interrupted by SIGINT"
        print(f"sync-worker: {reason}; committed pages are kept", file=sys.stderr)
        return 128 + signum


@contextmanager
def _database(settings: Settings, *, require_head: bool = True) -> Iterator[Engine]:
    db = settings.database
    engine = make_engine(db.url, schema=db.schema_, pool_size=db.pool_size, echo=db.echo)
    try:
        if require_head and current_revision(engine) != head_revision():
            raise StoreError(
                "the database is not migrated to this version: run `sync-worker migrate`"
            )
        yield engine
    finally:
        engine.dispose()


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    with _database(settings, require_head=False) as engine:
        before, after = upgrade(engine, settings.database.schema_)
    if before == after:
        print(f"database already at {after}")
    else:
        print(f"database migrated from {before or 'empty'} to {after}")
    return EXIT_OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings) as engine:
        report = collect_status(engine)
    print(json.dumps(report, indent=2, default=str) if args.json else status.render(report))
    return EXIT_OK


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from providers import registry

    allow_collector_pauses()  # one batch job at a time in this process

    provider = registry.build(args.provider, settings)
    try:
        cursor = _since_cursor(provider, args.since)
        with _database(settings) as engine, progress(f"{args.provider} users") as bar:
            runner = PullRunner(
                engine,
                SyncEngine.from_settings(settings),
                provider,
                max_delete_fraction=settings.sync.max_delete_fraction,
                source=Source.BACKFILL,
                progress=bar,
            )
            report = runner.run(full=args.full, dry_run=args.dry_run, cursor=cursor)
    finally:
        provider.close()
    _print_report(report, dry_run=args.dry_run)
    return _exit_for(report)


def cmd_sync(settings: Settings, _args: argparse.Namespace) -> int:
    from providers import registry

    allow_collector_pauses()  # one batch job at a time in this process

    enabled = settings.enabled_providers()
    if not enabled:
        print("no provider configured: set AUTH0_*, STACK_* or AUTHJS_DATABASE_URL (see README)")
        return EXIT_OK
    worst = EXIT_OK
    with _database(settings) as engine:
        for name in enabled:
            provider = registry.build(name, settings)
            try:
                runner = PullRunner(
                    engine,
                    SyncEngine.from_settings(settings),
                    provider,
                    max_delete_fraction=settings.sync.max_delete_fraction,
                    source=Source.PULL,
                )
                report = runner.run()
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
    if reconcile_guard_error(report) is not None or report.status is RunStatus.FAILED:
        return EXIT_FAILURE
    return EXIT_OK


def _timestamp(text: str) -> datetime:
    try:
        parsed = as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    assert parsed is not None
    return parsed


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "migrate": cmd_migrate,
    "status": cmd_status,
    "backfill": cmd_backfill,
    "sync": cmd_sync,
}
