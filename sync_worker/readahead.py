"""Reading the next page while the current one is applied.

A pull alternates between waiting on the provider (HTTP, or the app's Auth.js database)
and waiting on the worker's database. Reading one page ahead in a thread overlaps the two:
both waits release the GIL. Nothing else changes: pages come out in order, and an error
the reader hit comes out after every page read before it, so those pages are applied with
their cursors and the failed page never is. At most ``depth`` pages wait in memory, plus
the one the reader holds.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

_POLL_SECONDS = 0.2  # how often a blocked side looks whether the other one gave up
_JOIN_SECONDS = 5.0


class _Done:
    """The reader finished: with the error it hit, or ``None`` at the end of the pages."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class _Reader(threading.Thread, Generic[T]):
    def __init__(
        self, source: Iterable[T], depth: int, items: queue.Queue[T | _Done] | None = None
    ) -> None:
        super().__init__(name="pull-read-ahead", daemon=True)
        self.source = source
        self.items: queue.Queue[T | _Done] = items or queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        # The reader logs (retries, pacing) with the caller's bound context.
        self.context = contextvars.copy_context()

    def run(self) -> None:
        self.context.run(self._read)

    def _read(self) -> None:
        iterator = iter(self.source)
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(_Done(None))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(_Done(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:  # a generator: run its cleanup in the thread that ran it
                close()

    def _put(self, item: T | _Done) -> bool:
        while not self.stop.is_set():
            try:
                self.items.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False


def read_ahead(source: Iterable[T], depth: int = 1) -> Generator[T, None, None]:
    """``source``'s items in order, read by a thread up to ``depth`` items ahead.

    Leaving the loop early (an exception, ``close()``) stops the reader and closes
    ``source`` in the reader's thread once its current read returns.
    """
    if depth < 1:
        yield from source
        return
    reader: _Reader[T] = _Reader(source, depth)
    reader.start()
    try:
        yield from _drained(reader)
    finally:
        _stopped(reader)


@contextmanager
def reading_ahead(source: Iterable[T], depth: int = 1) -> Iterator[Iterator[T]]:
    """``read_ahead`` whose reader starts now rather than at the first item, so the
    caller works meanwhile (the worker counts while the source's server computes).
    Leaving the block stops the reader, whether or not its items were all taken."""
    reader: _Reader[T] = _Reader(source, max(depth, 1))
    reader.start()
    try:
        yield _drained(reader)
    finally:
        _stopped(reader)


def _drained(reader: _Reader[T]) -> Iterator[T]:
    while True:
        item = _take(reader)
        if isinstance(item, _Done):
            if item.error is not None:
                raise item.error
            return
        yield item


def _stopped(reader: _Reader[T]) -> None:
    reader.stop.set()
    reader.join(timeout=_JOIN_SECONDS)
    if reader.is_alive():  # still inside a read; it stops when that returns
        log.warning("read_ahead_still_reading", seconds=_JOIN_SECONDS)


def _take(reader: _Reader[T]) -> T | _Done:
    while True:
        try:
            return reader.items.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if not reader.is_alive() and reader.items.empty():
                return _Done(RuntimeError("read-ahead thread ended without a result"))


def read_merged(sources: Sequence[Iterable[T]], depth: int = 4) -> Generator[T, None, None]:
    """The items of every source, each read by a thread of its own, as they come: each
    source's items in their order, the sources' interleaved. For reads that wait on
    different servers or connections (they release the GIL), so that they overlap.

    The first error any reader hits comes out (after the items read before it) and ends
    the reading; leaving early stops every reader as ``read_ahead`` does.
    """
    items: queue.Queue[T | _Done] = queue.Queue(maxsize=depth)
    readers: list[_Reader[T]] = [_Reader(source, depth, items) for source in sources]
    for reader in readers:
        reader.start()
    running = len(readers)
    try:
        while running:
            item = _take_any(items, readers)
            if isinstance(item, _Done):
                if item.error is not None:
                    raise item.error
                running -= 1
                continue
            yield item
    finally:
        for reader in readers:
            reader.stop.set()  # all of them first: each then ends as its read returns
        for reader in readers:
            _stopped(reader)


def _take_any(items: queue.Queue[T | _Done], readers: Sequence[_Reader[T]]) -> T | _Done:
    while True:
        try:
            return items.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if not any(r.is_alive() for r in readers) and items.empty():
                return _Done(RuntimeError("read-ahead threads ended without a result"))
