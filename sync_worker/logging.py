"""structlog setup: readable on a terminal, JSON lines otherwise; always to stderr.

Every line goes to ``sys.stderr`` as it is at the time of writing (it may be replaced after
configuration), one whole line per write. While a progress bar is drawn on stderr
(``lines_above``), each line is written through the bar's own write path, which clears the
bar, writes the line and redraws the bar below it: otherwise lines end up glued to the bar.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}

#: Wraps one write to the stream while a progress bar is shown (see ``lines_above``).
WriteGuard = Callable[[TextIO], AbstractContextManager[object]]
_guard: WriteGuard | None = None


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger (libraries log through it)."""
    numeric = _LEVELS.get(level, logging.ERROR)
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not console:
        shared.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)


@contextmanager
def lines_above(guard: WriteGuard) -> Iterator[None]:
    """Write every log line through ``guard`` (e.g. tqdm's ``external_write_mode``) until
    the block ends: the lines then scroll above a progress bar instead of running into it."""
    global _guard  # noqa: PLW0603 - one stderr per process, so one guard
    previous, _guard = _guard, guard
    try:
        yield
    finally:
        _guard = previous


def write_line(text: str) -> None:
    """Write one whole line (``text`` ends with a newline) to the current stderr."""
    stream = sys.stderr
    guard = _guard
    if guard is None:
        stream.write(text)
        stream.flush()
        return
    with guard(stream):
        stream.write(text)
        stream.flush()


class _LineLogger:
    """structlog's output: each rendered event is one ``write_line``."""

    def msg(self, message: str) -> None:
        write_line(message + "\n")

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger(*_args: Any) -> _LineLogger:
    return _LineLogger()


class _StderrHandler(logging.Handler):
    """The stdlib's records (libraries), written like structlog's."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
