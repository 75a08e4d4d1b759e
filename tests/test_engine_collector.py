"""The engine holds the cyclic garbage collector off during a batch and restores it after;
a pull holds it off from reading a page to applying it, and collects between pages."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from datetime import datetime

import pytest
from sqlalchemy import Engine

from providers.base import Cursor, Page
from sync_worker.changes import Source
from sync_worker.engine import PlanSettings, SyncEngine
from sync_worker.pull import PullRunner
from sync_worker.runtime import allow_collector_pauses, collector_paused
from tests.factories import T0, BoundEngine, upsert
from tests.test_readahead import ThreadRecordingProvider


@pytest.fixture
def collector_state() -> Iterator[None]:
    """The collector as it was, and pauses allowed as in a one-shot CLI process."""
    was = gc.isenabled()
    allow_collector_pauses(True)
    yield
    allow_collector_pauses(False)
    if was:
        gc.enable()
    else:
        gc.disable()


@pytest.fixture
def daemon_process() -> Iterator[None]:
    """Pauses not allowed, as in the daemon (web server, drainer and scheduler threads)."""
    was = gc.isenabled()
    allow_collector_pauses(False)
    gc.enable()
    yield
    if not was:
        gc.disable()


@pytest.mark.usefixtures("collector_state")
@pytest.mark.parametrize("enabled", [True, False])
def test_apply_restores_the_collector_as_it_found_it(engine: Engine, enabled: bool) -> None:
    if enabled:
        gc.enable()
    else:
        gc.disable()
    seen: list[bool] = []

    def clock() -> datetime:  # called once per batch, inside it
        seen.append(gc.isenabled())
        return T0

    sync = BoundEngine(engine, PlanSettings(), clock=clock)
    sync.apply([upsert("auth0|1")], source=Source.PULL)
    assert seen == [False]  # off while the batch ran
    assert gc.isenabled() is enabled


@pytest.mark.usefixtures("collector_state")
def test_overlapping_batches_resume_collection_when_the_last_one_ends() -> None:
    gc.enable()
    inside, release = threading.Barrier(2), threading.Event()

    def batch() -> None:
        with collector_paused():
            inside.wait()
            release.wait()

    other = threading.Thread(target=batch)
    other.start()
    with collector_paused():
        inside.wait()
    assert not gc.isenabled()  # the other batch is still running
    release.set()
    other.join()
    assert gc.isenabled()


class Node:
    other: object = None


class CollectorRecordingProvider(ThreadRecordingProvider):
    """Two pages. Records whether the collector ran while each was produced, and whether a
    garbage cycle made with the first page was gone by the time the second was asked for."""

    def __init__(self) -> None:
        super().__init__(ahead=0)
        self.collecting: list[bool] = []
        self.cycle_freed: bool | None = None

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        self.collecting.append(gc.isenabled())
        a, b = Node(), Node()
        a.other, b.other = b, a
        cycle = weakref.ref(a)
        del a, b
        yield Page(changes=(upsert("s-0", 0, provider="stack"),), cursor={"n": 0})
        self.cycle_freed = cycle() is None
        self.collecting.append(gc.isenabled())
        yield Page(changes=(upsert("s-1", 1, provider="stack"),), cursor={"n": 1})


@pytest.mark.usefixtures("collector_state")
def test_a_pull_pauses_collections_within_a_page_and_collects_between_pages(
    engine: Engine,
) -> None:
    gc.enable()
    provider = CollectorRecordingProvider()
    report = PullRunner(engine, SyncEngine(PlanSettings()), provider).run()
    assert report.counts["created"] == 2
    assert provider.collecting == [False, False]  # off from reading a page to applying it
    assert provider.cycle_freed  # the page's garbage cycle was collected after it
    assert gc.isenabled()


@pytest.mark.usefixtures("daemon_process")
def test_without_allowance_a_batch_leaves_the_collector_on_for_every_thread(
    engine: Engine,
) -> None:
    seen: list[bool] = []

    def clock() -> datetime:  # called once per batch, inside it
        seen.append(gc.isenabled())
        return T0

    BoundEngine(engine, PlanSettings(), clock=clock).apply([upsert("auth0|1")], source=Source.PULL)
    assert seen == [True]
    inside, release = threading.Barrier(2), threading.Event()

    def batch() -> None:
        with collector_paused():
            inside.wait()
            release.wait()

    other = threading.Thread(target=batch)
    other.start()
    inside.wait()
    try:
        assert gc.isenabled()  # another thread's pause does not stop this one's collections
    finally:
        release.set()
        other.join()
