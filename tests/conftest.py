"""Shared fixtures: a real PostgreSQL (throwaway database per run) and SQLite, migrated.

``engine`` is parametrized over both dialects, so every contract test runs on each. The
PostgreSQL database is migrated once per run and its tables are emptied before each test;
SQLite gets a fresh copy of a migrated file per test.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from db.connect import make_engine
from db.migrate import upgrade
from db.tables import metadata
from tests import pgserver

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SCHEMA = "identity"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """Admin URL of a reachable PostgreSQL server; skip loudly (or fail in CI) if none."""
    try:
        with pgserver.postgres_admin_url() as url:
            yield url
    except Exception as exc:
        reason = f"PostgreSQL unavailable, PostgreSQL tests NOT RUN: {exc}"
        if IN_CI:
            pytest.fail(f"CI=true requires PostgreSQL: {exc}", pytrace=False)
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def make_pg_database(pg_admin_url: str) -> Iterator[Callable[[], str]]:
    """Factory of empty throwaway databases (dropped at the end of the run)."""
    created: list[str] = []

    def make() -> str:
        url = pgserver.create_database(pg_admin_url)
        created.append(url)
        return url

    yield make
    for url in created:
        pgserver.drop_database(pg_admin_url, url)


def sqlalchemy_url(libpq_url: str) -> str:
    return libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(scope="session")
def pg_engine_session(make_pg_database: Callable[[], str]) -> Iterator[Engine]:
    url = sqlalchemy_url(make_pg_database())
    engine = make_engine(url, schema=SCHEMA)
    upgrade(engine, SCHEMA)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = make_engine(f"sqlite:///{path}", schema=SCHEMA)
    upgrade(engine, SCHEMA)
    engine.dispose()
    return path


def empty_tables(engine: Engine) -> None:
    names = ", ".join(t.name for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty database on each dialect."""
    if request.param == "postgresql":
        pg: Engine = request.getfixturevalue("pg_engine_session")
        empty_tables(pg)
        yield pg
        return
    yield request.getfixturevalue("sqlite_engine")


@pytest.fixture
def sqlite_engine(sqlite_template: Path, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty SQLite database (a copy of the session's template)."""
    path = tmp_path / "worker.db"
    shutil.copy(sqlite_template, path)
    sqlite = make_engine(f"sqlite:///{path}", schema=SCHEMA)
    yield sqlite
    sqlite.dispose()


@pytest.fixture
def pg_engine(pg_engine_session: Engine) -> Engine:
    """The PostgreSQL database alone (for tests that are PostgreSQL-specific)."""
    empty_tables(pg_engine_session)
    return pg_engine_session
