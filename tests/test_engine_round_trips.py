"""Round trips of a webhook-sized batch on PostgreSQL: a fixed few, whatever its size.

A batch of one change waits for the database once per statement it sends alone: those waits,
not the work, were most of its latency (issue #13: 13 round trips, 13.8 ms p50). The writes
go in one pipeline and a small batch reads its users' rows with its identities, so the count
is fixed whatever the batch's size. Counted from libpq's protocol trace of the connection:
every simple Query and every Sync is one wait for the server.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence

import pytest
from sqlalchemy import Engine, text

from db.connect import make_engine
from db.transaction import transaction
from sync_worker.changes import Source, UserChange
from sync_worker.engine import PlanSettings, SyncEngine
from tests.conftest import SCHEMA
from tests.factories import upsert

pytestmark = pytest.mark.postgres

# BEGIN, SAVEPOINT, the writers' lock, the read of identities with their users' rows, the
# pipelined writes, RELEASE SAVEPOINT (COMMIT comes after, outside the count).
RENAME_ROUND_TRIPS = 6
_SENT = re.compile(r"\tF\t\d+\t(Query|Sync)\b")


def round_trips(db: Engine, changes: Sequence[UserChange]) -> int:
    """Waits for the server while ``changes`` are applied in their own transaction,
    from its BEGIN to before its COMMIT."""
    engine = SyncEngine(PlanSettings())
    with tempfile.TemporaryFile("w+") as trace, transaction(db) as conn:
        pgconn = conn.connection.driver_connection.pgconn  # type: ignore[union-attr]
        pgconn.trace(trace.fileno())
        try:
            result = engine.apply(conn, list(changes), source=Source.WEBHOOK)
        finally:
            pgconn.untrace()
        assert not result.failures, result.failures
        trace.flush()
        os.fsync(trace.fileno())
        trace.seek(0)
        return sum(1 for line in trace if _SENT.search(line))


def test_a_rename_costs_a_fixed_few_round_trips_whatever_the_batch_size(pg_engine: Engine) -> None:
    created = [upsert(f"auth0|{n}", 0) for n in range(10)]
    round_trips(pg_engine, created)
    one = round_trips(pg_engine, [upsert("auth0|0", 1, name="Renamed once")])
    ten = round_trips(pg_engine, [upsert(f"auth0|{n}", 2, name=f"Renamed {n}") for n in range(10)])
    assert (one, ten) == (RENAME_ROUND_TRIPS, RENAME_ROUND_TRIPS)


def test_new_users_cost_one_more_round_trip_for_the_verified_email_lookup(
    pg_engine: Engine,
) -> None:
    one = round_trips(pg_engine, [upsert("auth0|new", 0)])
    ten = round_trips(pg_engine, [upsert(f"auth0|new{n}", 0) for n in range(10)])
    assert (one, ten) == (RENAME_ROUND_TRIPS + 1, RENAME_ROUND_TRIPS + 1)


@pytest.mark.parametrize("prepared", [True, False])
def test_prepared_statements_can_be_turned_off_for_poolers(
    pg_engine: Engine, prepared: bool
) -> None:
    """``database.prepared_statements: false`` (PgBouncer in transaction mode before 1.21
    loses a session's prepared statements): batches leave no prepared statement on the
    server session; on by default, the pipelined writes prepare theirs."""
    db = make_engine(
        pg_engine.url.render_as_string(hide_password=False),
        schema=SCHEMA,
        pool_size=1,
        prepared_statements=prepared,
    )
    engine = SyncEngine(PlanSettings())
    try:
        with db.connect() as conn:
            for version in range(8):  # past psycopg's automatic preparing (the fifth run)
                with conn.begin():
                    changes = [upsert(f"auth0|{n}", version, name=f"N{version}") for n in range(3)]
                    result = engine.apply(conn, changes, source=Source.WEBHOOK)
                    assert not result.failures, result.failures
            held = conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar_one()
    finally:
        db.dispose()
    assert (held > 0) is prepared
