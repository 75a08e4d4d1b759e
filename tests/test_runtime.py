"""The console script's process settings (sync_worker.runtime)."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import sysconfig
import weakref
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from sync_worker import cli
from sync_worker.runtime import GC_THRESHOLDS, collect_young, start_up, tune_gc


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
    """A cycle made after tuning is freed by the collector's own cadence (no gc.collect):
    tuning must neither switch collections off nor put them out of a backfill's reach."""
    tune_gc()
    assert gc.isenabled()
    freed: list[str] = []

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    weakref.finalize(a, freed.append, "cycle")
    del a, b
    assert freed == []  # reference counting alone cannot free a cycle
    kept: list[list[int]] = []
    # Net container allocations drive young collections: one is due within a threshold's worth.
    while not freed and len(kept) <= 2 * GC_THRESHOLDS[0]:
        kept.append([])
    assert freed == ["cycle"]
    assert len(kept) > GC_THRESHOLDS[0] // 2, "collected far sooner than the tuned threshold"


@pytest.mark.usefixtures("restored_gc")
@pytest.mark.parametrize("enabled", [True, False])
def test_start_up_collects_nothing_then_freezes_and_tunes(enabled: bool) -> None:
    """The console script's imports run without collections; what they made is frozen
    uncollected, the thresholds raised, and the collector left as it was found."""
    started: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    was = gc.isenabled()
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()
    gc.callbacks.append(record)
    try:
        with start_up():
            assert not gc.isenabled()
            kept: list[list[int]] = [[] for _ in range(5 * GC_THRESHOLDS[0])]  # collections, if on
        assert gc.isenabled() is enabled
    finally:
        gc.callbacks.remove(record)
        (gc.enable if was else gc.disable)()
    assert started == []
    assert len(kept) == 5 * GC_THRESHOLDS[0]
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 1000


def test_the_cli_module_leaves_the_commands_imports_to_start_up() -> None:
    """Importing the console script's module imports none of the heavy packages: those come
    with ``build_parser``, which ``console`` calls inside ``start_up``."""
    code = (
        "import sys, sync_worker.cli\n"
        "heavy = ('sqlalchemy', 'pydantic', 'structlog', 'psycopg', 'yaml')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "sync_worker.cli.build_parser()\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1] == str(sorted(["sqlalchemy", "pydantic", "structlog", "psycopg", "yaml"]))


_PROBE = """
import gc, sys

def probe(event, args):
    # The moment main() reads its config file: by then console() must have tuned the collector.
    if event == "open" and str(args[0]).endswith("probe-config.yaml"):
        print("main reads its config with", gc.get_threshold(), gc.get_freeze_count() > 1000,
              file=sys.stderr)

sys.addaudithook(probe)
"""


def test_the_installed_console_script_tunes_gc_then_runs_main(tmp_path: Path) -> None:
    (script,) = entry_points(group="console_scripts", name="sync-worker")
    assert script.load() is cli.console
    executable = shutil.which("sync-worker", path=sysconfig.get_path("scripts"))
    assert executable is not None, "the console script is not installed"
    (tmp_path / "sitecustomize.py").write_text(_PROBE)
    config = tmp_path / "probe-config.yaml"
    config.write_text(f"database: {{url: 'sqlite:///{tmp_path / 'worker.db'}'}}\n")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run(
        [executable, "--config", str(config), "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    probes = [line for line in done.stderr.splitlines() if line.startswith("main reads")]
    assert probes[:1] == [f"main reads its config with {GC_THRESHOLDS} True"]
    assert done.stdout.startswith("database migrated from empty to ")  # main ran to its end


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
