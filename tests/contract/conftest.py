"""The contract suite: every engine rule against every path of the engine.

Issue #13: "If you add a second path, one contract suite runs every engine rule against
every path." The engine has two ways to write a batch on PostgreSQL: the planner (every
change), and the bulk create path (``engine.bulk``) for batches of ``bulk.THRESHOLD``
changes or more. Here ``engine`` and ``pg_engine`` are parametrized over both, the
threshold forced to 0 (every batch takes the bulk path first) or out of reach (none does),
and the existing engine tests are collected again under them (``test_rules.py``), plus
the differential test of the two (``test_differential.py``). The third path, the set-based
full pass (``engine.setbased``), applies whole passes, not batches: ``test_setpass.py`` runs
random Auth.js sources through it and through the per-row pass on twin databases.
"""

from __future__ import annotations

import sys

import pytest
from sqlalchemy import Engine

from sync_worker.engine import bulk
from tests.conftest import empty_tables

PATHS = {"per_row": sys.maxsize, "bulk": 0}


@pytest.fixture(params=[pytest.param(p, marks=pytest.mark.postgres) for p in PATHS])
def engine_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The path every SyncEngine made during the test takes (read at construction)."""
    monkeypatch.setattr(bulk, "THRESHOLD", PATHS[request.param])
    return str(request.param)


@pytest.fixture
def engine(engine_path: str, pg_engine_session: Engine) -> Engine:
    """The migrated PostgreSQL database, emptied, for the path of ``engine_path``."""
    empty_tables(pg_engine_session)
    return pg_engine_session


@pytest.fixture
def pg_engine(engine: Engine) -> Engine:
    return engine
