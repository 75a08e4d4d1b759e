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

#: A young collection every 10,000 net container allocations instead of every 700. At
#: 100,000 the rarer full collections let garbage pile up: a backfill's peak RSS grew with
#: the number of users (measured, bench/pull.py memory part).
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Collect once, freeze the survivors (imports, config) and raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
