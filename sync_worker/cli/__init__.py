"""The `sync-worker` command line.

Exit codes: 0 success; 2 bad usage or configuration (one line on stderr, no traceback);
1 failure (a provider that keeps failing, a refused reconcile, an unreachable database).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sync_worker import __version__
from sync_worker.errors import ConfigError, SyncWorkerError
from sync_worker.runtime import start_up

if TYPE_CHECKING:
    from sync_worker.cli.common import Handler

__all__ = ["build_parser", "console", "main"]

# The commands' modules (SQLAlchemy, pydantic, structlog...) are imported by ``build_parser``
# and ``main``, not with this module: the console script imports them inside ``start_up``.


def build_parser() -> argparse.ArgumentParser:
    from sync_worker.cli import daemon, maintenance, pulls

    parser = argparse.ArgumentParser(
        prog="sync-worker",
        description="Keep your app's users and profiles in step with Auth0, Stack Auth or Auth.js.",
    )
    parser.add_argument(
        "--config", help="config file (default $SYNC_WORKER_CONFIG or ./config.yaml)"
    )
    parser.add_argument("--version", action="version", version=f"sync-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pulls.register(commands)
    daemon.register(commands)
    maintenance.register(commands)
    return parser


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
    with start_up():
        parser = build_parser()  # imports every command's modules
    return main(parser=parser)


def main(
    argv: Sequence[str] | None = None, *, parser: argparse.ArgumentParser | None = None
) -> int:
    from sync_worker.cli.common import EXIT_FAILURE, EXIT_USAGE
    from sync_worker.config import config_path, load_settings
    from sync_worker.logging import configure

    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        with _interruptible():
            settings = load_settings(config_path(args.config))
            configure(settings.logging.level, settings.logging.format)
            handler: Handler = args.handler
            return handler(settings, args)
    except ConfigError as exc:
        print(f"sync-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SyncWorkerError as exc:
        print(f"sync-worker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        reason = str(exc) or "interrupted by SIGINT"
        print(f"sync-worker: {reason}; committed pages are kept", file=sys.stderr)
        return 128 + signum
