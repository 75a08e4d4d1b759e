"""The settings a set-based batch runs under (``db.setbased.batch_settings``)."""

from __future__ import annotations

import pytest
from sqlalchemy import Connection, Engine, text

from db.setbased import batch_settings
from db.transaction import transaction

pytestmark = pytest.mark.postgres


def _settings(conn: Connection) -> dict[str, str]:
    names = ("jit", "plan_cache_mode", "synchronous_commit")
    return {n: str(conn.execute(text(f"SHOW {n}")).scalar_one()) for n in names}


def test_a_set_batch_plans_per_run_without_jit_and_commits_without_a_flush(
    pg_engine: Engine,
) -> None:
    """JIT compiled one classification for 300 ms of a 60 ms batch once the worker's
    statistics grew its estimates: the batch turns it off, for its transaction only."""
    with pg_engine.connect() as conn:
        before = _settings(conn)
    with transaction(pg_engine) as conn:
        batch_settings(conn)
        assert _settings(conn) == {
            "jit": "off",
            "plan_cache_mode": "auto",
            "synchronous_commit": "off",
        }
    with pg_engine.connect() as conn:
        assert _settings(conn) == before  # LOCAL: gone with the transaction
