"""The engine holds the cyclic garbage collector off during a batch and restores it after;
a pull holds it off from reading a page until that page is applied."""

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
from sync_worker.engine import SyncEngine
from sync_worker.plan import PlanSettings
from sync_worker.pull import PullRunner
from sync_worker.runtime import collector_paused
from tests.factories import T0, upsert
from tests.test_readahead import ThreadRecordingProvider


@pytest.fixture
def collector_state() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
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

    sync = SyncEngine(engine, PlanSettings(), clock=clock)
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


class CollectorRecordingProvider(ThreadRecordingProvider):
    """Two pages; records whether the collector ran while each was produced."""

    def __init__(self) -> None:
        super().__init__(ahead=0)
        self.collecting: list[bool] = []

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        for n in range(2):
            self.collecting.append(gc.isenabled())
            yield Page(changes=(upsert(f"s-{n}", n, provider="stack"),), cursor={"n": n})
        self.collecting.append(gc.isenabled())  # asked for a third page: there is none


@pytest.mark.usefixtures("collector_state")
def test_a_pull_holds_the_collector_off_from_reading_a_page_to_applying_it(
    engine: Engine,
) -> None:
    gc.enable()
    provider = CollectorRecordingProvider()
    report = PullRunner(engine, SyncEngine(engine, PlanSettings()), provider).run()
    assert report.counts["created"] == 2
    assert provider.collecting == [False, False, False]
    assert gc.isenabled()  # on again once the run is over


class Node:
    other: object = None


@pytest.mark.usefixtures("collector_state")
def test_the_collection_due_runs_when_the_last_pause_ends() -> None:
    """Without waiting for an allocation: a pull may go from pause to pause without one."""
    thresholds = gc.get_threshold()
    gc.enable()
    gc.set_threshold(100, 10, 10)
    try:
        with collector_paused():
            # Live containers count towards the threshold (freed ones do not).
            young: list[list[int]] = [[] for _ in range(500)]
            a, b = Node(), Node()
            a.other, b.other = b, a
            cycle = weakref.ref(a)
            del a, b
        assert cycle() is None
        assert len(young) == 500
    finally:
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector_state")
def test_no_collection_when_none_is_due() -> None:
    gc.enable()
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()  # counts start from zero
    gc.callbacks.append(count)
    try:
        with collector_paused():
            pass
    finally:
        gc.callbacks.remove(count)
    assert collections == []
