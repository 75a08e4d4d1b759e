"""One dlt run for bench/authjs_scale.py: the Auth.js tables merged into PostgreSQL.

Runs in a virtualenv of its own (``.venv-dlt``, made by the benchmark on first use), so that
dlt's dependencies never reach the worker's environment: there they changed what the
worker's processes import at start-up (dlt brings ``rich``, which ``structlog`` loads when it
is installed) and so what the benchmark measured.

Usage: ``.venv-dlt/bin/python bench/dlt_child.py SOURCE_URL DEST_URL PIPELINES_DIR``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

TABLES = ["users", "accounts", "sessions"]


def main(source: str, dest: str, pipelines: str) -> None:
    # Imported by name: dlt is installed in .venv-dlt only, not where mypy runs.
    dlt: Any = importlib.import_module("dlt")
    sources: Any = importlib.import_module("dlt.sources.sql_database")
    src = sources.sql_database(credentials=source, table_names=TABLES)
    for name in TABLES:
        src.resources[name].apply_hints(write_disposition="merge", primary_key="id")
    pipeline = dlt.pipeline(
        pipeline_name="authjs_scale",
        # dlt insists on a password; the server trusts local connections and ignores it.
        destination=dlt.destinations.postgres(dest.replace("postgres@", "postgres:unused@", 1)),
        dataset_name="authjs",
        pipelines_dir=pipelines,
    )
    pipeline.run(src)


if __name__ == "__main__":
    main(*sys.argv[1:4])
