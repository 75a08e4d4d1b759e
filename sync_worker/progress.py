"""The backfill's progress bar: users (sessions apart), a total and ETA where the source
tells, on a terminal only; log lines scroll above it (``sync_worker.logging.lines_above``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

from sync_worker.logging import lines_above

#: Width when the terminal reports none (0 columns: some CI and container ptys, a fresh
#: pty): tqdm would then draw an empty bar, i.e. nothing at all.
FALLBACK_COLUMNS = 80


class Progress(Protocol):
    """What a pull reports as it goes."""

    def total(self, users: int) -> None:
        """The number of users the pass will list, once the source has said it."""
        ...

    def advance(self, users: int, sessions: int) -> None:
        """A page was applied: how many user records and how many sessions it held."""
        ...


class NoProgress:
    """Off a terminal: the structured logs tell the story."""

    def total(self, users: int) -> None:
        return None

    def advance(self, users: int, sessions: int) -> None:
        return None


class ProgressBar:
    """A tqdm bar counting users, with the sessions seen as a postfix."""

    def __init__(self, label: str, stream: TextIO) -> None:
        from tqdm import tqdm  # only a terminal needs it

        columns = terminal_columns(stream)
        width: dict[str, Any] = {"dynamic_ncols": True} if columns else {"ncols": FALLBACK_COLUMNS}
        self._tqdm = tqdm
        self._bar = tqdm(desc=label, unit=" users", file=stream, **width)
        self._sessions = 0

    def total(self, users: int) -> None:
        self._bar.total = users  # tqdm shows a percentage and an ETA from now on
        self._bar.refresh()

    def advance(self, users: int, sessions: int) -> None:
        self._sessions += sessions
        if self._sessions:
            self._bar.set_postfix(sessions=self._sessions, refresh=False)
        self._bar.update(users)

    def close(self) -> None:
        self._bar.close()

    @contextmanager
    def above(self) -> Iterator[None]:
        """Log lines go through tqdm's write path while the bar is shown."""
        with lines_above(lambda stream: self._tqdm.external_write_mode(file=stream)):
            yield


def terminal_columns(stream: TextIO) -> int:
    """Columns of the terminal behind ``stream``; 0 when it reports none or is no terminal."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


@contextmanager
def progress(label: str, stream: TextIO | None = None) -> Iterator[Progress]:
    """A progress bar on ``stream`` (default stderr) if it is a terminal; nothing otherwise."""
    stream = stream if stream is not None else sys.stderr
    if not stream.isatty():
        yield NoProgress()
        return
    bar = ProgressBar(label, stream)
    try:
        with bar.above():
            yield bar
    finally:
        bar.close()
