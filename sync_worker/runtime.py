"""Process-wide runtime settings for the worker's own processes (the console script).

The worker allocates millions of short-lived, acyclic containers (decoded JSON records,
planned rows), which reference counting frees on its own. CPython's default cyclic-GC
thresholds (700 allocations) make the collector walk those young objects, and every
module-level object of SQLAlchemy, pydantic and friends, over and over: measured, it took
about 40% of decoding and mapping a page of Auth0 export records, and 10-15% of the engine's
initial load at 20,000 users (A/B runs, see the commit). Freezing what exists after start-up
and collecting young objects less often keeps the collector for the rare real cycle.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: A young collection every 10,000 net container allocations instead of every 700. At
#: 100,000 the rarer full collections let garbage pile up: a backfill's peak RSS grew with
#: the number of users (measured, bench/pull.py memory part).
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Collect once, freeze the survivors (imports, config) and raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@contextmanager
def start_up() -> Iterator[None]:
    """The console script's imports without collections, then ``tune_gc``'s settings.

    Nearly everything start-up allocates (modules, classes, SQLAlchemy's and pydantic's
    structures) lives as long as the process: collections while importing walked it all
    over and over, and the one after it once more, to free a few hundred objects, which
    are frozen with the rest instead (some tens of milliseconds of every command's
    start, measured on an Auth.js backfill)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        if enabled:
            gc.enable()


class _CollectorPause:
    """Holds the cyclic garbage collector off while any thread is inside a pause.

    For bursts of CPU work whose containers all live until the burst ends (an engine batch,
    an export page being decoded): collections during them would walk every one of those
    objects again and again, and free nothing. Measured: 18-24% of ``apply``, before the
    thresholds above. Reference counting still frees what dies; collections resume when the
    last pause in any thread ends, and the allocations made meanwhile trigger one then.

    The collector is process-wide, so a pause in one thread stops it for all: only a
    process that does one batch job at a time may pause it (``allow_collector_pauses``,
    called by the one-shot CLI commands). In the daemon, where a web server, the drainer
    and the scheduler run side by side, busy batches could keep it off for good; pauses
    do nothing there unless allowed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False
        self.allowed = False

    def enter(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._resume:
                gc.enable()


_COLLECTOR_PAUSE = _CollectorPause()


def allow_collector_pauses(allowed: bool = True) -> None:
    """Let ``collector_paused`` switch the collector off: for one-shot batch processes only."""
    _COLLECTOR_PAUSE.allowed = allowed


@contextmanager
def collector_paused() -> Iterator[None]:
    """The process-wide pause, where allowed: nest and overlap it freely, across threads."""
    if not _COLLECTOR_PAUSE.allowed:
        yield
        return
    _COLLECTOR_PAUSE.enter()
    try:
        yield
    finally:
        _COLLECTOR_PAUSE.exit()


def collect_young() -> None:
    """A collection now, at a point where the caller's burst objects are already freed.

    For a loop whose pauses leave collections no room (the pull runner pauses from reading
    a page to applying it): its garbage cycles (SQLAlchemy statements holding their
    parameter lists) would otherwise wait for the net container count, which stays low
    when each page is freed by reference counting: a pass of 100 pages ran one collection
    and its RSS rose all along (measured). The older generations are collected on CPython's
    own cadence, once the collections of the generation below pass their threshold, but a
    full one does not wait for a quarter of the heap to be new: with start-up objects
    frozen (``tune_gc``) it walks little.
    """
    counts, thresholds = gc.get_count(), gc.get_threshold()
    # As CPython picks when a young collection is due: the oldest generation over its threshold.
    gc.collect(max(g for g in (0, 1, 2) if g == 0 or counts[g] > thresholds[g]))
