"""Writing one benchmark's table into bench/RESULTS.md without touching the others'."""

from __future__ import annotations

import platform
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine

from db.snapshot import refresh_statistics
from db.transaction import transaction
from sync_worker.changes import Source, UserChange
from sync_worker.engine import BatchResult, SyncEngine
from tests import pgserver

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Each section is rewritten by the script that produced it. Ratios compare figures\n"
    "measured in the same run, on the same machine (these machines are noisy).\n"
)


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section between `<!-- name -->` markers."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    python = f"{platform.python_implementation()} {platform.python_version()}"
    stamp = f"_{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {python}_"
    block = f"<!-- {name} -->\n{markdown.strip()}\n\n{stamp}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = (
        pattern.sub(lambda _m: block, text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{block}\n"
    )
    RESULTS.write_text(text)


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def apply_batch(
    db: Engine, engine: SyncEngine, changes: Sequence[UserChange], source: Source
) -> BatchResult:
    """One batch as the pull runner commits it: its own transaction, then the statistics
    refresh after a batch that created users (what ``PullRunner`` does, minus the cursor)."""
    with transaction(db) as conn:
        result = engine.apply(conn, changes, source=source)
    if result.created:
        with transaction(db) as conn:
            refresh_statistics(conn)
    return result


@contextmanager
def pg_database(prefix: str = "sw_bench") -> Iterator[str]:
    """A throwaway PostgreSQL database (libpq URL) on 127.0.0.1:5432, dropped afterwards."""
    url = pgserver.create_database(PG_ADMIN, prefix=prefix)
    try:
        yield url
    finally:
        pgserver.drop_database(PG_ADMIN, url)


def sqlalchemy_url(libpq_url: str) -> str:
    return libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)
