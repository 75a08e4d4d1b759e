"""sync_worker.readahead: order, errors after the pages before them, bounded, stoppable;
and PullRunner reads ahead as far as its provider asks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from sqlalchemy import Engine

from db.cursors import load_cursor
from providers.base import Cursor, Page
from sync_worker.engine import PlanSettings, SyncEngine
from sync_worker.pull import PullRunner
from sync_worker.readahead import read_ahead, read_merged, reading_ahead
from tests.factories import upsert

WAIT = 5.0


def test_items_come_out_in_order() -> None:
    assert list(read_ahead(iter(range(100)))) == list(range(100))


def test_depth_zero_reads_in_the_callers_thread() -> None:
    threads: list[str] = []

    def source() -> Iterator[int]:
        threads.append(threading.current_thread().name)
        yield 1

    assert list(read_ahead(source(), depth=0)) == [1]
    assert threads == [threading.current_thread().name]


def test_an_error_comes_after_the_items_read_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ConnectionError("page 3 failed")

    got: list[int] = []

    def consume() -> None:
        for item in read_ahead(source()):
            got.append(item)

    with pytest.raises(ConnectionError, match="page 3 failed"):
        consume()
    assert got == [1, 2]


def test_the_next_item_is_read_while_the_current_one_is_handled() -> None:
    second_read = threading.Event()

    def source() -> Iterator[int]:
        yield 1
        second_read.set()
        yield 2

    items = read_ahead(source())
    assert next(items) == 1
    # Still handling item 1 here: the reader has already fetched item 2.
    assert second_read.wait(WAIT)
    assert list(items) == [2]


def test_reads_at_most_depth_items_ahead() -> None:
    read: list[int] = []
    fourth_read = threading.Event()

    def source() -> Iterator[int]:
        for i in range(10):
            read.append(i)
            if i == 3:
                fourth_read.set()
            yield i

    items = read_ahead(source(), depth=2)
    assert next(items) == 0
    # 0 handed out, 1 and 2 queued, 3 held by the reader until there is room.
    assert fourth_read.wait(WAIT)
    time.sleep(0.5)  # room for a fifth read, were the reader unbounded
    assert read == [0, 1, 2, 3]
    assert list(items) == list(range(1, 10))


def _endless(closed: threading.Event) -> Iterator[int]:
    """Items for as long as asked, then ``closed`` set when the generator is closed."""
    try:
        yield from range(1_000_000)
    finally:
        closed.set()


def test_leaving_early_stops_the_reader_and_closes_the_source() -> None:
    closed = threading.Event()
    closed_in: list[str] = []

    def source() -> Iterator[int]:
        try:
            yield from range(1_000_000)
        finally:
            closed_in.append(threading.current_thread().name)
            closed.set()

    items = read_ahead(source())
    assert next(items) == 0
    items.close()
    assert closed.wait(WAIT)
    assert closed_in == ["pull-read-ahead"]


def test_reading_ahead_starts_before_the_first_item_is_asked_for() -> None:
    """The caller works while the first read runs (the worker counts while the source's
    server computes its digests), then takes the items in order."""
    started = threading.Event()

    def source() -> Iterator[int]:
        started.set()
        yield from range(5)

    with reading_ahead(source(), depth=2) as items:
        assert started.wait(WAIT)  # nothing taken yet
        assert list(items) == [0, 1, 2, 3, 4]


def test_leaving_reading_ahead_early_stops_the_reader_and_closes_the_source() -> None:
    closed = threading.Event()

    def copy() -> None:
        with reading_ahead(_endless(closed)) as items:
            assert next(items) == 0
            raise ValueError("copy failed")

    with pytest.raises(ValueError, match="copy failed"):
        copy()
    assert closed.wait(WAIT)


def test_an_error_while_handling_stops_the_reader() -> None:
    closed = threading.Event()

    def consume() -> None:
        for _ in read_ahead(_endless(closed)):
            raise ValueError("apply failed")

    with pytest.raises(ValueError, match="apply failed"):
        consume()
    assert closed.wait(WAIT)


def test_merged_sources_are_read_at_once_each_in_its_order() -> None:
    both_reading = threading.Barrier(2, timeout=WAIT)

    def source(name: str) -> Iterator[str]:
        both_reading.wait()  # each reader waits for the other: they run at once
        for n in range(100):
            yield f"{name}{n}"

    got = list(read_merged([source("a"), source("b")], depth=3))
    assert sorted(got) == sorted([f"a{n}" for n in range(100)] + [f"b{n}" for n in range(100)])
    for name in "ab":
        assert [g for g in got if g[0] == name] == [f"{name}{n}" for n in range(100)]


def test_a_merged_source_error_ends_the_reading_and_stops_the_others() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            yield from range(1_000_000_000)
        finally:
            closed.set()

    def failing() -> Iterator[int]:
        yield -1
        raise ConnectionError("half 2 failed")

    with pytest.raises(ConnectionError, match="half 2 failed"):
        for _ in read_merged([endless(), failing()]):
            pass
    assert closed.wait(WAIT)


class ThreadRecordingProvider:
    """Two pages of one user each; records which thread read each page."""

    name = "stack"
    threads: list[str]

    def __init__(self, ahead: int) -> None:
        self.ahead, self.threads = ahead, []

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        return read_ahead(self._pages(), self.ahead)  # as an adapter that pays for it does

    def _pages(self) -> Iterator[Page]:
        for n in range(2):
            self.threads.append(threading.current_thread().name)
            yield Page(changes=(upsert(f"s-{n}", n, provider="stack"),), cursor={"n": n})

    def cursor_since(self, since: datetime) -> Cursor | None:
        return None

    def close(self) -> None:
        return None


@pytest.mark.parametrize(("ahead", "reader"), [(0, "MainThread"), (1, "pull-read-ahead")])
def test_a_pull_applies_pages_an_adapter_reads_ahead(
    engine: Engine, ahead: int, reader: str
) -> None:
    provider = ThreadRecordingProvider(ahead)
    report = PullRunner(engine, SyncEngine(PlanSettings()), provider).run(full=False)
    assert report.counts["created"] == 2
    assert provider.threads == [reader, reader]
    assert load_cursor(engine, "stack") == {"n": 1}
