"""What the collector pause is worth: engine applies with and without it, paired.

Run: ``.venv/bin/python bench/gc_pause.py [--users N] [--pairs K]``. The one-shot commands
(``backfill``, ``sync``) allow ``runtime.collector_paused`` to switch the cyclic garbage
collector off during a batch; the daemon never does, because there a web server, the
drainer and the scheduler run in threads side by side and one thread's pause would stop
collections for all. This measures what the daemon gives up: the same initial load of N
Auth0-shaped users (bench/engine.py's records) into PostgreSQL, each in a fresh process with
the console script's GC tuning, once with pauses allowed and once without, in pairs; the
table shows the median of the pairs' ratios (this machine is noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

from bench.engine import SCHEMA, change_batches, run_engine, scratch  # noqa: E402
from bench.results import table, write_section  # noqa: E402
from db.connect import make_engine  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from sync_worker.changes import Source  # noqa: E402
from sync_worker.logging import configure  # noqa: E402
from sync_worker.runtime import allow_collector_pauses, tune_gc  # noqa: E402


def child(url: str, n: int, batch: int, paused: bool) -> None:
    """One initial load in this fresh process; prints the seconds inside the engine."""
    configure("warning", "json")
    tune_gc()  # as the console script does
    allow_collector_pauses(paused)
    engine = make_engine(url, schema=SCHEMA)
    upgrade(engine, SCHEMA)
    phase = run_engine(engine, change_batches(0, n, batch), Source.BACKFILL)
    engine.dispose()
    print(json.dumps({"seconds": phase.seconds}))


def _timed(n: int, batch: int, *, paused: bool) -> float:
    with scratch("postgresql") as place:
        url = place.target("engine").url
        out = subprocess.run(
            [sys.executable, __file__, "--child", url, str(n), str(batch), str(int(paused))],
            capture_output=True, text=True, check=True, timeout=3600,
        ).stdout  # fmt: skip
    seconds: float = json.loads(out.strip().splitlines()[-1])["seconds"]
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        url, n, batch, paused = args.child
        child(url, int(n), int(batch), paused == "1")
        return
    pairs = []
    for k in range(args.pairs):
        # Alternate which runs first, so a slow spell does not always land on one side.
        order = (True, False) if k % 2 == 0 else (False, True)
        times = {p: _timed(args.users, args.batch_size, paused=p) for p in order}
        pairs.append((times[True], times[False]))
        print(f"pair {k + 1}: paused {times[True]:.2f} s, unpaused {times[False]:.2f} s")
    ratios = [unpaused / paused for paused, unpaused in pairs]
    median = statistics.median(ratios)
    chosen = min(pairs, key=lambda p: abs(p[1] / p[0] - median))
    rows: list[list[object]] = [
        ["one-shot commands (pauses allowed)", f"{chosen[0]:.2f}", "1.00x"],
        ["daemon (no pauses)", f"{chosen[1]:.2f}", f"{median:.2f}x"],
    ]
    markdown = "\n\n".join([
        "## Collector pause (bench/gc_pause.py)",
        f"Initial load of {args.users:,} Auth0-shaped users into PostgreSQL, seconds inside "
        f"the engine, each load in a fresh process; the pair whose ratio is the median of "
        f"{args.pairs} (ratios: {', '.join(f'{r:.2f}' for r in ratios)}).",
        table(["process", "seconds", "time vs paused"], rows),
        "The daemon does not pause the collector (its web server, drainer and scheduler "
        "threads would all stop collecting while any batch ran); this is what that costs "
        "a bulk load. Webhook batches are small, and a backfill runs as its own process.",
    ])  # fmt: skip
    print(markdown)
    if not args.no_write:
        write_section("gc-pause", markdown)


if __name__ == "__main__":
    main()
