"""The housekeeping commands: backfill-profiles, cleanup-sessions and export-user.

The first two run the scheduler's jobs once, now, and record a ``sync_runs`` row like a
scheduled run (kinds ``backfill_profiles``, ``session_cleanup``). ``export-user`` records
one too, kind ``export``: it only reads, but a data-access request must be shown to have
been answered, and when. The row holds the counts per section only, never who was
exported nor how they were selected.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Engine

from db.runs import RunStatus, finish_run, start_run
from providers import registry
from sync_worker.changes import utcnow
from sync_worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Commands,
    command,
    open_database,
)
from sync_worker.config import Settings
from sync_worker.errors import ConfigError, StoreError

_EXPORT_HELP = """\
Prints everything the worker stores about one person: their user row, profile, every
identity (linked ones too, with the raw upstream records), sessions (ids, device and
times; never a token) and audit trail, including failed records of their identities, and
the webhook deliveries still in the inbox that are about one of their identities.
A person is selected by an exact match only: an email (any case) matching several users
is refused (exit 2), so choose one with --id.

--format json: one document, sections user, profile, identities, sessions, audit, inbox.
--format csv: one spreadsheet table with columns section, record, field, value: one row
per stored value; record numbers the rows of a section (identity 1, 2, ...); nested
values get dotted field names (raw.email; audit changes.email.0 is the old value and .1
the new one); an empty cell is a null. UTF-8 with a byte-order mark, so Excel reads
accents right; a value that a spreadsheet would run as a formula starts with an
apostrophe.

Each export is recorded in sync_runs (kind export, with row counts only)."""


def register(commands: Commands) -> None:
    command(
        commands,
        "backfill-profiles",
        "create the missing profile of every user, with profile.defaults",
        cmd_backfill_profiles,
    )
    command(
        commands,
        "cleanup-sessions",
        "delete sessions that ended more than retention.sessions ago",
        cmd_cleanup_sessions,
    )
    exporting = command(
        commands,
        "export-user",
        "everything stored about one person (a data-access request)",
        cmd_export_user,
    )
    exporting.formatter_class = argparse.RawDescriptionHelpFormatter
    exporting.epilog = _EXPORT_HELP
    who = exporting.add_mutually_exclusive_group(required=True)
    who.add_argument("--email", help="the person's email, in any case")
    who.add_argument("--id", type=_user_id, dest="user_id", metavar="UUID", help="the user id")
    who.add_argument(
        "--external",
        type=_external,
        metavar="PROVIDER:ID",
        help="an identity, e.g. auth0:google-oauth2|1234 or authjs:github:42",
    )
    exporting.add_argument(
        "--format", choices=["json", "csv"], default="json", help="output format (default json)"
    )


# The jobs are imported by the commands that run them: every command, a backfill too,
# builds this parser, and their modules (the inbox's, the maintenance statements) are
# not a backfill's.


def cmd_backfill_profiles(settings: Settings, _args: argparse.Namespace) -> int:
    from sync_worker.jobs import maintenance

    with open_database(settings) as db:
        counts = _recorded(
            db,
            "backfill_profiles",
            lambda run_id: maintenance.backfill_profiles(
                db,
                defaults=settings.profile.defaults,
                batch_size=settings.retention.batch_size,
                now=utcnow(),
                run_id=run_id,
            ),
        )
    if counts["created"]:
        print(f"{counts['created']} profiles created ({counts['users']} users)")
    else:
        print(f"all {counts['users']} users already have profiles")
    return EXIT_OK


def cmd_cleanup_sessions(settings: Settings, _args: argparse.Namespace) -> int:
    from providers.authjs import AuthjsProvider
    from sync_worker.jobs import maintenance

    retention = settings.retention
    authjs: AuthjsProvider | None = None
    if retention.authjs_sessions:
        if not settings.providers.authjs.database_url:
            raise ConfigError(
                "retention.authjs_sessions: needs providers.authjs.database_url "
                "(AUTHJS_DATABASE_URL)"
            )
        authjs = AuthjsProvider(settings.providers.authjs, batch_size=retention.batch_size)
    now = utcnow()
    older_than = now - timedelta(seconds=retention.sessions)
    try:
        with open_database(settings) as db:
            counts = _recorded(
                db,
                "session_cleanup",
                lambda _run_id: maintenance.cleanup_sessions(
                    db,
                    older_than=older_than,
                    batch_size=retention.batch_size,
                    authjs=authjs,
                    idle_before=maintenance.idle_cutoff(retention, now),
                ),
            )
    finally:
        if authjs is not None:
            authjs.close()
    line = f"{counts['deleted']} ended sessions deleted"
    if authjs is not None:
        line += f"; {counts['authjs_deleted']} expired Auth.js sessions deleted"
    print(line)
    return EXIT_OK


def cmd_export_user(settings: Settings, args: argparse.Namespace) -> int:
    from sync_worker.jobs import export

    selector = export.Selector(email=args.email, user_id=args.user_id, external=args.external)
    with open_database(settings) as db:
        run_id = start_run(db, "export", None)
        try:
            document = export.export_user(db, selector, registry.decoders(settings))
        except (export.UserNotFound, export.AmbiguousUser) as exc:
            finish_run(db, run_id, RunStatus.FAILED, {}, error=str(exc))
            print(f"sync-worker: {exc}", file=sys.stderr)
            return EXIT_USAGE if isinstance(exc, export.AmbiguousUser) else EXIT_FAILURE
        except BaseException as exc:
            _failed(db, run_id, exc)
            raise
        finish_run(db, run_id, RunStatus.SUCCEEDED, export.counts(document))
    render = export.render_csv if args.format == "csv" else export.render_json
    _write(render(document))
    return EXIT_OK


def _recorded(db: Engine, kind: str, job: Callable[[uuid.UUID], dict[str, int]]) -> dict[str, int]:
    """Run ``job`` (given its run's id) as one ``sync_runs`` row of ``kind``: failed, with
    its error, if it raises."""
    run_id = start_run(db, kind, None)
    try:
        counts = job(run_id)
    except BaseException as exc:
        _failed(db, run_id, exc)
        raise
    finish_run(db, run_id, RunStatus.SUCCEEDED, counts)
    return counts


def _failed(db: Engine, run_id: uuid.UUID, exc: BaseException) -> None:
    # The database that failed the job may refuse this too: the job's error is the one told.
    with contextlib.suppress(StoreError):
        finish_run(db, run_id, RunStatus.FAILED, {}, error=str(exc) or type(exc).__name__)


def _write(data: bytes) -> None:
    # Bytes, not text: the export is UTF-8 whatever the terminal's locale.
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _user_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _external(text: str) -> str:
    from sync_worker.jobs import export

    if not export.identity_keys(text):
        raise argparse.ArgumentTypeError(f"expected PROVIDER:ID, got {text!r}")
    return text
