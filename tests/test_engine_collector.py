"""The engine holds the cyclic garbage collector off during a batch and restores it after."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from datetime import datetime

import pytest
from sqlalchemy import Engine

from sync_worker.changes import Source
from sync_worker.engine import SyncEngine
from sync_worker.plan import PlanSettings
from sync_worker.runtime import collector_paused
from tests.factories import T0, upsert


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
