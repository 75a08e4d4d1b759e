"""The engine's statements cost the same however large the tables grow.

A batch's lookups must be bounded by the batch, not by the tables: a plan that reads more of
a table as it grows makes a bulk load quadratic (issue #13: a session lookup planned while
``user_sessions`` was empty kept scanning it, 87 % of a 100,000-user load). These tests run
the same batches through ``SyncEngine.apply`` against tables seeded at two sizes (10x apart,
with SQL, not the engine) on one connection, as a pull or a drainer keeps one, and compare
what every statement read:

- PostgreSQL: ``auto_explain`` reports each executed plan with its buffers (as a NOTICE to
  this connection); the plans are the ones the engine really ran, cached or not, and no
  ANALYZE runs in between (nothing may depend on autovacuum or on a statistics refresh);
- SQLite: ``EXPLAIN QUERY PLAN`` of every statement the engine ran names no full scan of a
  worker table.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, event, text

from db import setbased
from db.connect import make_engine
from db.migrate import upgrade
from db.snapshot import refresh_statistics
from sync_worker.changes import ChangeKind, LinkedIdentity, SessionInfo, Source, UserChange
from sync_worker.engine import PlanSettings, SyncEngine
from sync_worker.engine.setbased import PerRow, apply_batch
from tests.conftest import sqlalchemy_url
from tests.factories import delete, upsert

# Plans are warmed (and would be cached) at TINY, when a scan is the cheapest plan; what each
# statement reads is then compared at SMALL and LARGE, where an index is, whatever the batch.
TINY, SMALL, LARGE = 400, 4_000, 40_000
BATCH = 60  # changes of each kind below, per batch
WARM = 6  # batches before measuring: psycopg prepares a statement on its 5th run
PROVIDER = "authjs"
T = datetime(2026, 1, 1, tzinfo=UTC)
# Buffers a statement may read at LARGE for each one at SMALL. A scan of what grew reads 10x;
# index descents grow with the depth of the index (log n), and the batch's keys, which sat
# on a few leaves of the small index, spread over more leaves of the large one (measured:
# up to 3.5x for the identities' primary key, whose text keys "1".."60" interleave with
# those seeded later; 6.3x once in a CI run on a loaded machine). A scan grows with the
# table, 10x here: 8x tells the two apart.
GROWTH = 8.0
SLACK = 32  # buffers: catalogue pages and root jitter
_WORKER_TABLES = ("users", "profiles", "user_identities", "user_sessions", "sync_audit")

_SEED = """
INSERT INTO users (id, email, email_verified, name, role, blocked, created_at, updated_at)
SELECT {user}, 'user' || i || '@example.org', true, 'User ' || i, 'member', false, :t, :t
FROM {series};
INSERT INTO profiles (id, user_id, display_name, timezone, currency, locale, settings,
                      created_at, updated_at)
SELECT {profile}, {user}, 'User ' || i, 'UTC', 'USD', 'en', '{{}}', :t, :t
FROM {series};
INSERT INTO user_identities (provider, external_id, user_id, email, upstream_updated_at,
                             content_hash, raw, first_seen_at, last_synced_at)
SELECT :provider, CAST(i AS TEXT), {user}, 'user' || i || '@example.org', :t, 'h' || i, '{{}}',
       :t, :t
FROM {series};
INSERT INTO user_sessions (id, user_id, provider, external_session_id, created_at,
                           last_seen_at, expires_at)
SELECT {session}, {user}, :provider, 'sess' || i, :t, :t, :expires
FROM {series};
INSERT INTO sync_audit (occurred_at, source, provider, external_id, user_id, action,
                        event_id)
SELECT :t, 'pull', :provider, CAST(i AS TEXT), {user}, 'created', 'evt' || i
FROM {series}
"""


def _seed_sql(dialect: str) -> list[str]:
    # Ids are 32 hex digits: a letter per table, then the user's number.
    prefixes = {"user": "a", "profile": "b", "session": "c"}
    if dialect == "postgresql":
        ids = {k: f"('{p}' || lpad(CAST(i AS TEXT), 31, '0'))::uuid" for k, p in prefixes.items()}
        series, prefix = "generate_series(CAST(:lo AS int), CAST(:hi AS int)) AS i", ""
    else:  # Uuid is stored as hex text on SQLite, which has no generate_series
        ids = {k: f"'{p}' || printf('%031d', i)" for k, p in prefixes.items()}
        series = "g"
        prefix = "WITH RECURSIVE g(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM g WHERE i < :hi) "
    sql = _SEED.format(series=series, **ids)
    return [prefix + s.strip() for s in sql.split(";") if s.strip()]


def seed(db: Engine, lo: int, hi: int) -> None:
    """Users lo..hi, each with a profile, an identity, a session and an audit row."""
    lite = db.dialect.name == "sqlite"
    t: Any = T.strftime("%Y-%m-%d %H:%M:%S.%f") if lite else T
    expires: Any = (
        (T + timedelta(days=30)).strftime("%Y-%m-%d %H:%M:%S.%f")
        if lite
        else (T + timedelta(days=30))
    )
    params = {"lo": lo, "hi": hi, "t": t, "expires": expires, "provider": PROVIDER}
    with db.begin() as conn:
        for statement in _seed_sql(db.dialect.name):
            conn.execute(text(statement), params)


def batch(step: int) -> list[UserChange]:
    """Every kind of lookup and write, on rows that exist at every size (ids < TINY)."""
    base = step * 5  # each step changes other users: deletes must find live identities
    changed = [
        upsert(str(i), 10 + step, provider=PROVIDER, name=f"User {i} v{step}", event_id=None)
        for i in range(1, BATCH + 1)
    ]
    created = [
        upsert(
            f"new-{step}-{j}",
            provider=PROVIDER,
            linked=(LinkedIdentity(provider=f"{PROVIDER}:github", external_id=f"gh-{step}-{j}"),),
        )
        for j in range(BATCH)
    ]
    logins = [_login(i, step) for i in range(1, BATCH + 1)]
    deleted = [delete(str(TINY - base - j), 20 + step, provider=PROVIDER) for j in range(5)]
    stale = [
        upsert(str(i), -60, provider=PROVIDER, event_id=f"stale-{step}-{i}") for i in (100, 101)
    ]
    return [*changed, *created, *logins, *deleted, *stale]


def _login(i: int, step: int) -> UserChange:
    seen = T + timedelta(hours=step + 1)
    return UserChange(
        provider=PROVIDER,
        external_id=str(i),
        kind=ChangeKind.LOGIN,
        version=seen,
        session=SessionInfo(
            external_session_id=f"sess{i}",
            created_at=T,
            last_seen_at=seen,
            expires_at=seen + timedelta(days=30),
        ),
    )


# The engine's two paths (tests/contract): the planner alone, or the bulk create path first.
PATHS = {"per-row": 10**9, "bulk": 0}


def run(db: Engine, conn: Connection, step: int, path: str = "per-row") -> None:
    engine = SyncEngine(PlanSettings(), bulk_threshold=PATHS[path])
    with conn.begin():
        result = engine.apply(conn, batch(step), source=Source.WEBHOOK)
    assert not result.failures, result.failures


# -- PostgreSQL: buffers of every executed plan ------------------------------------------


class Plans:
    """Buffers read by each statement, from auto_explain's notices."""

    def __init__(self) -> None:
        self.buffers: dict[str, int] = defaultdict(int)
        self.plans: dict[str, str] = {}
        self.on = False

    def __call__(self, diag: psycopg.errors.Diagnostic) -> None:
        message = diag.message_primary or ""
        if not self.on or "plan:" not in message:
            return
        doc = json.loads(message.split("plan:", 1)[1])
        query = re.sub(r"\s+", " ", doc["Query Text"]).strip()
        plan = doc["Plan"]
        self.buffers[query] += plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)
        self.plans[query] = json.dumps(plan, indent=1)[:3000]


@contextmanager
def explained(url: str) -> Iterator[tuple[Engine, Connection, Plans]]:
    """One connection whose every statement's plan and buffers reach ``Plans``."""
    db = make_engine(url, schema="identity", pool_size=1)
    plans = Plans()
    try:
        with db.connect() as conn:
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            try:
                conn.exec_driver_sql("LOAD 'auto_explain'")
            except Exception as exc:  # the module is optional in a server
                pytest.skip(f"auto_explain not loadable here: {exc}")
            for name, value in (("log_min_duration", "0"), ("log_analyze", "on"),
                                ("log_buffers", "on"), ("log_timing", "off"),
                                ("log_format", "json"), ("log_level", "notice")):  # fmt: skip
                conn.exec_driver_sql(f"SET auto_explain.{name} = {value}")
            conn.commit()
            driver.add_notice_handler(plans)
            yield db, conn, plans
    finally:
        db.dispose()


def assert_not_grown(plans: Plans, small: dict[str, int], large: dict[str, int]) -> None:
    """No statement read more than GROWTH times its buffers at SMALL once at LARGE."""
    assert small, "auto_explain reported nothing"
    grown = {
        query: (small.get(query, 0), read)
        for query, read in large.items()
        if read > GROWTH * small.get(query, 0) + SLACK
    }
    assert not grown, "\n\n".join(
        f"{q}\nbuffers {a} at {SMALL} rows -> {b} at {LARGE}\n{plans.plans[q]}"
        for q, (a, b) in grown.items()
    )


@pytest.fixture
def fresh_pg(make_pg_database: Callable[[], str]) -> Iterator[Engine]:
    """A migrated database of its own: no statistics left by other tests' tables."""
    db = make_engine(sqlalchemy_url(make_pg_database()), schema="identity")
    upgrade(db, "identity")
    yield db
    db.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("analyzed", [False, True], ids=["never-analyzed", "analyzed-at-small"])
@pytest.mark.parametrize("path", list(PATHS))
def test_no_statement_reads_more_as_the_tables_grow(
    fresh_pg: Engine, analyzed: bool, path: str
) -> None:
    """Plans warmed on tiny tables; then the same batch at SMALL and at LARGE rows, with no
    statistics at all (a drainer's database), or with the statistics the pull runner's
    refresh takes at SMALL, stale by 10x at LARGE."""
    url = fresh_pg.url.render_as_string(hide_password=False)
    seed(fresh_pg, 1, TINY)
    with explained(url) as (db, conn, plans):
        for step in range(WARM):
            run(db, conn, step, path)  # plans made (and cached, if any were) on tiny tables
        seed(fresh_pg, TINY + 1, SMALL)
        if analyzed:
            with fresh_pg.begin() as other:
                other.execute(text(f"ANALYZE {', '.join(_WORKER_TABLES)}"))
        plans.on = True
        run(db, conn, WARM, path)
        small = dict(plans.buffers)
        plans.buffers.clear()
        seed(fresh_pg, SMALL + 1, LARGE)
        run(db, conn, WARM + 1, path)
        large = dict(plans.buffers)
    assert_not_grown(plans, small, large)


# -- SQLite: no full scan of a worker table ----------------------------------------------

_SCAN = re.compile(r"\bSCAN (\w+)")


def test_sqlite_runs_no_full_scan_of_a_worker_table(sqlite_engine: Engine) -> None:
    lite = sqlite_engine
    seed(lite, 1, TINY)
    statements: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        if not many and statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            statements.append((statement, params))

    with lite.connect() as conn:
        event.listen(lite, "before_cursor_execute", capture)
        try:
            run(lite, conn, 0)
        finally:
            event.remove(lite, "before_cursor_execute", capture)
        assert statements
        scans = []
        for statement, params in statements:
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params).all()
            details = [str(row[-1]) for row in rows]
            for detail in details:
                match = _SCAN.search(detail)
                if match and match.group(1) in _WORKER_TABLES and "USING" not in detail:
                    scans.append(f"{statement}\n  {details}")
    assert not scans, "\n".join(scans)


# -- the statistics refresh --------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("schema_first", [False, True], ids=["plain", "schema-first"])
def test_the_statistics_refresh_covers_every_looked_up_table(
    fresh_pg: Engine, schema_first: bool
) -> None:
    """The pull runner re-analyzes what the lookups read once it has doubled, sessions
    included (they were left out: issue #13); also with another schema first on the
    search_path, as a set pass has its staging schema (none was analyzed then)."""
    with fresh_pg.begin() as conn:
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
    seed(fresh_pg, 1, 1500)
    with fresh_pg.begin() as conn:
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
    deadline = time.monotonic() + 10
    query = text(
        "SELECT n_mod_since_analyze FROM pg_stat_user_tables"
        " WHERE schemaname = 'identity' AND relname = 'user_sessions'"
    )
    while time.monotonic() < deadline:  # the seeding backend reports its counts when idle
        with fresh_pg.connect() as conn:
            if (conn.execute(query).scalar() or 0) >= 1500:
                break
        time.sleep(0.1)
    with fresh_pg.begin() as conn:
        if schema_first:
            conn.execute(text("CREATE SCHEMA sw_pass_stats"))
            conn.execute(
                text(
                    "SELECT set_config('search_path',"
                    " 'sw_pass_stats, ' || current_setting('search_path'), true)"
                )
            )
        refresh_statistics(conn)
        conn.execute(text("DROP SCHEMA IF EXISTS sw_pass_stats"))
    with fresh_pg.connect() as conn:
        analyzed = conn.execute(
            text(
                "SELECT relname FROM pg_class WHERE relnamespace = 'identity'::regnamespace"
                " AND relkind = 'r' AND reltuples >= 1500"
            )
        ).scalars()
        assert {"users", "profiles", "user_identities", "user_sessions"} <= set(analyzed)


# -- the set pass's batch statements -----------------------------------------------------


def _set_source(first: int, count: int) -> setbased.Streams:
    """``count`` new Auth.js users (ids from ``first``), each with a verified email no
    seeded user holds, an account and a live session: simple creates, whose classification
    still looks up each verified email."""
    users, accounts, sessions, digests = [], [], [], []
    for n in range(count):
        uid = first + n
        users.append(
            f"{uid}\tNew {uid}\tnew{uid}@example.org\t2025-01-01 00:00:00+00\t\\N\t{n + 1}\n"
        )
        accounts.append(f"{uid}\tgithub\tgh{uid}\n")
        sessions.append(f"{uid}\ttok{uid}\t2027-01-01 00:00:00+00\n")
        digests.append(f"{uid}\td{uid}\t1\n")
    tz = "timestamp with time zone"
    return [
        ("users", (("id", "integer"), ("name", "text"), ("email", "text"),
                   ("email_verified", tz), ("image", "text"), ("ord", "bigint")),
         ["".join(users).encode()]),
        ("accounts", (("uid", "integer"), ("provider", "text"), ("acct", "text")),
         ["".join(accounts).encode()]),
        ("sessions", (("uid", "integer"), ("token", "text"), ("expires", tz)),
         ["".join(sessions).encode()]),
        ("digests", (("uid", "integer"), ("digest", "text"), ("n", "integer")),
         ["".join(digests).encode()]),
    ]  # fmt: skip


def _set_batch(conn: Connection, step: int) -> None:
    """The set pass's batch ``step`` (positions of BATCH users), then its classification
    probing the stored rows (the path a refused create takes), rolled back."""
    lo, hi = step * BATCH + 1, (step + 1) * BATCH

    def per_row(changed: object) -> PerRow:
        raise AssertionError(f"every user is a simple create: {changed}")

    with conn.begin():
        done = apply_batch(
            conn, lo, hi, provider=PROVIDER, settings=PlanSettings(), now=T, version=T,
            source="pull", run_id=None, per_row=per_row,
        )  # fmt: skip
        assert done.created == BATCH, done
    with conn.begin() as trans:
        setbased.classify(conn, hi + 1, hi + BATCH, provider=PROVIDER, link=True, probe=True)
        trans.rollback()


@pytest.mark.postgres
def test_set_pass_batches_read_no_more_as_the_tables_grow(fresh_pg: Engine) -> None:
    """As above, for the set pass's batches (``engine.setbased.apply_batch``): classified
    and written in SQL against worker tables at SMALL and at LARGE rows. A probe that
    scanned the users for each verified email (the email key in another collation than
    the index's) made a 100,000-user load spend 4 s a batch."""
    url = fresh_pg.url.render_as_string(hide_password=False)
    seed(fresh_pg, 1, TINY)
    steps = WARM + 2
    with explained(url) as (_db, conn, plans):
        with conn.begin():
            setbased.stage(
                conn, _set_source(10**6, (steps + 1) * BATCH), provider=PROVIDER,
                role="member", observed=T, max_age_seconds=30 * 86400.0,
            )  # fmt: skip
        for step in range(WARM):
            _set_batch(conn, step)
        seed(fresh_pg, TINY + 1, SMALL)
        plans.on = True
        _set_batch(conn, WARM)
        small = dict(plans.buffers)
        plans.buffers.clear()
        seed(fresh_pg, SMALL + 1, LARGE)
        _set_batch(conn, WARM + 1)
        large = dict(plans.buffers)
        with conn.begin():
            setbased.drop(conn)
    assert_not_grown(plans, small, large)
