"""Backfills end to end: real adapters, fake IdPs over loopback HTTP (or a real Auth.js
database), the real engine, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from db.connect import make_engine
from db.cursors import load_cursor
from db.migrate import upgrade
from db.tables import sync_runs
from providers.auth0 import Auth0Provider
from providers.authjs import AuthjsProvider
from providers.base import Cursor, Page, Provider, StoredDigests
from providers.http import HttpPolicy
from providers.stack import StackProvider
from sync_worker.changes import (
    ChangeKind,
    Source,
    UserAttributes,
    UserChange,
    parse_timestamp,
    utcnow,
)
from sync_worker.config import Auth0Settings, AuthjsSettings, StackSettings
from sync_worker.engine import PlanSettings, SyncEngine
from sync_worker.errors import UpstreamUnavailable
from sync_worker.pull import PullReport, PullRunner, ReconcileRefused
from tests.conftest import sqlalchemy_url
from tests.factories import BoundEngine, audit, login, rows, upsert
from tests.fakes.auth0 import FakeAuth0
from tests.fakes.authjs import FakeSession, make_loader
from tests.fakes.stack import USERS_PATH, StackFake

FAST = HttpPolicy(
    connect_timeout=2.0, read_timeout=2.0, max_attempts=2, max_retry_seconds=2.0,
    backoff_base=0.01, backoff_max=0.02,
)  # fmt: skip


@pytest.fixture
def stack_fake() -> Iterator[StackFake]:
    with StackFake() as fake:
        yield fake


def stack_provider(fake: StackFake, page_size: int = 5) -> StackProvider:
    settings = StackSettings(
        project_id=fake.project_id,
        secret_server_key=fake.secret_server_key,
        base_url=fake.url,
        page_size=page_size,
    )
    return StackProvider(settings, policy=FAST)


def runner(engine: Engine, provider: Provider, **kw: Any) -> PullRunner:
    return PullRunner(engine, SyncEngine(PlanSettings()), provider, **kw)


def live_users(engine: Engine) -> list[dict[str, Any]]:
    return [u for u in rows(engine, "users") if u["deleted_at"] is None]


def last_run(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(select(sync_runs).order_by(sync_runs.c.started_at.desc())).mappings()
        return dict(next(iter(row)))


class FailAfter:
    """Wraps an adapter; after ``pages`` pages, calls ``hook`` (to break the upstream)."""

    #: Pages are what this breaks between: no set-based pass, whose batches are not pages
    #: of the adapter (tests/contract/test_setpass.py fails one of those midway).
    set_pass = None

    def __init__(self, inner: Provider, pages: int, hook: Callable[[], None]) -> None:
        self.inner, self.pages, self.hook = inner, pages, hook
        self.name = inner.name

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        return self._failing(self.inner.iter_changes(cursor, full=full))

    def iter_digested(
        self, cursor: Cursor | None, *, full: bool = False, known: StoredDigests
    ) -> Iterator[Page] | None:
        digested = getattr(self.inner, "iter_digested", None)
        pages = None if digested is None else digested(cursor, full=full, known=known)
        return None if pages is None else self._failing(pages)

    def _failing(self, pages: Iterator[Page]) -> Iterator[Page]:
        for n, page in enumerate(pages, start=1):
            yield page
            if n == self.pages:
                self.hook()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TestStack:
    def test_full_backfill_fills_users_profiles_identities(
        self, engine: Engine, stack_fake: StackFake
    ) -> None:
        stack_fake.seed(23, anonymous_every=7)
        report = runner(engine, stack_provider(stack_fake)).run(full=True)
        assert report.counts["created"] == 23
        assert len(rows(engine, "users")) == len(rows(engine, "profiles")) == 23
        assert report.reconcile is not None
        assert report.reconcile.deleted == 0
        run = last_run(engine)
        assert (run["kind"], run["status"], run["counts"]["created"]) == ("full", "succeeded", 23)
        assert load_cursor(engine, "stack") is not None
        # The next pull lists everything again and writes nothing.
        again = runner(engine, stack_provider(stack_fake)).run()
        assert dict(again.counts) == {"unchanged": 23}

    def test_a_killed_backfill_resumes_and_never_passes_a_failed_page(
        self, engine: Engine, stack_fake: StackFake
    ) -> None:
        stack_fake.seed(23)
        # The third users page keeps failing (the adapter may ask for it before the second
        # page is applied: it reads the listing ahead).
        stack_fake.fail_next(USERS_PATH, status=503, times=50, after=2)
        with pytest.raises(UpstreamUnavailable):
            runner(engine, stack_provider(stack_fake)).run(full=True)
        assert len(rows(engine, "users")) == 10  # two pages of five, committed
        cursor = load_cursor(engine, "stack")
        assert cursor is not None
        assert "next_cursor" in cursor
        assert last_run(engine)["status"] == "failed"

        stack_fake._faults.clear()
        before = len(stack_fake.requests_to(USERS_PATH))
        report = runner(engine, stack_provider(stack_fake)).run()
        resumed = stack_fake.requests_to(USERS_PATH)[before]
        assert resumed.arg("cursor") == cursor["next_cursor"]
        assert report.counts["created"] == 13
        assert len(rows(engine, "users")) == 23
        assert report.reconcile is None  # a resumed pass saw only part of the users
        assert report.reconcile_skipped is not None
        assert "resumed from a cursor" in report.reconcile_skipped

    def test_dry_run_writes_nothing(self, engine: Engine, stack_fake: StackFake) -> None:
        stack_fake.seed(8)
        report = runner(engine, stack_provider(stack_fake)).run(full=True, dry_run=True)
        assert report.counts["created"] == 8
        assert len(report.samples) == 8
        assert rows(engine, "users") == []
        assert audit(engine) == []
        assert load_cursor(engine, "stack") is None
        assert report.status == "dry_run"
        assert rows(engine, "sync_runs") == []  # not even a run row

    def test_leaving_every_team_clears_the_tenant(
        self, engine: Engine, stack_fake: StackFake
    ) -> None:
        ada, bob = stack_fake.add_user(display_name="Ada"), stack_fake.add_user(display_name="Bob")
        acme = stack_fake.add_team("Acme", members=[ada, bob])
        runner(engine, stack_provider(stack_fake)).run(full=True)
        assert {u["tenant_id"] for u in rows(engine, "users")} == {acme}

        stack_fake.remove_member(acme, ada)
        report = runner(engine, stack_provider(stack_fake)).run(full=True)

        assert dict(report.counts) == {"updated": 1, "unchanged": 1}
        tenants = {u["name"]: u["tenant_id"] for u in rows(engine, "users")}
        assert tenants == {"Ada": None, "Bob": acme}
        (updated,) = audit(engine, action="updated")
        assert (updated["external_id"], updated["changes"]["tenant_id"]) == (ada, [acme, None])

    def test_reconcile_soft_deletes_users_missing_upstream(
        self, engine: Engine, stack_fake: StackFake
    ) -> None:
        ids = stack_fake.seed(10)
        runner(engine, stack_provider(stack_fake)).run(full=True)
        stack_fake.delete_user(ids[4])
        report = runner(engine, stack_provider(stack_fake)).run(full=True)
        assert report.reconcile is not None
        assert (report.reconcile.missing, report.reconcile.deleted) == (1, 1)
        assert len(live_users(engine)) == 9
        deleted = audit(engine, action="deleted")
        assert [a["external_id"] for a in deleted] == [ids[4]]

    def test_reconcile_spares_a_user_written_while_the_pass_ran(
        self, engine: Engine, stack_fake: StackFake
    ) -> None:
        """A webhook applied mid-pass creates a user the pass has already read past (and an
        old one is refreshed): reconcile's deletions date from the run's start, so both are
        skipped as stale, while a user deleted upstream before the run is deleted."""
        ids = stack_fake.seed(10)
        runner(engine, stack_provider(stack_fake)).run(full=True)
        stack_fake.delete_user(ids[2])
        stack_fake.delete_user(ids[9])
        sync = BoundEngine(engine, PlanSettings())

        def webhook() -> None:
            now = utcnow()
            late = [
                UserChange(
                    provider="stack",
                    external_id=external_id,
                    kind=ChangeKind.UPSERT,
                    version=now,
                    attributes=UserAttributes(email=f"{external_id}@example.com"),
                )
                for external_id in ("created-mid-pass", ids[9])
            ]
            sync.apply(late, source=Source.WEBHOOK)

        provider = FailAfter(stack_provider(stack_fake), 1, webhook)
        report = runner(engine, provider, max_delete_fraction=0.5).run(full=True)
        assert report.reconcile is not None
        assert (report.reconcile.missing, report.reconcile.deleted) == (3, 1)
        assert [a["external_id"] for a in audit(engine, action="deleted")] == [ids[2]]
        assert report.counts["stale_skipped"] == 2
        live = {i["external_id"] for i in rows(engine, "user_identities") if not i["deleted_at"]}
        assert {"created-mid-pass", ids[9]} <= live
        assert ids[2] not in live

    def test_reconcile_guard_refuses_mass_deletion(
        self, engine: Engine, stack_fake: StackFake
    ) -> None:
        ids = stack_fake.seed(10)
        runner(engine, stack_provider(stack_fake)).run(full=True)
        for user_id in ids[:3]:  # 30% > max_delete_fraction 20%
            stack_fake.delete_user(user_id)
        with pytest.raises(ReconcileRefused, match="max_delete_fraction") as refused:
            runner(engine, stack_provider(stack_fake)).run(full=True)
        report = refused.value.report
        assert report.reconcile is not None
        assert report.reconcile.refused
        assert len(live_users(engine)) == 10
        run = last_run(engine)
        assert run["status"] == "failed"
        assert "max_delete_fraction" in run["error"]

    def test_routine_pulls_reconcile_once_a_pass_is_complete(
        self, engine: Engine, stack_fake: StackFake
    ) -> None:
        ids = stack_fake.seed(10)
        runner(engine, stack_provider(stack_fake)).run(full=True)
        stack_fake.delete_user(ids[0])
        report = runner(engine, stack_provider(stack_fake), source=Source.PULL).run()
        assert report.kind == "incremental"
        assert report.reconcile is not None
        assert report.reconcile.deleted == 1

    def test_guard_fraction_is_configurable(self, engine: Engine, stack_fake: StackFake) -> None:
        ids = stack_fake.seed(10)
        runner(engine, stack_provider(stack_fake)).run(full=True)
        for user_id in ids[:3]:
            stack_fake.delete_user(user_id)
        provider = stack_provider(stack_fake)
        report = runner(engine, provider, max_delete_fraction=0.5).run(full=True)
        assert report.reconcile is not None
        assert report.reconcile.deleted == 3

    def test_seen_ids_are_cleaned_up(self, engine: Engine, stack_fake: StackFake) -> None:
        stack_fake.seed(6)
        runner(engine, stack_provider(stack_fake)).run(full=True)
        assert rows(engine, "sync_seen") == []


class TestAuth0:
    @pytest.fixture
    def fake(self) -> Iterator[FakeAuth0]:
        fake = FakeAuth0(job_polls=1)
        fake.start()
        yield fake
        fake.stop()

    def provider(self, fake: FakeAuth0) -> Auth0Provider:
        settings = Auth0Settings(
            domain=fake.domain,
            client_id=fake.client_id,
            client_secret=fake.client_secret,
            base_url=fake.url,
        )
        return Auth0Provider(settings, policy=FAST, batch_size=7, poll_interval=0.01)

    def test_full_export_then_incremental_logs(self, engine: Engine, fake: FakeAuth0) -> None:
        users = fake.seed_users(20)
        report = runner(engine, self.provider(fake)).run(full=True)
        assert report.counts["created"] == 20
        assert {i["external_id"] for i in rows(engine, "user_identities", provider="auth0")} == {
            u["user_id"] for u in users
        }
        fake.update_user(users[0]["user_id"], name="Renamed Person")
        fake.delete_user(users[1]["user_id"])
        fake.login(users[2]["user_id"])
        report = runner(engine, self.provider(fake), source=Source.PULL).run()
        assert report.kind == "incremental"
        assert report.counts["updated"] >= 1
        assert report.counts["deleted"] == 1
        assert report.sessions == {"new": 1}  # a login is a session, not a user
        assert "login" not in report.counts
        renamed = rows(engine, "users", name="Renamed Person")
        assert len(renamed) == 1
        assert len(rows(engine, "user_sessions")) == 1


@pytest.mark.postgres
class TestAuthjs:
    def test_backfill_from_the_app_database_shared_with_the_worker(
        self, make_pg_database: Callable[[], str]
    ) -> None:
        # One database: the app's Auth.js tables in public, the worker's in schema identity.
        url = make_pg_database()
        with make_loader("pg", url) as loader:
            created = loader.populate(40)
        worker = make_engine(sqlalchemy_url(url), schema="identity")
        upgrade(worker, "identity")
        settings = AuthjsSettings(database_url=url)
        try:
            with closing(AuthjsProvider(settings, batch_size=15)) as provider:
                report = runner(worker, provider).run(full=True)
            assert report.counts["created"] == 40
            assert len(rows(worker, "profiles")) == 40
            linked = [i for i in rows(worker, "user_identities") if i["provider"] != "authjs"]
            assert len(linked) == sum(len(u.accounts) for u in created)
            assert report.pages >= 3
        finally:
            worker.dispose()

    def test_a_rename_upstream_keeps_the_login_its_sessions_recorded(
        self, engine: Engine, make_pg_database: Callable[[], str]
    ) -> None:
        url = make_pg_database()
        settings = AuthjsSettings(database_url=url)
        with make_loader("pg", url) as loader:
            (user,) = loader.populate(1)
            assert user.id is not None
            expires = datetime.now(UTC) + timedelta(days=20)
            loader.create_session(user.id, FakeSession(session_token="tok-1", expires=expires))
            with closing(AuthjsProvider(settings)) as provider:
                runner(engine, provider).run(full=True)
            (before,) = rows(engine, "users")
            assert before["last_login_at"] is not None  # from the user's live session
            loader.update_user(user.id, name="Renamed Person")
            with closing(AuthjsProvider(settings)) as provider:
                report = runner(engine, provider).run(full=True)
        assert report.counts["updated"] == 1
        (after,) = rows(engine, "users")
        assert after["name"] == "Renamed Person"
        assert after["last_login_at"] == before["last_login_at"]
        (updated,) = audit(engine, action="updated")
        assert "last_login_at" not in updated["changes"]

    def test_a_killed_backfill_resumes_from_its_cursor(
        self, engine: Engine, make_pg_database: Callable[[], str]
    ) -> None:
        url = make_pg_database()
        with make_loader("drizzle", url) as loader:
            loader.populate(30)
        settings = AuthjsSettings.model_validate(
            {"database_url": sqlalchemy_url(url), "schema": "drizzle"}
        )

        def die() -> None:
            raise KeyboardInterrupt  # the process is stopped between pages

        with (
            closing(AuthjsProvider(settings, batch_size=10)) as provider,
            pytest.raises(KeyboardInterrupt),
        ):
            runner(engine, FailAfter(provider, 2, die)).run()
        assert len(rows(engine, "users")) == 20
        with closing(AuthjsProvider(settings, batch_size=10)) as provider:
            report = runner(engine, provider).run()
        assert report.counts["created"] == 10
        assert len(rows(engine, "users")) == 30


def test_sessions_are_counted_apart_from_users(engine: Engine, tmp_path: Path) -> None:
    """Auth.js pages carry each user's sessions as logins: a pass over 30 unchanged users
    reports 30 unchanged users, and their sessions under ``sessions``."""
    app = f"sqlite:///{tmp_path / 'app.db'}"
    with make_loader("prisma", app) as loader:
        loader.populate(30)
    settings = AuthjsSettings.model_validate({"database_url": app, "schema": "prisma"})
    with closing(AuthjsProvider(settings, batch_size=10)) as provider:
        first = runner(engine, provider).run(full=True)
    live = len(rows(engine, "user_sessions"))
    assert live > 0
    assert dict(first.counts) == {"created": 30}
    assert dict(first.sessions) == {"new": live}
    with closing(AuthjsProvider(settings, batch_size=10)) as provider:
        again = runner(engine, provider).run(full=True)
    assert dict(again.counts) == {"unchanged": 30}
    assert dict(again.sessions) == {"unchanged": live}
    assert last_run(engine)["counts"] == {"unchanged": 30, "sessions_unchanged": live, "pages": 3}


class RecordedProgress:
    def __init__(self) -> None:
        self.totals: list[int] = []
        self.users = self.sessions = 0

    def total(self, users: int) -> None:
        assert self.users == 0, "a total comes with the first page"
        self.totals.append(users)

    def advance(self, users: int, sessions: int) -> None:
        self.users += users
        self.sessions += sessions


def test_progress_counts_users_and_sessions_apart_with_the_sources_total(
    engine: Engine, tmp_path: Path
) -> None:
    app = f"sqlite:///{tmp_path / 'app.db'}"
    with make_loader("drizzle", app) as loader:
        loader.populate(30)
    settings = AuthjsSettings.model_validate({"database_url": app, "schema": "drizzle"})
    progress = RecordedProgress()
    with closing(AuthjsProvider(settings, batch_size=7)) as provider:
        runner(engine, provider, progress=progress).run(full=True)
    assert progress.totals == [30]  # Auth.js counts its users table
    assert progress.users == 30
    assert progress.sessions == len(rows(engine, "user_sessions")) > 0


def test_progress_without_a_total_where_the_source_has_none(
    engine: Engine, stack_fake: StackFake
) -> None:
    stack_fake.seed(23)
    progress = RecordedProgress()
    runner(engine, stack_provider(stack_fake), progress=progress).run(full=True)
    assert (progress.totals, progress.users, progress.sessions) == ([], 23, 0)


def test_a_pull_report_counts_sessions_apart_from_users(engine: Engine) -> None:
    sync = BoundEngine(engine)
    sync.apply([upsert("auth0|1"), login("auth0|1", "s1")], source=Source.PULL)
    again = [upsert("auth0|1"), login("auth0|1", "s1"), login("auth0|1", "s2"),
             login("auth0|3", "s4")]  # fmt: skip
    report = PullReport(run_id=uuid.uuid4(), provider="auth0", kind="full", started_at=utcnow())
    report.add(sync.apply(again, source=Source.PULL))
    assert report.counts == {"unchanged": 1}
    assert report.sessions == {"unchanged": 1, "new": 1, "failed": 1}


def test_auth0_since_starts_the_log_at_a_time(engine: Engine) -> None:
    fake = FakeAuth0(job_polls=0)
    fake.start()
    try:
        users = fake.seed_users(5, signup_logs=False)
        fake.update_user(users[0]["user_id"], name="Before")
        cut = parse_timestamp(fake.logs[-1]["date"])
        fake.update_user(users[1]["user_id"], name="After")
        provider = TestAuth0().provider(fake)
        assert cut is not None
        cursor = provider.cursor_since(cut + timedelta(milliseconds=1))
        report = runner(engine, provider).run(cursor=cursor)
    finally:
        fake.stop()
    assert report.kind == "incremental"
    assert [u["name"] for u in rows(engine, "users")] == ["After"]
