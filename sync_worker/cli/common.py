"""What the commands share: exit codes, opening the worker's database, argument types."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TypeAlias

from sqlalchemy import Engine

from db.connect import make_engine
from db.migrate import current_revision, head_revision
from sync_worker.changes import as_utc
from sync_worker.config import Settings
from sync_worker.errors import StoreError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

Handler = Callable[[Settings, argparse.Namespace], int]
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def command(commands: Commands, name: str, text: str, handler: Handler) -> argparse.ArgumentParser:
    """A subcommand whose one-line text shows in the command list and in its own --help."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=text, description=text)
    parser.set_defaults(handler=handler)
    return parser


@contextmanager
def open_database(settings: Settings, *, require_head: bool = True) -> Iterator[Engine]:
    db = settings.database
    engine = make_engine(
        db.url,
        schema=db.schema_,
        pool_size=db.pool_size,
        echo=db.echo,
        prepared_statements=db.prepared_statements,
    )
    try:
        if require_head and current_revision(engine) != head_revision():
            raise StoreError(
                "the database is not migrated to this version: run `sync-worker migrate`"
            )
        yield engine
    finally:
        engine.dispose()


def timestamp(text: str) -> datetime:
    try:
        parsed = as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    assert parsed is not None
    return parsed
