"""The console script's process settings (sync_worker.runtime)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points

import pytest

from sync_worker import cli
from sync_worker.runtime import GC_THRESHOLDS, collect_young, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_start_up_objects_and_raises_thresholds() -> None:
    gc.unfreeze()
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 1000  # imported modules, not just a handful


@pytest.mark.usefixtures("restored_gc")
def test_cycles_are_still_collected_after_tuning() -> None:
    tune_gc()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2


def test_the_installed_console_script_tunes_gc_then_runs_main() -> None:
    (script,) = entry_points(group="console_scripts", name="sync-worker")
    assert script.load() is cli.console


def test_python_dash_m_runs_with_tuned_gc() -> None:
    code = (
        "import gc, runpy, sys; sys.argv = ['sync-worker', '--version'];\n"
        "try: runpy.run_module('sync_worker', run_name='__main__')\n"
        "except SystemExit: print(gc.get_threshold(), gc.get_freeze_count() > 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip().splitlines()[-1] == f"{GC_THRESHOLDS} True"


@pytest.mark.usefixtures("restored_gc")
def test_collect_young_follows_cpythons_cadence_for_older_generations() -> None:
    generations: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generations.append(info["generation"])

    gc.set_threshold(700, 1, 1)
    gc.collect()  # every count back to zero
    gc.callbacks.append(record)
    try:
        for _ in range(7):
            collect_young()
    finally:
        gc.callbacks.remove(record)
    # Each collection counts towards the next generation's threshold; one is collected
    # once its count passes it, as CPython does.
    assert generations == [0, 0, 1, 0, 0, 1, 2]
