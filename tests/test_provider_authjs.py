"""The Auth.js adapter against real Auth.js databases built by tests/fakes/authjs.py.

Every flavour runs on PostgreSQL; Prisma and Drizzle also on SQLite (their SQLite layouts,
timestamps as epoch milliseconds). The pure mapping is tested from tests/data/authjs/.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from structlog.testing import capture_logs

from providers.authjs import (
    AuthjsProvider,
    connection_url,
    session_change,
    session_id,
    to_change,
)
from providers.base import Page
from sync_worker.changes import ChangeKind, UserChange
from sync_worker.config import AuthjsSettings
from sync_worker.errors import ConfigError, UpstreamDataError, UpstreamUnavailable
from tests.fakes.authjs import FakeAccount, FakeSession, FakeUser, make_loader

DATA = Path(__file__).parent / "data" / "authjs"
CASES = sorted(p for p in DATA.glob("*.json") if p.name != "invalid_records.json")
INVALID = json.loads((DATA / "invalid_records.json").read_text())["cases"]
NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
ACCOUNT_TOKEN_COLUMNS = ("access_token", "refresh_token", "id_token")

pg = pytest.mark.postgres
ALL_DATABASES = [
    pytest.param(("pg", "postgresql"), marks=pg, id="pg-postgresql"),
    pytest.param(("prisma", "postgresql"), marks=pg, id="prisma-postgresql"),
    pytest.param(("drizzle", "postgresql"), marks=pg, id="drizzle-postgresql"),
    pytest.param(("prisma", "sqlite"), id="prisma-sqlite"),
    pytest.param(("drizzle", "sqlite"), id="drizzle-sqlite"),
]
PG_FLAVOURS = [pytest.param(f, marks=pg) for f in ("pg", "prisma", "drizzle")]


# -- pure mapping ----------------------------------------------------------------------


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_to_change_maps_real_shaped_rows(path: Path) -> None:
    case = json.loads(path.read_text())
    observed = datetime.fromisoformat(case["observed_at"])
    change = to_change(case["row"], case["accounts"], observed_at=observed)
    expected = case["expected"]
    assert change.provider == "authjs"
    assert change.kind is ChangeKind.UPSERT
    assert change.external_id == expected["external_id"]
    assert change.version == observed
    attributes = asdict(change.attributes) if change.attributes else {}
    for key, value in expected["attributes"].items():
        got = attributes[key]
        assert (got.isoformat() if isinstance(got, datetime) else got) == value, key
    assert [[i.provider, i.external_id] for i in change.linked] == expected["linked"]
    assert change.raw == expected["raw"]
    json.dumps(change.raw)  # stored as JSON downstream


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c["why"])
def test_to_change_rejects_unusable_rows(case: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=case["error"]) as info:
        to_change(case["row"], case["accounts"], observed_at=NOW)
    email = case["row"].get("email")
    if isinstance(email, str):
        assert email not in str(info.value)


def test_content_hash_is_the_same_for_every_storage_of_the_same_user() -> None:
    """PostgreSQL datetimes, SQLite epoch ms and webhook ISO strings must hash alike."""
    base = {"id": "u1", "name": "Ada", "email": "ada@example.com", "image": None}
    forms = [
        datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        datetime(2024, 5, 1, 12, 0),  # timestamp without time zone: UTC by convention
        1714564800000,
        "2024-05-01T12:00:00.000Z",
        "2024-05-01T14:00:00+02:00",
    ]
    hashes = {
        to_change(
            {**base, "emailVerified": f}, observed_at=NOW + timedelta(minutes=i)
        ).content_hash()
        for i, f in enumerate(forms)
    }
    assert len(hashes) == 1


def test_session_change_hashes_the_token_and_keeps_stable_times() -> None:
    token = "6d1d5c2e-8f8a-4f2a-9a53-5b9f6a7f1c11"
    expires = datetime(2026, 1, 20, tzinfo=UTC)
    row = {"userId": 42, "sessionToken": token, "expires": expires}
    change = session_change(row, observed_at=NOW)
    later = session_change(row, observed_at=NOW + timedelta(hours=6))
    assert change.kind is ChangeKind.LOGIN
    assert change.external_id == "42"
    assert change.session is not None
    assert change.session.external_session_id == session_id(token)
    assert len(change.session.external_session_id) == 64
    assert change.session.expires_at == expires
    # Last written by Auth.js at expires - maxAge (30 days); the same on every pass.
    assert change.session.last_seen_at == expires - timedelta(days=30)
    assert later.session == change.session
    assert token not in repr(change)


def test_session_change_prefers_a_created_at_column_and_never_dates_into_the_future() -> None:
    created = datetime(2025, 12, 31, 8, 0)
    row = {"userId": "u", "sessionToken": "t", "expires": NOW + timedelta(days=90)}
    change = session_change({**row, "createdAt": created}, observed_at=NOW)
    assert change.session is not None
    assert change.session.created_at == created.replace(tzinfo=UTC)
    # An app with a 90-day maxAge: expires - 30 days would be in the future.
    assert session_change(row, observed_at=NOW).session.last_seen_at == NOW  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ({"userId": 1, "sessionToken": None, "expires": NOW}, "sessionToken"),
        ({"userId": 1, "sessionToken": "t", "expires": None}, "expires: missing"),
        ({"userId": 1, "sessionToken": "t", "expires": "soon"}, "not a timestamp"),
        ({"userId": None, "sessionToken": "t", "expires": NOW}, "id: expected"),
    ],
)
def test_session_change_rejects_unusable_rows(row: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        session_change(row, observed_at=NOW)


@pytest.mark.parametrize(
    ("given", "url", "schema"),
    [
        ("postgres://u:p@db:5432/app", "postgresql+psycopg://u:p@db:5432/app", None),
        (
            "postgresql://u:p@db/app?schema=auth&connection_limit=5&sslmode=require",
            "postgresql+psycopg://u:p@db/app?sslmode=require",
            "auth",
        ),
        ("sqlite:////tmp/app.db", "sqlite:////tmp/app.db", None),
    ],
)
def test_connection_url_normalizes_and_takes_prismas_schema(
    given: str, url: str, schema: str | None
) -> None:
    got, got_schema = connection_url(given)
    assert got.render_as_string(hide_password=False) == url
    assert got_schema == schema


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"tables": {"users": "x"}}, "providers.authjs.tables.users"),
        ({"columns": {"user": {"mail": "x"}}}, "providers.authjs.columns.user.mail"),
        ({"columns": {"accounts": {"provider": "x"}}}, "providers.authjs.columns.accounts"),
    ],
)
def test_unknown_override_keys_are_config_errors(overrides: dict[str, Any], key: str) -> None:
    settings = AuthjsSettings.model_validate({"database_url": "sqlite:///:memory:", **overrides})
    with pytest.raises(ConfigError, match=key):
        AuthjsProvider(settings)


def test_without_a_database_url_or_engine_it_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="database_url"):
        AuthjsProvider(AuthjsSettings())


# -- against real databases ------------------------------------------------------------


@dataclass
class AuthjsDb:
    flavour: str
    dialect: str
    url: str  # what an operator would configure (libpq URL or sqlite:///)
    loader: Any

    @property
    def sqlalchemy_url(self) -> str:
        return self.url.replace("postgresql://", "postgresql+psycopg://", 1)

    def settings(self, **overrides: Any) -> AuthjsSettings:
        data = {"database_url": self.url, "schema": self.flavour, **overrides}
        return AuthjsSettings.model_validate(data)


def _database_url(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if dialect == "sqlite":
        return f"sqlite:///{tmp_path / 'authjs.db'}"
    make: Callable[[], str] = request.getfixturevalue("make_pg_database")
    return make()


@pytest.fixture(params=ALL_DATABASES)
def authjs_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuthjsDb]:
    flavour, dialect = request.param
    url = _database_url(dialect, request, tmp_path)
    with make_loader(flavour, url) as loader:
        yield AuthjsDb(flavour, dialect, url, loader)


@pytest.fixture
def pg_url(make_pg_database: Callable[[], str]) -> str:
    return make_pg_database()


@pytest.fixture
def providers() -> Iterator[Callable[..., AuthjsProvider]]:
    made: list[AuthjsProvider] = []

    def make(settings: AuthjsSettings, **kwargs: Any) -> AuthjsProvider:
        kwargs.setdefault("now", lambda: NOW)
        provider = AuthjsProvider(settings, **kwargs)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def drain(provider: AuthjsProvider, cursor: Any = None, *, full: bool = False) -> list[Page]:
    return list(provider.iter_changes(cursor, full=full))


def upserts(pages: list[Page]) -> list[UserChange]:
    return [c for p in pages for c in p.changes if c.kind is ChangeKind.UPSERT]


def logins(pages: list[Page]) -> list[UserChange]:
    return [c for p in pages for c in p.changes if c.kind is ChangeKind.LOGIN]


def sessions_of(pages: list[Page], external_id: str) -> set[str]:
    return {
        c.session.external_session_id
        for c in logins(pages)
        if c.external_id == external_id and c.session is not None
    }


def live(user: FakeUser) -> set[str]:
    return {session_id(s.session_token) for s in user.sessions if s.expires >= NOW}


class StatementLog:
    """Every SQL statement an engine runs (a before_cursor_execute listener)."""

    def __init__(self, engine: Engine) -> None:
        self.statements: list[str] = []
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.statements.append(statement)

    def matching(self, word: str) -> list[str]:
        return [s for s in self.statements if word in s]


def test_full_pass_yields_every_user_once_with_accounts_and_sessions(
    authjs_db: AuthjsDb, providers: Callable[..., AuthjsProvider]
) -> None:
    users = authjs_db.loader.populate(230, seed=3, now=NOW)
    pages = drain(providers(authjs_db.settings(), batch_size=50))

    by_id = {str(u.id): u for u in users}
    changes = upserts(pages)
    assert sorted(c.external_id for c in changes) == sorted(by_id)
    for change in changes:
        user = by_id[change.external_id]
        assert change.attributes is not None
        assert change.attributes.email == user.email
        assert change.attributes.name == user.name
        assert change.attributes.avatar_url == user.image
        assert change.attributes.email_verified is (user.email_verified is not None)
        assert {(i.provider, i.external_id) for i in change.linked} == {
            (f"authjs:{a.provider}", a.provider_account_id) for a in user.accounts
        }
        assert change.version == NOW
    found: dict[str, set[str]] = {}
    for login in logins(pages):
        assert login.session is not None
        found.setdefault(login.external_id, set()).add(login.session.external_session_id)
    assert found == {k: live(u) for k, u in by_id.items() if live(u)}
    assert [p.complete for p in pages] == [False] * 4 + [True]
    assert sorted(i for p in pages for i in p.seen_ids) == sorted(by_id)
    assert pages[-1].cursor == {"completed_at": NOW.isoformat()}
    assert pages[-1].partial_pass is False
    assert not any(p.errors for p in pages)


def test_logins_follow_their_user_within_the_page(
    authjs_db: AuthjsDb, providers: Callable[..., AuthjsProvider]
) -> None:
    authjs_db.loader.populate(60, seed=4, now=NOW)
    for page in drain(providers(authjs_db.settings(), batch_size=20)):
        upserted: set[str] = set()
        for change in page.changes:
            if change.kind is ChangeKind.UPSERT:
                upserted.add(change.external_id)
            else:
                assert change.external_id in upserted


def test_pages_resume_after_the_cursor(
    authjs_db: AuthjsDb, providers: Callable[..., AuthjsProvider]
) -> None:
    users = authjs_db.loader.populate(30, seed=5, now=NOW)
    provider = providers(authjs_db.settings(), batch_size=7)
    pages = drain(provider)
    assert [len(p.seen_ids) for p in pages] == [7, 7, 7, 7, 2]
    cursor = pages[1].cursor
    assert cursor is not None
    assert cursor["id_type"] == ("int" if authjs_db.flavour == "pg" else "str")
    assert cursor["after_id"] == pages[1].seen_ids[-1]

    resumed = drain(provider, cursor)
    ids = [i for p in resumed for i in p.seen_ids]
    assert ids == [i for p in pages[2:] for i in p.seen_ids]
    assert sorted(ids + list(pages[0].seen_ids + pages[1].seen_ids)) == sorted(
        str(u.id) for u in users
    )
    assert resumed[-1].complete
    assert resumed[-1].partial_pass is True


@pytest.mark.parametrize("flavour", PG_FLAVOURS)
def test_a_completed_cursor_or_full_starts_a_new_pass(
    flavour: str, pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    with make_loader(flavour, pg_url) as loader:
        loader.populate(12, seed=6, now=NOW)
    provider = providers(AuthjsDb(flavour, "postgresql", pg_url, None).settings(), batch_size=5)
    first = drain(provider)
    middle = first[0].cursor
    for cursor, full in [(first[-1].cursor, False), (middle, True), ({}, False)]:
        again = drain(provider, cursor, full=full)
        assert [p.seen_ids for p in again] == [p.seen_ids for p in first]
        assert again[-1].partial_pass is False


@pytest.mark.parametrize(
    "cursor",
    [{"after_id": "abc", "id_type": "int"}, {"after_id": "5", "id_type": "str"}, {"after_id": 5}],
)
@pg
def test_a_cursor_that_does_not_fit_restarts_the_pass(
    cursor: dict[str, Any], pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    with make_loader("pg", pg_url) as loader:
        loader.populate(8, seed=7, now=NOW)
    provider = providers(AuthjsDb("pg", "postgresql", pg_url, None).settings())
    with capture_logs() as logs:
        pages = drain(provider, cursor)
    assert len(pages[0].seen_ids) == 8
    assert any(e["event"] == "authjs_cursor_ignored" for e in logs)


@pg
def test_integer_ids_page_numerically(
    pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    """SERIAL ids 1..25 in pages of 4: as text, "9" > "10" would skip or repeat users."""
    with make_loader("pg", pg_url) as loader:
        loader.populate(25, seed=8, now=NOW)
    pages = drain(providers(AuthjsDb("pg", "postgresql", pg_url, None).settings(), batch_size=4))
    assert [i for p in pages for i in p.seen_ids] == [str(i) for i in range(1, 26)]


@pytest.mark.parametrize("flavour", PG_FLAVOURS)
def test_a_postgresql_pass_reads_each_table_once(
    flavour: str, pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    """Without an index on "userId" (no adapter has one) a query per page would scan
    accounts and sessions once per page; a pass reads them once, whatever its length."""
    with make_loader(flavour, pg_url) as loader:
        loader.populate(50, seed=9, now=NOW)
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    statements = StatementLog(engine)
    try:
        settings = AuthjsDb(flavour, "postgresql", pg_url, None).settings()
        pages = drain(providers(settings, engine=engine, batch_size=10))
    finally:
        engine.dispose()
    assert len(pages) == 5
    assert len(statements.statements) == 4  # the users' count, users, accounts, sessions
    assert [p.total for p in pages] == [50, None, None, None, None]
    for column in ACCOUNT_TOKEN_COLUMNS:
        assert not statements.matching(column)


@pytest.mark.parametrize(("flavour", "dialect"), [("prisma", "sqlite"), ("drizzle", "sqlite")])
def test_a_sqlite_pass_reads_per_page(
    flavour: str, dialect: str, tmp_path: Path, providers: Callable[..., AuthjsProvider]
) -> None:
    """SQLite: short reads per page (an open read would block the app's writers there),
    still never a query per user."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    with make_loader(flavour, url) as loader:
        loader.populate(50, seed=9, now=NOW)
    engine = create_engine(url)
    statements = StatementLog(engine)
    try:
        settings = AuthjsDb(flavour, dialect, url, None).settings()
        pages = drain(providers(settings, engine=engine, batch_size=10))
    finally:
        engine.dispose()
    assert len(pages) == 5
    assert len(statements.statements) == 1 + 3 * len(pages)  # the users' count, then per page
    assert [p.total for p in pages] == [50, None, None, None, None]


@pytest.mark.parametrize("flavour", PG_FLAVOURS)
def test_a_postgresql_pass_sees_one_snapshot(
    flavour: str, pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    """Writes made while a pass runs show in the next pass, never half in this one."""
    with make_loader(flavour, pg_url) as loader:
        users = loader.populate(20, seed=21, now=NOW)
        provider = providers(AuthjsDb(flavour, "postgresql", pg_url, None).settings(), batch_size=5)
        passing = provider.iter_changes(None)
        first = next(passing)
        later = next(u for u in users if str(u.id) not in first.seen_ids)
        assert later.id is not None  # populate() gave every user an id
        loader.link_account(later.id, FakeAccount(provider="gitlab", provider_account_id="gl-1"))
        token = "snapshot-test-token"
        loader.create_session(later.id, FakeSession(session_token=token, expires=NOW + DAY))
        newcomer = loader.create_user(name="New", email="new@example.com")
        rest = list(passing)

        this_pass = [first, *rest]
        assert sorted(i for p in this_pass for i in p.seen_ids) == sorted(str(u.id) for u in users)
        (change,) = [c for c in upserts(this_pass) if c.external_id == str(later.id)]
        assert ("authjs:gitlab", "gl-1") not in {(i.provider, i.external_id) for i in change.linked}
        assert session_id(token) not in sessions_of(this_pass, str(later.id))

        next_pass = drain(provider)
        assert str(newcomer) in {i for p in next_pass for i in p.seen_ids}
        (change,) = [c for c in upserts(next_pass) if c.external_id == str(later.id)]
        assert ("authjs:gitlab", "gl-1") in {(i.provider, i.external_id) for i in change.linked}
        assert session_id(token) in sessions_of(next_pass, str(later.id))


@pg
def test_ids_merge_under_a_collation_unlike_python_order(
    pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    """Users, accounts and sessions are merged by equal ids in the database's own order: an
    ICU collation sorts "a" before "B" where Python would not, and every link still lands."""
    ids = ["B-2", "a-1", "_5", "A-4", "b-3", "é6", "Z9", "z8"]
    with make_loader("drizzle", pg_url) as loader:
        for table in ("account", "session"):  # the keys' collations change below
            loader.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT "{table}_userId_user_id_fk"')
        for table, column in [("account", "userId"), ("session", "userId"), ("user", "id")]:
            collated = 'TYPE text COLLATE "und-x-icu"'
            loader.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" {collated}')
        for n, user_id in enumerate(ids):
            loader.execute(
                'INSERT INTO "user" (id, name, email) VALUES (%s, %s, %s)',
                [user_id, f"user {n}", f"u{n}@example.com"],
            )
            account = FakeAccount(provider="github", provider_account_id=f"gh-{user_id}")
            loader.link_account(user_id, account)
            session = FakeSession(session_token=f"token-{user_id}", expires=NOW + DAY)
            loader.create_session(user_id, session)
        order = [r[0] for r in loader.execute('SELECT id FROM "user" ORDER BY id')]
    assert order != sorted(ids), "the collation must order unlike Python for this test"
    settings = AuthjsDb("drizzle", "postgresql", pg_url, None).settings()
    pages = drain(providers(settings, batch_size=3))
    assert [i for p in pages for i in p.seen_ids] == order
    for change in upserts(pages):
        assert [i.external_id for i in change.linked] == [f"gh-{change.external_id}"]
        assert sessions_of(pages, change.external_id) == {session_id(f"token-{change.external_id}")}


@pg
def test_accounts_and_sessions_of_missing_users_are_ignored(
    pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    """The pg adapter's tables have no foreign keys: rows of a user that is gone must not
    derail the merge."""
    with make_loader("pg", pg_url) as loader:
        users = loader.populate(10, seed=22, now=NOW)
        for ghost in (0, 5_000):
            loader.link_account(
                ghost, FakeAccount(provider="github", provider_account_id=f"g{ghost}")
            )
            loader.create_session(ghost, FakeSession(session_token=f"t{ghost}", expires=NOW + DAY))
        loader.execute("DELETE FROM users WHERE id = %s", [users[4].id])  # leaves its rows
    pages = drain(providers(AuthjsDb("pg", "postgresql", pg_url, None).settings(), batch_size=3))
    expected = {str(u.id) for u in users} - {str(users[4].id)}
    assert {c.external_id for c in upserts(pages)} == expected
    assert {c.external_id for c in logins(pages)} <= expected
    for change in upserts(pages):
        user = next(u for u in users if str(u.id) == change.external_id)
        assert {i.external_id for i in change.linked} == {
            a.provider_account_id for a in user.accounts
        }


@pg
def test_closing_a_pass_early_gives_its_connection_back(
    pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    with make_loader("pg", pg_url) as loader:
        loader.populate(20, seed=23, now=NOW)
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        settings = AuthjsDb("pg", "postgresql", pg_url, None).settings()
        passing = providers(settings, engine=engine, batch_size=5).iter_changes(None)
        assert isinstance(passing, Generator)  # the pass is a generator: it can be closed
        next(passing)
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        passing.close()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_session_tokens_never_leave_the_database(
    authjs_db: AuthjsDb, providers: Callable[..., AuthjsProvider]
) -> None:
    users = authjs_db.loader.populate(40, seed=10, now=NOW)
    tokens = [s.session_token for u in users for s in u.sessions]
    secrets = [t for u in users for a in u.accounts for t in (a.access_token, a.id_token) if t]
    assert tokens
    assert secrets
    with capture_logs() as logs:
        provider = providers(authjs_db.settings(), batch_size=15, include_expired_sessions=True)
        pages = drain(provider)
    assert len(logins(pages)) == len(tokens)
    dumped = repr(pages) + repr(logs) + json.dumps([c.raw for p in pages for c in p.changes])
    for secret in tokens + secrets:
        assert secret not in dumped


@pytest.mark.parametrize("flavour", PG_FLAVOURS)
def test_expired_sessions_are_counted_and_deleted_in_batches(
    flavour: str, pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    with make_loader(flavour, pg_url) as loader:
        users = loader.populate(60, seed=11, now=NOW)
        expired = sum(1 for u in users for s in u.sessions if s.expires < NOW)
        remaining = sum(1 for u in users for s in u.sessions if s.expires >= NOW)
        assert expired > 10
        assert remaining > 0
        # A session time zone far from UTC: naive and aware timestamps must still compare right.
        url = pg_url + "?options=-c%20TimeZone%3DPacific/Chatham"
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        statements = StatementLog(engine)
        settings = AuthjsDb(flavour, "postgresql", url, None).settings()
        provider = providers(settings, engine=engine, batch_size=2)
        try:
            assert provider.expired_sessions(NOW) == expired
            assert provider.delete_expired_sessions(NOW, limit=5) == 5
            assert len(statements.matching("DELETE")) == 3  # batches of 2, 2, 1
            assert provider.expired_sessions(NOW) == expired - 5
            assert provider.delete_expired_sessions(NOW) == expired - 5
            assert provider.expired_sessions(NOW) == 0
            assert provider.delete_expired_sessions(NOW) == 0
        finally:
            engine.dispose()
        table = loader.session_table
        assert loader.execute(f'SELECT count(*) FROM "{table}"') == [(remaining,)]


@pytest.mark.parametrize("flavour", ["prisma", "drizzle"])
def test_expired_session_cleanup_on_sqlite(
    flavour: str, tmp_path: Path, providers: Callable[..., AuthjsProvider]
) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    with make_loader(flavour, url) as loader:
        users = loader.populate(30, seed=12, now=NOW)
        expired = sum(1 for u in users for s in u.sessions if s.expires < NOW)
        provider = providers(AuthjsDb(flavour, "sqlite", url, None).settings(), batch_size=4)
        assert provider.expired_sessions(NOW) == expired
        assert provider.delete_expired_sessions(NOW) == expired
        assert provider.expired_sessions(NOW) == 0
        live_count = loader.execute(f'SELECT count(*) FROM "{loader.session_table}"')[0][0]
        assert live_count == sum(len(live(u)) for u in users)


@pg
def test_cleanup_keeps_a_live_twin_of_an_expired_pg_adapter_token(
    pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    """pg-adapter's sessionToken has no UNIQUE: deleting by token must not take the live row."""
    with make_loader("pg", pg_url) as loader:
        uid = loader.create_user(name="Ken", email="ken@example.com")
        for expires in (NOW - timedelta(days=1), NOW + timedelta(days=1)):
            loader.create_session(uid, FakeSession(session_token="same", expires=expires))
        provider = providers(AuthjsDb("pg", "postgresql", pg_url, None).settings())
        assert provider.delete_expired_sessions(NOW) == 1
        assert loader.execute("SELECT expires > %s FROM sessions", [NOW]) == [(True,)]


@pytest.mark.parametrize(
    ("flavour", "renames", "overrides"),
    [
        pytest.param(
            "pg",
            [
                "ALTER TABLE users RENAME TO my_users",
                "ALTER TABLE my_users RENAME COLUMN email TO mail",
                'ALTER TABLE accounts RENAME COLUMN "providerAccountId" TO external_id',
            ],
            {
                "tables": {"user": "my_users"},
                "columns": {
                    "user": {"email": "mail"},
                    "account": {"provider_account_id": "external_id"},
                },
            },
            marks=pg,
            id="renamed-users-table-and-columns",
        ),
        pytest.param(
            "prisma",
            [
                'ALTER TABLE "User" RENAME TO users',
                'ALTER TABLE users RENAME COLUMN "emailVerified" TO email_verified',
                'ALTER TABLE "Account" RENAME TO accounts',
                'ALTER TABLE accounts RENAME COLUMN "userId" TO user_id',
                'ALTER TABLE accounts RENAME COLUMN "providerAccountId" TO provider_account_id',
                'ALTER TABLE "Session" RENAME TO sessions',
                'ALTER TABLE sessions RENAME COLUMN "userId" TO user_id',
                'ALTER TABLE sessions RENAME COLUMN "sessionToken" TO session_token',
            ],
            {
                "tables": {"user": "users", "account": "accounts", "session": "sessions"},
                "columns": {
                    "user": {"email_verified": "email_verified", "created_at": "createdAt"},
                    "account": {"user_id": "user_id", "provider_account_id": "provider_account_id"},
                    "session": {"user_id": "user_id", "session_token": "session_token"},
                },
            },
            marks=pg,
            id="prisma-map-naming-convention",
        ),
    ],
)
def test_table_and_column_overrides(
    flavour: str,
    renames: list[str],
    overrides: dict[str, Any],
    pg_url: str,
    providers: Callable[..., AuthjsProvider],
) -> None:
    with make_loader(flavour, pg_url) as loader:
        users = loader.populate(25, seed=13, now=NOW)
        for statement in renames:
            loader.execute(statement)
    db = AuthjsDb(flavour, "postgresql", pg_url, None)
    pages = drain(providers(db.settings(**overrides), batch_size=10))
    emails = {c.attributes.email for c in upserts(pages) if c.attributes}
    assert emails == {u.email for u in users}
    assert sum(len(c.linked) for c in upserts(pages)) == sum(len(u.accounts) for u in users)
    assert len(logins(pages)) == sum(len(live(u)) for u in users)
    if "created_at" in overrides["columns"]["user"]:
        assert all(c.attributes and c.attributes.created_at for c in upserts(pages))
    with pytest.raises(ConfigError, match="does not exist"):
        drain(providers(db.settings()))  # the defaults no longer match


@pytest.mark.parametrize("how", ["db_schema", "prisma-url"])
@pytest.mark.parametrize("flavour", PG_FLAVOURS)
def test_tables_in_another_schema(
    flavour: str, how: str, pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    with make_loader(flavour, pg_url, db_schema="auth") as loader:
        users = loader.populate(10, seed=14, now=NOW)
    if how == "db_schema":
        settings = AuthjsDb(flavour, "postgresql", pg_url, None).settings(db_schema="auth")
    else:
        url = pg_url + "?schema=auth&connection_limit=5&pool_timeout=10"
        settings = AuthjsDb(flavour, "postgresql", url, None).settings()
    pages = drain(providers(settings))
    assert sorted(pages[-1].seen_ids) == sorted(str(u.id) for u in users)


@pg
def test_the_same_database_as_the_worker(
    pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    """Worker tables in schema identity, Auth.js's users/sessions in public, one database."""
    from db.connect import make_engine
    from db.migrate import upgrade
    from sync_worker.changes import Source
    from sync_worker.engine import PlanSettings
    from tests.factories import BoundEngine

    sa_url = pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
    worker = make_engine(sa_url, schema="identity")
    upgrade(worker, "identity")
    with make_loader("pg", pg_url) as loader:
        users = loader.populate(20, seed=15, now=NOW)
    try:
        settings = AuthjsDb("pg", "postgresql", pg_url, None).settings()
        own = drain(providers(settings, batch_size=8))
        # The worker's engine has search_path = identity; the tables are still found in public.
        shared = drain(providers(settings, engine=worker, batch_size=8))
        assert [p.seen_ids for p in shared] == [p.seen_ids for p in own]
        assert sorted(own[-1].seen_ids + own[0].seen_ids + own[1].seen_ids) == sorted(
            str(u.id) for u in users
        )
        engine = BoundEngine(worker, PlanSettings())
        first = [engine.apply(p.changes, source=Source.PULL) for p in own]
        assert not any(r.failures for r in first)
        with worker.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM identity.users")).scalar_one()
        assert count == len(users)
        # A second pass over unchanged data writes nothing new.
        again = drain(providers(settings, now=lambda: NOW + timedelta(hours=1), batch_size=8))
        second = [engine.apply(p.changes, source=Source.PULL) for p in again]
        actions = {o.action for r in second for o in r.outcomes}
        assert actions <= {"unchanged"}, actions
    finally:
        worker.dispose()


@pg
def test_a_malformed_row_in_a_custom_schema_is_isolated(
    pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    """An app that turned email into jsonb: one object-valued email fails, the rest proceed."""
    with make_loader("pg", pg_url) as loader:
        users = loader.populate(12, seed=16, now=NOW)
        loader.execute("ALTER TABLE users ALTER COLUMN email TYPE jsonb USING to_jsonb(email)")
        bad = users[4]
        assert bad.id is not None  # populate() gave every user an id
        loader.execute(
            """UPDATE users SET email = '{"primary": "x@example.com"}' WHERE id = %s""", [bad.id]
        )
        loader.create_session(
            bad.id, FakeSession(session_token="bad-s", expires=NOW + timedelta(days=1))
        )
    with capture_logs() as logs:
        pages = drain(
            providers(AuthjsDb("pg", "postgresql", pg_url, None).settings(), batch_size=5)
        )
    errors = [e for p in pages for e in p.errors]
    assert [(e.external_id, e.reason) for e in errors] == [
        (str(bad.id), "email: expected a string, got dict")
    ]
    assert errors[0].raw is not None
    json.dumps(errors[0].raw)
    ids = [c.external_id for c in pages[0].changes + pages[1].changes + pages[2].changes]
    assert str(bad.id) not in ids  # neither its upsert nor its logins
    assert len(upserts(pages)) == len(users) - 1
    assert str(bad.id) in pages[0].seen_ids  # still present upstream: no reconcile delete
    assert any(e["event"] == "authjs_record_skipped" for e in logs)


@pytest.mark.parametrize("flavour", ["prisma", "drizzle"])
def test_sqlite_dynamic_typing_garbage_is_isolated(
    flavour: str, tmp_path: Path, providers: Callable[..., AuthjsProvider]
) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    with make_loader(flavour, url) as loader:
        users = loader.populate(10, seed=17, now=NOW)
        table, sessions = loader.user_table, loader.session_table
        loader.execute(
            f'UPDATE "{table}" SET "emailVerified" = %s WHERE id = %s',
            ["last tuesday", users[1].id],
        )
        loader.execute(
            f'UPDATE "{table}" SET email = %s WHERE id = %s', [b"ken@example.com", users[2].id]
        )
        assert users[3].id is not None  # populate() gave every user an id
        loader.create_session(
            users[3].id, FakeSession(session_token="x", expires=NOW + timedelta(days=2))
        )
        loader.execute(
            f'UPDATE "{sessions}" SET expires = %s WHERE "sessionToken" = %s', ["soon", "x"]
        )
    pages = drain(providers(AuthjsDb(flavour, "sqlite", url, None).settings()))
    reasons = {e.external_id: e.reason for p in pages for e in p.errors}
    assert reasons == {
        str(users[1].id): "emailVerified: not a timestamp (str)",
        str(users[2].id): "email: expected a string, got bytes",
        str(users[3].id): "session: expires: not a timestamp (str)",
    }
    assert len(upserts(pages)) == len(users) - 2


def test_fetch_user_follows_adapter_writes(
    authjs_db: AuthjsDb, providers: Callable[..., AuthjsProvider]
) -> None:
    loader = authjs_db.loader
    uid = loader.create_user(name="Radia", email="radia@example.com")
    loader.link_account(
        uid, FakeAccount(provider="github", provider_account_id="77", access_token="gho_x")
    )
    provider = providers(authjs_db.settings())
    first = provider.fetch_user(str(uid))
    assert first is not None
    assert first.external_id == str(uid)
    assert [(i.provider, i.external_id) for i in first.linked] == [("authjs:github", "77")]
    assert first.attributes is not None
    assert not first.attributes.email_verified

    loader.update_user(uid, name="Radia Perlman", emailVerified=NOW)
    second = provider.fetch_user(str(uid))
    assert second is not None
    assert second.attributes is not None
    assert second.attributes.name == "Radia Perlman"
    assert second.attributes.email_verified
    assert second.content_hash() != first.content_hash()

    loader.delete_user(uid)
    assert provider.fetch_user(str(uid)) is None
    assert provider.fetch_user("no-such-user") is None
    assert drain(provider)[-1].seen_ids == ()


def test_session_add_and_remove_show_in_the_next_pass(
    authjs_db: AuthjsDb, providers: Callable[..., AuthjsProvider]
) -> None:
    loader = authjs_db.loader
    uid = loader.create_user(name="Tim", email="tim@example.com")
    session = FakeSession(
        session_token="0b7c7f0e-1111-4c2b-9e3a-3f5e2b8d9a10", expires=NOW + timedelta(days=29)
    )
    loader.create_session(uid, session)
    provider = providers(authjs_db.settings())
    found = logins(drain(provider))
    assert [c.session.external_session_id for c in found if c.session] == [
        session_id(session.session_token)
    ]
    loader.delete_session(session.session_token)
    assert logins(drain(provider)) == []


@pg
def test_pg_adapter_delete_user_leaves_no_accounts_or_sessions(pg_url: str) -> None:
    with make_loader("pg", pg_url) as loader:
        users = loader.populate(5, seed=18, now=NOW)
        assert users[0].id is not None  # populate() gave every user an id
        loader.delete_user(users[0].id)
        for table in ("users", "accounts", "sessions"):
            column = "id" if table == "users" else '"userId"'
            rows = loader.execute(
                f"SELECT count(*) FROM {table} WHERE {column} = %s", [users[0].id]
            )
            assert rows == [(0,)]


def test_generated_users_are_deterministic() -> None:
    from tests.fakes.authjs import generate_users

    first = list(generate_users(50, seed=1, now=NOW))
    assert first == list(generate_users(50, seed=1, now=NOW))
    assert first != list(generate_users(50, seed=2, now=NOW))
    assert len({u.email for u in first}) == 50
    assert any(not u.accounts for u in first)
    assert any(len(u.accounts) == 2 for u in first)


# -- errors at the boundary ------------------------------------------------------------


@pg
def test_missing_tables_are_a_config_error(
    pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    provider = providers(AuthjsDb("drizzle", "postgresql", pg_url, None).settings())
    with pytest.raises(ConfigError, match=r'relation "public\.user" does not exist'):
        drain(provider)


def test_an_unreachable_database_is_upstream_unavailable(
    providers: Callable[..., AuthjsProvider],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://nobody@127.0.0.1:{port}/app?connect_timeout=2"
    provider = providers(AuthjsSettings.model_validate({"database_url": url}))
    with pytest.raises(UpstreamUnavailable):
        drain(provider)
    with pytest.raises(UpstreamUnavailable):
        provider.expired_sessions(NOW)


@pg
def test_fetch_user_with_a_malformed_row_is_upstream_data_error(
    pg_url: str, providers: Callable[..., AuthjsProvider]
) -> None:
    with make_loader("pg", pg_url) as loader:
        uid = loader.create_user(name="Ken", email="ken@example.com")
        loader.execute("ALTER TABLE users ALTER COLUMN email TYPE jsonb USING to_jsonb(email)")
        loader.execute("UPDATE users SET email = '[1, 2]' WHERE id = %s", [uid])
    provider = providers(AuthjsDb("pg", "postgresql", pg_url, None).settings())
    with pytest.raises(UpstreamDataError, match="email: expected a string"):
        provider.fetch_user(str(uid))


# -- scale -----------------------------------------------------------------------------


@pytest.mark.slow
@pg
def test_a_hundred_thousand_users(pg_url: str, providers: Callable[..., AuthjsProvider]) -> None:
    with make_loader("pg", pg_url) as loader:
        users = loader.populate(100_000, seed=19, now=NOW)
    pages = drain(providers(AuthjsDb("pg", "postgresql", pg_url, None).settings()))
    assert len(pages) == 100
    assert sum(len(p.seen_ids) for p in pages) == len(users)
    assert len(logins(pages)) == sum(len(live(u)) for u in users)


# -- the digest's version pins the mapping ----------------------------------------------------

#: What ``to_change`` and ``session_change`` give for ``_PINNED_ROWS``, per DIGEST_VERSION.
MAPPING_PINS = {"authjs-1": "14dcbcca", "authjs-2": "14dcbcca", "authjs-3": "14dcbcca"}


def _mapping_fingerprint() -> str:
    """A digest of everything the mapping produces for a spread of rows (every case file,
    plus sessions), so that any change to what it reads or writes shows."""
    observed = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    produced: list[Any] = []
    for path in CASES:
        case = json.loads(path.read_text())
        change = to_change(case["row"], case["accounts"], observed_at=observed)
        produced.append([asdict(change), change.content_hash()])
    for created in (None, "2026-01-01T08:00:00+00:00"):
        session = {"userId": 7, "sessionToken": "tok-1", "expires": "2026-02-01T00:00:00+00:00"}
        if created is not None:
            session["createdAt"] = created
        produced.append(asdict(session_change(session, observed_at=observed)))
    text = json.dumps(produced, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _plain(value: object) -> object:
    # A set prints in hash order, which varies from process to process.
    return sorted(map(str, value)) if isinstance(value, set | frozenset) else str(value)


def test_the_digest_version_changes_with_the_mapping() -> None:
    """A digest pass skips a user whose source rows are unchanged since a digest was stored.
    Should the mapping change (a field read or written differently), every stored digest
    must stop matching, or those users keep what the old mapping wrote: bump DIGEST_VERSION
    with any such change. This fails when the mapping's output changes while the version
    does not (then bump it, and pin the new fingerprint under the new version)."""
    from providers.authjs_digest import DIGEST_VERSION

    got = _mapping_fingerprint()
    pinned = MAPPING_PINS.get(DIGEST_VERSION)
    assert pinned is not None, f"pin {DIGEST_VERSION!r}: {got!r} in MAPPING_PINS"
    assert got == pinned, (
        f"the Auth.js mapping changed (fingerprint {got}, pinned {pinned} for "
        f"{DIGEST_VERSION}): bump providers.authjs_digest.DIGEST_VERSION and pin {got} under it"
    )
