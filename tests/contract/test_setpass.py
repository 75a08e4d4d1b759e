"""The set-based full pass against the per-row pass: twin workers fed by one Auth.js source.

Every pass runs twice at the same clock, into two PostgreSQL worker databases: once on the
set-based path (``sync_worker.engine.setbased``: simple creates in SQL, the rest through the
engine), once per row (``set_based=False``: the digest pass, the reference). Every worker
table must come out the same (generated ids and run ids aside, users named by their
identities), content hashes, audit rows, sessions and stored source digests included, and
so must the run's counts. Sources are random (hypothesis) and mix what routes a user away
from the set path: stored identities, email links, non-ASCII and control characters, shared
accounts and tokens, expired sessions, users without accounts, duplicate emails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select, text

from db import setstage
from db.connect import make_engine
from db.digests import stored_digests
from db.migrate import upgrade
from db.tables import sync_audit, users
from db.transaction import transaction
from providers.authjs import AuthjsProvider
from sync_worker.changes import ChangeKind, Source, UserAttributes, UserChange
from sync_worker.config import AuthjsSettings
from sync_worker.engine import PlanSettings, SyncEngine
from sync_worker.errors import ConfigError
from sync_worker.pull import PullReport, PullRunner
from tests.conftest import empty_tables, sqlalchemy_url
from tests.fakes.authjs import PG_ADAPTER_SCHEMA_SQL, make_loader
from tests.test_authjs_digest import normalized

pytestmark = pytest.mark.postgres

SCHEMA = "identity"
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class Twins:
    """One source (raw psycopg), two workers: ``sets`` (set path) and ``rows`` (per row)."""

    source_url: str
    source: psycopg.Connection[Any]
    sets: Engine
    rows: Engine
    now: datetime = START
    batch_size: int = 5
    plan: PlanSettings = field(default_factory=PlanSettings)
    reports: dict[bool, PullReport] = field(default_factory=dict)
    settings: AuthjsSettings | None = None  # the adapter's (default: the pg adapter's)
    # How the set pass stages (db.setstage): positions per range of sw_u (and per part of
    # the source), and whether on a second connection (else on the pass's own, into
    # temporary tables).
    staging_range: int = 3
    second_connection: bool = True

    def reset(self) -> None:
        self.source.execute("DROP SCHEMA public CASCADE")
        self.source.execute("CREATE SCHEMA public")
        ddl = "\n".join(
            line for line in PG_ADAPTER_SCHEMA_SQL.splitlines() if not line.startswith("\\")
        )
        self.source.execute(ddl)
        for worker in (self.sets, self.rows):
            empty_tables(worker)
        self.now = START
        self.reports = {}

    def user(
        self,
        name: str | None,
        email: str | None,
        verified: datetime | None = None,
        image: str | None = None,
    ) -> int:
        row = self.source.execute(
            'INSERT INTO users (name, email, "emailVerified", image) VALUES (%s, %s, %s, %s)'
            " RETURNING id",
            [name, email, verified, image],
        ).fetchone()
        assert row is not None
        return int(row[0])

    def account(self, user: int, provider: str, account_id: str) -> None:
        self.source.execute(
            'INSERT INTO accounts ("userId", type, provider, "providerAccountId")'
            " VALUES (%s, 'oauth', %s, %s)",
            [user, provider, account_id],
        )

    def session(self, user: int, token: str, expires: datetime) -> None:
        self.source.execute(
            'INSERT INTO sessions ("userId", expires, "sessionToken") VALUES (%s, %s, %s)',
            [user, expires, token],
        )

    def run(self, *, full: bool = True) -> None:
        """The same pass on both workers, at the same (new) time."""
        self.now += timedelta(minutes=1)
        now = self.now
        for set_based, worker in ((True, self.sets), (False, self.rows)):
            with pytest.MonkeyPatch.context() as patch:
                # The runner's own clock too: reconcile dates its deletions by it.
                patch.setattr("sync_worker.pull.utcnow", lambda: now)
                # Staged in ranges of a few users: the batches wait for theirs.
                patch.setattr("db.setstage.RANGE", self.staging_range)
                # ... and copied in parts: a first one, then parts that end mid-range.
                patch.setattr("db.setstage.FIRST_PART", self.staging_range)
                patch.setattr("db.setstage.PART", self.staging_range + 2)
                if not self.second_connection:
                    patch.setattr("db.setstage.open_private", lambda conn: None)
                self._run(set_based, worker, full=full)

    def _run(self, set_based: bool, worker: Engine, *, full: bool) -> None:
        now = self.now
        if True:
            provider = AuthjsProvider(
                self.settings or AuthjsSettings(database_url=self.source_url),
                batch_size=self.batch_size,
                now=lambda: now,
            )
            with closing(provider):
                runner = PullRunner(
                    worker,
                    SyncEngine(self.plan, clock=lambda: now),
                    provider,
                    max_delete_fraction=1.0,
                    set_based=set_based,
                )
                self.reports[set_based] = runner.run(full=full)

    def both(self, change: UserChange) -> None:
        """A change applied to both workers through the engine, as the drainer would."""
        self.now += timedelta(minutes=1)
        now = self.now
        for worker in (self.sets, self.rows):
            with transaction(worker) as conn:
                SyncEngine(self.plan, clock=lambda: now).apply(
                    conn, [change], source=Source.WEBHOOK
                )

    def assert_same(self, *, counts: bool = True) -> None:
        sets, rows = normalized(self.sets), normalized(self.rows)
        for name in sets:  # the differing rows alone, on failure
            only_sets = sorted(set(sets[name]) - set(rows[name]))
            only_rows = sorted(set(rows[name]) - set(sets[name]))
            assert only_sets == only_rows, f"{name}:\n{only_sets}\n!=\n{only_rows}"
        assert sets == rows
        assert stored_digests(self.sets, "authjs") == stored_digests(self.rows, "authjs")
        if not counts:
            return
        set_report, row_report = self.reports[True], self.reports[False]
        assert set_report.path == "set"
        assert row_report.path == "per_row"
        assert set_report.flat_counts() == row_report.flat_counts()
        assert set_report.pages == row_report.pages
        assert set_report.status == row_report.status


@pytest.fixture(scope="module")
def twins(make_pg_database: Callable[[], str]) -> Iterator[Twins]:
    source_url = make_pg_database()
    workers = []
    for _ in range(2):
        worker = make_engine(sqlalchemy_url(make_pg_database()), schema=SCHEMA)
        upgrade(worker, SCHEMA)
        workers.append(worker)
    with psycopg.connect(source_url, autocommit=True) as source:
        yield Twins(source_url, source, workers[0], workers[1])
    for worker in workers:
        worker.dispose()


@pytest.fixture
def fresh(twins: Twins) -> Twins:
    twins.reset()
    twins.plan = PlanSettings()
    twins.staging_range, twins.second_connection = 3, True
    return twins


def audit_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(sync_audit)).scalar_one())


def user_stamps(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(users.c.id, users.c.updated_at).order_by(users.c.id)))


# -- a random source -------------------------------------------------------------------

NAMES = st.sampled_from(
    [None, "", "Ada Lovelace", "Zoë Ång", "O'Brien \"Q\" \\ slash", "tab\there\nnew\x01\x1f",
     "del\x7fchar", "K\u212aelvin", "x" * 255, "😀 emoji"]
)  # fmt: skip
EMAILS = st.sampled_from(
    [None, "", "a@x.io", "A@x.io", "b@x.io", "shared@x.io", "k@x.io", "\u212a@x.io",
     "zoë@x.io", "no-at-sign", "c@y.io"]
)  # fmt: skip
WHEN = st.sampled_from(
    [None, START - timedelta(days=3), START - timedelta(days=400, microseconds=123456),
     datetime(1999, 12, 31, 23, 59, 59, 500, tzinfo=UTC)]
)  # fmt: skip
IMAGES = st.sampled_from([None, "", "https://img.example/a.png", "https://img.example/ü.png"])
ACCOUNTS = st.lists(
    st.tuples(st.sampled_from(["github", "google", "gh:x"]), st.sampled_from(["1", "2", "77"])),
    max_size=2,
)
SESSIONS = st.lists(
    st.tuples(
        st.sampled_from(["t1", "t2", "t3", "tok-ä", "t5", "t6", "t7"]),
        st.sampled_from([-2, 1, 5, 29, 31, 90]),  # days from now: expired, live, far off
    ),
    max_size=3,
)
USER = st.tuples(NAMES, EMAILS, WHEN, IMAGES, ACCOUNTS, SESSIONS)


def load(t: Twins, specs: list[tuple[Any, ...]]) -> list[int]:
    ids = []
    for name, email, verified, image, accounts, sessions in specs:
        user = t.user(name, email, verified, image)
        ids.append(user)
        for provider, account_id in accounts:
            t.account(user, provider, account_id)
        for token, days in sessions:
            t.session(user, f"{token}-{user}" if days % 2 else token, t.now + timedelta(days=days))
    return ids


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    first=st.lists(USER, min_size=0, max_size=14),
    second=st.lists(USER, min_size=0, max_size=10),
    link=st.booleans(),
    webhook_email=st.sampled_from(["a@x.io", "b@x.io", "shared@x.io"]),
    renamed=st.integers(min_value=0, max_value=13),
    staging=st.sampled_from([(3, True), (1, True), (10_000, True), (10_000, False)]),
)
def test_random_sources_match_the_per_row_pass(
    twins: Twins,
    first: list[tuple[Any, ...]],
    second: list[tuple[Any, ...]],
    link: bool,
    webhook_email: str,
    renamed: int,
    staging: tuple[int, bool],
) -> None:
    twins.reset()
    twins.plan = PlanSettings(link_by_verified_email=link)
    twins.staging_range, twins.second_connection = staging
    # A user of another provider, verified: a link target for the source's creates.
    twins.both(
        UserChange(
            provider="stack",
            external_id="s-1",
            kind=ChangeKind.UPSERT,
            version=twins.now,
            attributes=UserAttributes(email=webhook_email, email_verified=True, name="Stack"),
            raw={"id": "s-1"},
        )
    )
    ids = load(twins, first)
    twins.run()  # the initial load
    twins.assert_same()
    # Existing users change, new ones arrive (some meeting the stored ones).
    if ids:
        twins.source.execute(
            "UPDATE users SET name = %s WHERE id = %s", ["Renamed", ids[renamed % len(ids)]]
        )
    load(twins, second)
    twins.run()
    twins.assert_same()
    # Nothing changed since (sessions far off and failed users aside, as per row).
    twins.run()
    twins.assert_same()


# -- scenarios -------------------------------------------------------------------------


def test_initial_load_is_written_in_sql_and_a_second_pass_writes_nothing(fresh: Twins) -> None:
    for i in range(23):
        user = fresh.user(f"User {i}", f"u{i}@example.com", START - timedelta(days=i))
        fresh.account(user, "github", str(1000 + i))
        fresh.session(user, f"tok-{i}", START + timedelta(days=10 + i % 15))
        fresh.session(user, f"old-{i}", START - timedelta(days=1))  # expired: left out
    fresh.run()
    fresh.assert_same()
    report = fresh.reports[True]
    assert report.counts["created"] == 23
    assert report.sessions["new"] == 23
    assert report.set_created == 23  # every user went the SQL way
    audits, stamps = audit_count(fresh.sets), user_stamps(fresh.sets)
    fresh.run()
    fresh.assert_same()
    assert fresh.reports[True].counts == {"unchanged": 23}
    assert audit_count(fresh.sets) == audits
    assert user_stamps(fresh.sets) == stamps


def test_hash_matches_python_for_every_ascii_character(fresh: Twins) -> None:
    """Each printable and control character in every hashed text column: the hash the SQL
    writes is the one ``UserChange.content_hash`` computes (the per-row twin stores that)."""
    for code in range(1, 128):
        char = chr(code)
        user = fresh.user(f"n{char}n", f"e{code}{char}@x.io", None, f"https://i/{char}")
        fresh.account(user, f"p{char}", f"a{char}")
    fresh.run()
    fresh.assert_same()
    assert fresh.reports[True].set_created == 126  # DEL in an account id: per row


def test_routing_each_reason_goes_to_the_per_row_path(fresh: Twins) -> None:
    """Every reason a changed user is not a simple create, each on its own user."""
    fresh.both(  # a live, verified owner of linked@x.io
        UserChange(
            provider="stack",
            external_id="owner",
            kind=ChangeKind.UPSERT,
            version=fresh.now,
            attributes=UserAttributes(email="Linked@x.io", email_verified=True),
            raw={"id": "owner"},
        )
    )
    fresh.both(  # an identity stored under a source user's linked account
        UserChange(
            provider="authjs:github",
            external_id="taken",
            kind=ChangeKind.UPSERT,
            version=fresh.now,
            attributes=UserAttributes(email="t@x.io"),
            raw={"id": "taken"},
        )
    )
    simple = fresh.user("Simple", "simple@x.io", START)
    fresh.session(simple, "simple-token", START + timedelta(days=3))
    fresh.user("Links", "linked@x.io", START)  # verified email owned: links
    a = fresh.user("Claim A", "claim@x.io", START)  # two creates claim one email
    b = fresh.user("Claim B", "CLAIM@x.io", START)
    fresh.user("Zoë, non-ASCII", "zoë@x.io")  # hashed in SQL with Python's escapes: simple
    fresh.user("Zoë, verified", "ZOË@x.io", START)  # links by Python's lower case: simple
    fresh.user("Kelvin", "\u212a@x.io", START)  # Python's lower case is "k@x.io"
    fresh.user("Lower k", "k@x.io", START)  # claims the same as the Kelvin sign: neither
    s1, s2 = fresh.user("Share 1", "s1@x.io"), fresh.user("Share 2", "s2@x.io")
    fresh.account(s1, "google", "same")
    fresh.account(s2, "google", "same")
    t1, t2 = fresh.user("Token 1", "k1@x.io"), fresh.user("Token 2", "k2@x.io")
    fresh.session(t1, "same-token", START + timedelta(days=2))
    fresh.session(t2, "same-token", START + timedelta(days=2))
    fresh.batch_size = 50  # one batch: the claims meet
    fresh.run()
    fresh.assert_same()
    assert fresh.reports[True].set_created == 3  # "Simple" and the two Zoës
    assert {a, b}  # both claimants went per row and still match
    # A linked account stored already, and an email the users table refuses: per row, and
    # as the engine isolates the refused record by bisecting what it is given, the whole
    # batch goes per row (so it ends exactly as the per-row pass ends it).
    taken = fresh.user("Taken account", "ta@x.io")
    fresh.account(taken, "github", "taken")
    fresh.user("Bad email", "no-at-sign")
    fresh.user("Simple too", "simple2@x.io")
    fresh.run()
    fresh.assert_same()
    assert fresh.reports[True].set_created == 0
    assert fresh.reports[True].counts["failed"] == 2
    # A stored identity (the next pass, after a rename) goes per row too.
    fresh.source.execute("UPDATE users SET name = 'Renamed' WHERE id = %s", [simple])
    fresh.run()
    fresh.assert_same()
    assert fresh.reports[True].set_created == 0
    assert fresh.reports[True].counts["updated"] == 1


def test_a_create_a_unique_key_refuses_has_its_batch_classified_again(fresh: Twins) -> None:
    """The first classification does not look up stored identities and sessions. One with
    no stored digest (as a webhook leaves it) makes the creates' writes fail: the batch is
    classified again, looking them up, and its other users are still written in SQL."""
    known = fresh.user("Known", "known@x.io")
    fresh.both(  # the identity a webhook stored, with no source digest
        UserChange(
            provider="authjs",
            external_id=str(known),
            kind=ChangeKind.UPSERT,
            version=fresh.now,
            attributes=UserAttributes(email="known@x.io", name="Before"),
            raw={"id": str(known)},
        )
    )
    for i in range(3):
        fresh.user(f"New {i}", f"new{i}@x.io")
    fresh.batch_size = 50  # one batch
    fresh.run()
    fresh.assert_same()
    assert fresh.reports[True].set_created == 3  # not all per row: classified again
    assert fresh.reports[True].counts["updated"] == 1


def test_tombstone_and_restore_go_through_the_engine(fresh: Twins) -> None:
    keep = fresh.user("Keep", "keep@x.io")
    gone = fresh.user("Gone", "gone@x.io")
    fresh.run()
    fresh.source.execute("DELETE FROM users WHERE id = %s", [gone])
    fresh.run()  # reconcile soft-deletes it
    fresh.assert_same()
    assert fresh.reports[True].counts["deleted"] == 1
    fresh.source.execute(
        "INSERT INTO users (id, name, email) VALUES (%s, 'Gone', 'gone@x.io')", [gone]
    )
    fresh.both(  # and a tombstone for a user the source creates later
        UserChange(provider="authjs", external_id="9999", kind=ChangeKind.DELETE, version=fresh.now)
    )
    fresh.source.execute("INSERT INTO users (id, name, email) VALUES (9999, 'Late', 'l@x.io')")
    fresh.run()
    fresh.assert_same()
    assert fresh.reports[True].counts["restored"] == 2  # the deleted user and the tombstone
    assert keep


def test_a_failure_mid_pass_keeps_committed_batches_only(fresh: Twins) -> None:
    """A batch that fails as a whole rolls back alone: earlier batches and their cursor
    stay, and the next pass completes the load."""
    for i in range(12):
        fresh.user(f"U{i}", f"u{i}@x.io")
    with transaction(fresh.sets) as conn:  # the 8th user's key will be refused
        conn.execute(
            text(
                "CREATE FUNCTION identity.refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF NEW.external_id = '8' AND NEW.provider = 'authjs' THEN"
                " RAISE EXCEPTION 'no' USING ERRCODE = '57014'; END IF; RETURN NEW; END $$;"
                " CREATE TRIGGER refuse BEFORE INSERT ON identity.user_identities"
                " FOR EACH ROW EXECUTE FUNCTION identity.refuse()"
            )
        )
    now = fresh.now + timedelta(minutes=1)
    provider = AuthjsProvider(
        AuthjsSettings(database_url=fresh.source_url), batch_size=5, now=lambda: now
    )
    with closing(provider), pytest.raises(Exception, match="no"):
        PullRunner(fresh.sets, SyncEngine(fresh.plan, clock=lambda: now), provider).run(full=True)
    with fresh.sets.connect() as conn:
        identities = conn.execute(
            text("SELECT count(*) FROM user_identities WHERE provider = 'authjs'")
        ).scalar_one()
        cursor = conn.execute(text("SELECT cursor FROM sync_cursors")).scalar_one()
    assert identities == 5
    assert cursor == {"after_id": "5", "id_type": "int"}
    with transaction(fresh.sets) as conn:
        conn.execute(text("DROP TRIGGER refuse ON identity.user_identities"))
        conn.execute(text("DROP FUNCTION identity.refuse()"))
    assert pass_schemas(fresh.sets) == []  # dropped on the way out
    fresh.run()
    fresh.assert_same(counts=False)  # the set twin's first pass stopped halfway


def test_a_refused_record_is_isolated_and_the_rest_commits(fresh: Twins) -> None:
    """A constraint the classification does not foresee: the batch goes per row, which
    records the one refused user as failed and commits the others."""
    for i in range(6):
        fresh.user(f"U{i}", f"u{i}@x.io")
    for worker in (fresh.sets, fresh.rows):
        with transaction(worker) as conn:
            conn.execute(
                text("ALTER TABLE identity.users ADD CONSTRAINT no_u3 CHECK (name <> 'U3')")
            )
    try:
        fresh.run()
        fresh.assert_same()
        assert fresh.reports[True].counts["failed"] == 1
        assert fresh.reports[True].counts["created"] == 5
    finally:
        for worker in (fresh.sets, fresh.rows):
            with transaction(worker) as conn:
                conn.execute(text("ALTER TABLE identity.users DROP CONSTRAINT no_u3"))


def test_resumed_pass_and_the_switch(fresh: Twins) -> None:
    for i in range(9):
        fresh.user(f"U{i}", f"u{i}@x.io")
    fresh.run()
    fresh.source.execute("UPDATE users SET name = 'New' WHERE id > 6")
    fresh.run(full=False)  # from the stored (completed) cursor: a new whole pass
    fresh.assert_same()
    assert fresh.reports[True].counts["updated"] == 3


@pytest.mark.parametrize("flavour", ["prisma", "drizzle"])
def test_other_flavours_text_ids_and_naive_timestamps(
    twins: Twins, make_pg_database: Callable[[], str], flavour: str
) -> None:
    """Text ids, timestamps without zone, and (Prisma) the optional createdAt columns."""
    twins.reset()
    url = make_pg_database()
    with make_loader(flavour, url) as loader:
        loader.populate(40, seed=5, now=START)
    columns = (
        {"user": {"created_at": "createdAt"}, "session": {"created_at": "createdAt"}}
        if flavour == "prisma"
        else {}
    )
    settings = AuthjsSettings.model_validate(
        {"database_url": url, "schema": flavour, "columns": columns}
    )
    twins.settings = settings
    try:
        twins.batch_size = 15
        twins.run()
        twins.assert_same()
        assert twins.reports[True].set_created > 30  # most of them in SQL
    finally:
        twins.settings, twins.batch_size = None, 5


def test_a_source_that_refuses_the_queries_fails_as_the_per_row_pass_does(fresh: Twins) -> None:
    """The wrong flavour (no such tables): the set pass steps aside and the per-row pass
    reports the operator's error, a ConfigError naming it."""
    fresh.user("U", "u@x.io")
    settings = AuthjsSettings.model_validate({"database_url": fresh.source_url, "schema": "prisma"})
    provider = AuthjsProvider(settings, now=lambda: fresh.now)
    runner = PullRunner(fresh.sets, SyncEngine(fresh.plan), provider, set_based=True)
    with closing(provider), pytest.raises(ConfigError, match="does not exist"):
        runner.run(full=True)


def test_a_column_type_the_sql_does_not_handle_leaves_the_pass_per_row(fresh: Twins) -> None:
    """A blank-padded ``character(n)`` name: its text differs from what the mapping reads as
    a varchar would; the set path is not offered and the pass runs per row."""
    fresh.user("Padded", "p@x.io")
    fresh.source.execute("ALTER TABLE users ALTER COLUMN name TYPE character(30)")
    fresh.run()
    assert fresh.reports[True].path == "per_row"
    assert fresh.reports[True].counts["created"] == 1


def pass_schemas(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        names = conn.execute(
            text(r"SELECT nspname FROM pg_namespace WHERE nspname LIKE 'sw\_pass\_%'")
        )
        return sorted(names.scalars())


def test_staging_schemas_are_dropped_and_those_of_killed_passes_swept(fresh: Twins) -> None:
    """A pass drops its staging schema; the next pass, whatever its path, drops those a
    killed pass left (no session holds their lock) and keeps a live pass's."""
    for i in range(7):
        fresh.user(f"U{i}", f"u{i}@x.io")
    with transaction(fresh.rows) as conn:  # the per-row twin's pass sweeps too
        conn.execute(text("CREATE SCHEMA sw_pass_dead"))
    lock = text("SELECT pg_advisory_lock(:space, hashtext('sw_pass_live'))")
    space = {"space": setstage._LOCK_SPACE}
    with fresh.sets.connect() as live:
        live.execute(lock, space)
        live.execute(text("CREATE SCHEMA sw_pass_live"))
        live.execute(text("CREATE SCHEMA sw_pass_dead"))
        live.execute(text("CREATE TABLE sw_pass_dead.sw_u (ord bigint)"))
        live.commit()
        try:
            fresh.run()
            fresh.assert_same()
            assert pass_schemas(fresh.sets) == ["sw_pass_live"]
            assert pass_schemas(fresh.rows) == []
        finally:
            live.execute(text("DROP SCHEMA sw_pass_live"))
            live.execute(text("SELECT pg_advisory_unlock_all()"))
            live.commit()
    assert pass_schemas(fresh.sets) == []


def test_a_role_that_may_not_create_a_schema_stages_on_one_connection(fresh: Twins) -> None:
    role = f"sw_no_schema_{uuid.uuid4().hex[:8]}"
    with fresh.sets.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role}"))
        conn.execute(text(f"SET ROLE {role}"))
        conn.commit()
        path = text("SELECT current_setting('search_path')")
        before = conn.execute(path).scalar_one()
        conn.commit()
        try:
            assert setstage.open_private(conn) is None
            assert conn.execute(path).scalar_one() == before
        finally:
            conn.rollback()
            conn.execute(text("RESET ROLE"))
            conn.execute(text(f"DROP ROLE {role}"))
            conn.commit()
    assert pass_schemas(fresh.sets) == []
    # The pass itself on that path: as the random sources' test runs it.
    for i in range(7):
        fresh.user(f"U{i}", f"u{i}@x.io")
    fresh.second_connection = False
    fresh.run()
    fresh.assert_same()
    assert fresh.reports[True].set_created == 7


def test_a_schema_the_role_may_not_drop_is_left_and_the_sweep_goes_on(fresh: Twins) -> None:
    role = f"sw_no_drop_{uuid.uuid4().hex[:8]}"
    with fresh.sets.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role}"))
        conn.execute(text("CREATE SCHEMA sw_pass_another_roles"))  # the superuser's
        conn.execute(text("CREATE SCHEMA sw_pass_dead"))
        conn.execute(text(f"ALTER SCHEMA sw_pass_dead OWNER TO {role}"))
        conn.execute(text(f"SET ROLE {role}"))
        conn.commit()
        try:
            with conn.begin():
                setstage.sweep(conn)
        finally:
            conn.rollback()
            conn.execute(text("RESET ROLE"))
            kept = pass_schemas(fresh.sets)
            conn.execute(text("DROP SCHEMA IF EXISTS sw_pass_another_roles, sw_pass_dead"))
            conn.execute(text(f"DROP ROLE {role}"))
            conn.commit()
    assert kept == ["sw_pass_another_roles"]
