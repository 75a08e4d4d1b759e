"""Which path a batch takes: the contract suite is only worth something if both are run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from db import bulk as bulk_store
from db.connect import make_engine
from db.migrate import upgrade
from sync_worker.changes import Source
from sync_worker.engine import PlanSettings, SyncEngine, bulk
from tests.conftest import SCHEMA, empty_tables
from tests.factories import BoundEngine, audit, login, rows, upsert


@pytest.fixture
def bulk_writes(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, int]]:
    """Rows per table of each bulk write (the real one runs: this only counts)."""
    calls: list[dict[str, int]] = []
    real = bulk_store.write_creates

    def counting(conn: Any, **tables: Any) -> None:
        counted = {k: list(v) for k, v in tables.items() if k != "stamp"}
        calls.append({k: len(v) for k, v in counted.items()})
        real(conn, **counted, stamp=tables["stamp"])

    monkeypatch.setattr(bulk_store, "write_creates", counting)
    return calls


def batch() -> list[Any]:
    creates = [upsert(f"auth0|{i}") for i in range(5)]
    return [*creates, login("auth0|1", "s1", 1), login("auth0|2", "s2", 2)]


@pytest.mark.postgres
def test_a_large_batch_writes_its_creates_in_bulk(
    pg_engine_session: Engine, bulk_writes: list[dict[str, int]]
) -> None:
    empty_tables(pg_engine_session)
    sync = BoundEngine(pg_engine_session, PlanSettings(), bulk_threshold=7)
    result = sync.apply(batch(), source=Source.PULL)
    assert result.counts == {"created": 5, "login": 2}
    assert bulk_writes == [
        {"users_rows": 5, "profile_rows": 5, "identity_rows": 5, "session_rows": 2,
         "audit_rows": 7}
    ]  # fmt: skip
    # The next batch updates them: nothing for the bulk path to write.
    renamed = [upsert(f"auth0|{i}", 1, name="Renamed") for i in range(5)]
    again = sync.apply([*renamed, login("auth0|3", "s3", 3)], source=Source.PULL)
    assert again.counts == {"updated": 5, "login": 1}
    assert len(bulk_writes) == 1


@pytest.mark.postgres
def test_a_batch_below_the_threshold_is_planned_row_by_row(
    pg_engine_session: Engine, bulk_writes: list[dict[str, int]]
) -> None:
    empty_tables(pg_engine_session)
    sync = BoundEngine(pg_engine_session, PlanSettings(), bulk_threshold=8)
    assert sync.apply(batch(), source=Source.PULL).counts == {"created": 5, "login": 2}
    assert bulk_writes == []


@pytest.mark.postgres
def test_a_refused_bulk_write_falls_back_to_the_per_row_path(
    pg_engine_session: Engine, bulk_writes: list[dict[str, int]]
) -> None:
    """The email check is the database's: the bulk COPY is refused, the batch is applied
    again row by row, the poison record isolated and the rest committed."""
    empty_tables(pg_engine_session)
    sync = BoundEngine(pg_engine_session, PlanSettings(), bulk_threshold=0)
    poison = upsert("auth0|bad", email="no-at-sign")
    result = sync.apply([*batch(), poison], source=Source.PULL)
    assert result.counts == {"created": 5, "login": 2, "failed": 1}
    assert len(bulk_writes) == 1  # tried once, for the whole batch
    assert len(rows(pg_engine_session, "users")) == 5
    failed = audit(pg_engine_session, action="failed")
    assert [(a["external_id"], a["error"][:27]) for a in failed] == [
        ("auth0|bad", "database refused the record")
    ]


def test_sqlite_always_plans_row_by_row(tmp_path: Path, bulk_writes: list[dict[str, int]]) -> None:
    db = make_engine(f"sqlite:///{tmp_path / 'worker.db'}", schema=SCHEMA)
    upgrade(db, SCHEMA)
    try:
        sync = BoundEngine(db, PlanSettings(), bulk_threshold=0)
        assert sync.apply(batch(), source=Source.PULL).counts == {"created": 5, "login": 2}
    finally:
        db.dispose()
    assert bulk_writes == []


def test_the_default_threshold_is_read_when_an_engine_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bulk, "THRESHOLD", sys.maxsize)
    assert SyncEngine(PlanSettings()).bulk_threshold == sys.maxsize
    assert SyncEngine(PlanSettings(), bulk_threshold=3).bulk_threshold == 3
