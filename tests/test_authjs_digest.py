"""The digest pass against the per-row pass: twin worker databases, one Auth.js source.

Each scenario runs every pass twice, on two PostgreSQL worker databases fed by the same
@auth/pg-adapter database at the same clock: once with the digest skip, once without, and
then compares every worker table (generated ids replaced by the user's identities, the
digest column and run ids left out). Whatever the digest skips must be exactly what the
per-row engine would have found unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text

import db.digests
import providers.authjs_copy
from db.connect import make_engine
from db.digests import stored_digests
from db.migrate import upgrade
from db.tables import metadata
from db.transaction import transaction
from providers.authjs import AuthjsProvider
from providers.base import Compared, Cursor, Page, StoredDigests
from sync_worker.changes import ChangeKind, Source, UserAttributes, UserChange
from sync_worker.config import AuthjsSettings
from sync_worker.digest_sum import MODULUS, DigestSum
from sync_worker.engine import PlanSettings, SyncEngine
from sync_worker.errors import ConfigError
from sync_worker.pull import PullReport, PullRunner, ReconcileRefused, ReconcileReport, _Stored
from tests.conftest import sqlalchemy_url
from tests.fakes.authjs import FakeAccount, FakeSession, PgAdapterLoader, make_loader

pytestmark = pytest.mark.postgres

SCHEMA = "identity"
START = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
COMPARED = ("users", "profiles", "user_identities", "user_sessions", "sync_audit")
DROPPED = {"id", "run_id"}


class Recording:
    """Wraps the provider: counts the changes its pages carry, and can stop after a page."""

    def __init__(self, inner: AuthjsProvider, stop_after: int | None = None) -> None:
        self.inner, self.name = inner, inner.name
        self.stop_after = stop_after
        self.mapped = 0
        self.pages = 0
        self.listed = 0  # ids the pages listed in seen_ids (none where the store compared)

    def _pages(self, pages: Iterator[Page]) -> Iterator[Page]:
        for page in pages:
            # Users mapped, or read and found unmappable.
            self.mapped += sum(1 for c in page.changes if c.kind is ChangeKind.UPSERT)
            self.mapped += len({e.external_id for e in page.errors})
            self.listed += len(page.seen_ids)
            yield page
            self.pages += 1
            if self.stop_after is not None and self.pages == self.stop_after:
                raise KeyboardInterrupt  # the process is stopped between pages

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        return self._pages(self.inner.iter_changes(cursor, full=full))

    def iter_digested(
        self, cursor: Cursor | None, *, full: bool = False, known: StoredDigests
    ) -> Iterator[Page] | None:
        pages = self.inner.iter_digested(cursor, full=full, known=known)
        return None if pages is None else self._pages(pages)

    def cursor_since(self, since: datetime) -> Cursor | None:
        return None

    def close(self) -> None:
        self.inner.close()


@dataclass
class Twins:
    """One source, two workers (``digest``, ``plain``), one clock both passes read."""

    source_url: str
    loader: PgAdapterLoader
    digest: Engine
    plain: Engine
    now: datetime = START
    batch_size: int = 7
    plan: PlanSettings = field(default_factory=PlanSettings)
    reports: dict[bool, PullReport] = field(default_factory=dict)
    mapped: dict[bool, int] = field(default_factory=dict)
    listed: dict[bool, int] = field(default_factory=dict)

    def tick(self, minutes: float = 1) -> datetime:
        self.now += timedelta(minutes=minutes)
        return self.now

    def provider(self) -> AuthjsProvider:
        settings = AuthjsSettings(database_url=self.source_url)
        now = self.now
        return AuthjsProvider(settings, batch_size=self.batch_size, now=lambda: now)

    def engine(self) -> SyncEngine:
        now = self.now
        return SyncEngine(self.plan, clock=lambda: now)

    def run(self, *, full: bool = True, stop_after: int | None = None) -> None:
        """The same pass on both workers, at the same (new) time."""
        self.tick()
        for digests, worker in ((True, self.digest), (False, self.plain)):
            with closing(Recording(self.provider(), stop_after)) as provider:
                runner = PullRunner(
                    worker, self.engine(), provider, max_delete_fraction=1.0, digests=digests
                )
                with suppress(KeyboardInterrupt):  # a pass stopped on purpose
                    self.reports[digests] = runner.run(full=full)
                self.mapped[digests] = provider.mapped
                self.listed[digests] = provider.listed

    def both(self, change: UserChange) -> None:
        """A change applied to both workers through the engine, as the drainer would."""
        self.tick()
        for worker in (self.digest, self.plain):
            with transaction(worker) as conn:
                self.engine().apply(conn, [change], source=Source.WEBHOOK)

    def assert_same(self) -> None:
        assert normalized(self.digest) == normalized(self.plain)
        # Reconcile counted alike, however the digest pass took its counts.
        if self.reports:
            assert self.reports[True].reconcile == self.reports[False].reconcile


def normalized(engine: Engine) -> dict[str, list[str]]:
    """Every compared table, rows as sorted text, users named by their identities."""
    with engine.connect() as conn:
        owners: dict[Any, list[str]] = {}
        for row in conn.execute(select(metadata.tables["user_identities"])).mappings():
            owners.setdefault(row["user_id"], []).append(f"{row['provider']}:{row['external_id']}")
        names = {k: "|".join(sorted(v)) for k, v in owners.items()}
        out: dict[str, list[str]] = {}
        for name in COMPARED:
            found = []
            for row in conn.execute(select(metadata.tables[name])).mappings():
                values = {k: v for k, v in row.items() if k not in DROPPED}
                if name == "users":
                    values["user"] = names.get(row["id"], "?")
                if "user_id" in values:
                    values["user_id"] = names.get(values["user_id"], str(values["user_id"]))
                found.append(repr(sorted(values.items())))
            out[name] = sorted(found)
    return out


@pytest.fixture
def twins(make_pg_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Twins]:
    source = make_pg_database()
    workers = []
    for _ in range(2):
        worker = make_engine(sqlalchemy_url(make_pg_database()), schema=SCHEMA)
        upgrade(worker, SCHEMA)
        workers.append(worker)
    loader = make_loader("pg", source)
    assert isinstance(loader, PgAdapterLoader)
    with loader:
        loader.populate(30, now=START)
        for user in ids_of(loader):  # and a live session each, as in production
            expires = START + timedelta(days=20, minutes=user)
            loader.create_session(user, FakeSession(session_token=f"live-{user}", expires=expires))
        twins = Twins(source, loader, workers[0], workers[1])
        # The runner's own clock too: reconcile dates its deletions by it.
        monkeypatch.setattr("sync_worker.pull.utcnow", lambda: twins.now)
        twins.run()  # the initial load
        twins.assert_same()
        yield twins
    for worker in workers:
        worker.dispose()


def ids(twins: Twins) -> list[int]:
    return ids_of(twins.loader)


def ids_of(loader: PgAdapterLoader) -> list[int]:
    return [int(r[0]) for r in loader.execute("SELECT id FROM users ORDER BY id")]


def live_session_of(twins: Twins) -> tuple[int, str]:
    row = twins.loader.execute(
        'SELECT "userId", "sessionToken" FROM sessions WHERE expires > %s ORDER BY 1, 2 LIMIT 1',
        [twins.now + timedelta(days=1)],
    )
    return int(row[0][0]), str(row[0][1])


# -- the scenarios: each mutates, then the twins pass and must agree ------------------


def unchanged(t: Twins) -> None:
    return None


def user_fields_changed(t: Twins) -> None:
    a, b, c = ids(t)[:3]
    t.loader.update_user(a, name="Renamed Person")
    t.loader.update_user(b, email=f"moved{b}@example.com")
    t.loader.update_user(c, image="https://example.com/new.png")


def account_linked_and_unlinked(t: Twins) -> None:
    a, b = ids(t)[3:5]
    t.loader.link_account(a, FakeAccount(provider="gitlab", provider_account_id=f"gl-{a}"))
    t.loader.execute('DELETE FROM accounts WHERE "userId" = %s', [b])


def sessions_changed(t: Twins) -> None:
    user, token = live_session_of(t)
    a, b = ids(t)[5:7]
    t.loader.create_session(
        a, FakeSession(session_token=f"new-{a}", expires=t.now + timedelta(days=9))
    )
    t.loader.execute(
        'UPDATE sessions SET expires = %s WHERE "sessionToken" = %s',
        [t.now + timedelta(days=29), token],
    )  # extended
    t.loader.create_session(
        b, FakeSession(session_token=f"soon-{b}", expires=t.now + timedelta(seconds=30))
    )
    t.loader.execute(
        'DELETE FROM sessions WHERE "sessionToken" = (SELECT max("sessionToken") '
        'FROM sessions WHERE expires > %s AND "userId" <> %s)',
        [t.now + timedelta(days=1), user],
    )


def deleted_by_webhook(t: Twins) -> None:
    a = ids(t)[7]
    t.both(UserChange(provider="authjs", external_id=str(a), kind=ChangeKind.DELETE, version=t.now))


def updated_by_webhook(t: Twins) -> None:
    a = ids(t)[8]
    t.both(
        UserChange(
            provider="authjs",
            external_id=str(a),
            kind=ChangeKind.UPSERT,
            version=t.now,
            attributes=UserAttributes(name="Webhook Name", stated=frozenset({"name"})),
            raw={"id": str(a), "name": "Webhook Name"},
        )
    )


def on_both_workers(t: Twins, sql: str, **params: object) -> None:
    for worker in (t.digest, t.plain):
        with transaction(worker) as conn:
            conn.execute(text(sql), params)


def session_revoked_in_worker(t: Twins) -> None:
    user, _ = live_session_of(t)
    on_both_workers(
        t,
        "UPDATE user_sessions SET revoked_at = :now WHERE user_id = (SELECT user_id FROM "
        "user_identities WHERE provider = 'authjs' AND external_id = :e)",
        now=t.now,
        e=str(user),
    )


def user_row_changed_in_worker(t: Twins) -> None:
    # The app edits the worker's users row directly: the engine's skip does not read it.
    a = ids(t)[9]
    on_both_workers(
        t,
        "UPDATE users SET name = 'App Edit' WHERE id = (SELECT user_id FROM "
        "user_identities WHERE provider = 'authjs' AND external_id = :e)",
        e=str(a),
    )


def poison_row(t: Twins) -> None:
    a = ids(t)[10]
    t.loader.link_account(a, FakeAccount(provider="github", provider_account_id=""))


def profile_defaults_changed(t: Twins) -> None:
    t.plan = PlanSettings(profile_defaults={"timezone": "Europe/Paris", "currency": "EUR"})
    t.loader.create_user(name="Newcomer", email="newcomer@example.com")


SCENARIOS = [
    unchanged,
    user_fields_changed,
    account_linked_and_unlinked,
    sessions_changed,
    deleted_by_webhook,
    updated_by_webhook,
    session_revoked_in_worker,
    user_row_changed_in_worker,
    poison_row,
    profile_defaults_changed,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_the_digest_pass_writes_what_the_per_row_pass_writes(
    twins: Twins, scenario: Callable[[Twins], None]
) -> None:
    twins.run()  # both workers now hold digests (the digest twin) of an unchanged source
    twins.assert_same()
    scenario(twins)
    twins.assert_same()
    twins.run()
    twins.assert_same()
    twins.run(full=False)  # and once more, as the scheduler's pull would
    twins.assert_same()


#: The scenarios after which the source's total still matches the stored digests'.
TOTALS_AGREE = (unchanged, user_row_changed_in_worker)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_digests_read_in_two_halves(
    twins: Twins, scenario: Callable[[Twins], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """From ``SPLIT_AT`` users on, the digests are read in two id ranges on two source
    connections sharing the pass's snapshot: the same users are found changed."""
    joined: list[str] = []
    join = providers.authjs_copy.join_snapshot

    def joining(conn: Any, snapshot: str) -> None:
        joined.append(snapshot)
        join(conn, snapshot)

    monkeypatch.setattr("providers.authjs.SPLIT_AT", 2)
    monkeypatch.setattr("providers.authjs.join_snapshot", joining)
    twins.run()
    scenario(twins)
    twins.run()
    twins.assert_same()
    # The second half was read on its own connection, unless the source's total matched
    # the stored digests' (nothing the source holds changed) and no digest was read.
    assert bool(joined) == (scenario not in TOTALS_AGREE)
    twins.run(full=False)
    twins.assert_same()


def test_the_worker_compares_the_digests_and_records_the_seen_ids(twins: Twins) -> None:
    """On a PostgreSQL worker no page lists the users' ids: the store recorded them all
    with the comparison, and reconcile still finds a user gone upstream."""
    twins.run()
    assert twins.listed[True] == 0
    assert twins.listed[False] == 30
    twins.loader.delete_user(ids(twins)[3])
    twins.run()
    assert twins.listed[True] == 0
    reconciled = twins.reports[True].reconcile
    assert reconciled is not None
    assert (reconciled.missing, reconciled.deleted) == (1, 1)
    twins.assert_same()


class NoCompare:
    """The stored digests of ``inner``, without the worker's comparison: the provider
    merges them in id order itself, as it does for a SQLite worker."""

    def __init__(self, inner: StoredDigests) -> None:
        self.inner = inner

    def held(self) -> bool:
        return self.inner.held()

    def in_order(self, *, numeric: bool) -> Iterator[tuple[str, str]]:
        return self.inner.in_order(numeric=numeric)

    def of(self, external_ids: Sequence[str]) -> Mapping[str, str]:
        return self.inner.of(external_ids)

    def unchanged(self, summed: Callable[[], DigestSum]) -> Compared | None:
        return None

    def compare(self, digests: Iterable[bytes], *, limit: int) -> Compared | None:
        return None


@pytest.mark.parametrize("split", [False, True])
def test_compared_pages_are_the_merged_pages(
    twins: Twins, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    """Where the worker compares, the pages are cut as where the provider merges: at
    ``batch_size`` changed users or ``SEEN_PER_PAGE`` users, with the same cursors,
    changes, digests and counts (only ``seen_ids`` are left to the worker)."""
    monkeypatch.setattr("providers.authjs.SEEN_PER_PAGE", 4)
    if split:
        monkeypatch.setattr("providers.authjs.SPLIT_AT", 2)
        monkeypatch.setattr("providers.authjs_copy.CHUNK_ROWS", 3)  # several chunks a half
    twins.run()
    for user in ids(twins)[1:3] + ids(twins)[20:27]:
        twins.loader.update_user(user, name=f"Paged {user}")
    known = _Stored(twins.digest, "authjs", uuid.uuid4())

    def pages(stored: StoredDigests) -> list[tuple[Any, ...]]:
        with closing(twins.provider()) as provider:
            found = provider.iter_digested(None, full=True, known=stored)
            assert found is not None
            return [
                (p.cursor, [c.external_id for c in p.changes], p.digests, p.skipped, p.total)
                for p in found
            ]

    compared = pages(known)
    merged = pages(NoCompare(known))
    assert compared == folded(merged)
    assert len(compared) >= 4
    assert any(not changes for _, changes, _, _, _ in merged[:-1])  # a page of unchanged users
    assert len(compared) < len(merged)  # ... left out where the worker compared


def folded(pages: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The pages with each page of unchanged users only (but the last) left out, its counts
    carried to the next: a compared pass has no seen ids to write for them."""
    out: list[tuple[Any, ...]] = []
    carried, total = (0, 0), None
    for i, (cursor, changes, digests, own, page_total) in enumerate(pages):
        total = total if page_total is None else page_total
        skipped = (own[0] + carried[0], own[1] + carried[1])
        if not changes and i < len(pages) - 1:
            carried = skipped
            continue
        out.append((cursor, changes, digests, skipped, total if not out else page_total))
        carried, total = (0, 0), None
    return out


def test_sessions_that_expire_between_passes(twins: Twins) -> None:
    a = ids(twins)[11]
    twins.loader.create_session(
        a,
        FakeSession(
            session_token=f"brief-{a}", expires=twins.now + timedelta(minutes=1, seconds=30)
        ),
    )
    twins.run()
    twins.assert_same()
    twins.run()  # the session expired in between: no longer live upstream
    twins.assert_same()


def test_a_session_beyond_max_age_is_read_again_every_pass(twins: Twins) -> None:
    """A session that expires further off than maxAge takes the pass's own time as its
    login time (``min(expires - maxAge, observed)``), which the per-row pass writes anew
    each time: its user's digest moves with every pass, and only its user's."""
    a = ids(twins)[5]
    far = FakeSession(session_token="far-off", expires=twins.now + timedelta(days=45))
    twins.loader.create_session(a, far)
    for _ in range(2):
        twins.run()
        assert twins.mapped[True] == 1
        twins.assert_same()


def test_reconcile_soft_deletes_then_the_user_comes_back(twins: Twins) -> None:
    a = ids(twins)[12]
    saved = twins.loader.execute(
        'SELECT name, email, "emailVerified", image FROM users WHERE id = %s', [a]
    )[0]
    accounts = twins.loader.execute(
        'SELECT provider, "providerAccountId" FROM accounts WHERE "userId" = %s', [a]
    )
    twins.loader.delete_user(a)
    twins.run()
    reconciled = twins.reports[True].reconcile
    assert reconciled is not None
    assert reconciled.deleted == 1
    twins.assert_same()
    twins.loader.execute(
        'INSERT INTO users (id, name, email, "emailVerified", image) VALUES (%s, %s, %s, %s, %s)',
        [a, *saved],
    )
    for provider, account_id in accounts:
        twins.loader.link_account(a, FakeAccount(provider=provider, provider_account_id=account_id))
    twins.run()
    twins.assert_same()
    assert twins.reports[True].counts["restored"] == 1


def test_a_killed_pass_resumes(twins: Twins) -> None:
    for user in ids(twins):
        twins.loader.update_user(user, name=f"Changed {user}")
    twins.run(stop_after=2)  # killed after two pages of seven changed users
    twins.run(full=False)  # resumes from the cursor; partial: no reconcile
    assert twins.reports[True].reconcile is None
    twins.assert_same()
    twins.run()
    twins.assert_same()


def test_a_source_failing_while_it_totals_fails_the_pass_and_writes_nothing(
    twins: Twins,
) -> None:
    """The source's totals are read in a thread: its error still ends the pass, as the
    adapter's error, before anything is written; the next pass runs as ever."""
    twins.run()
    before = normalized(twins.digest)
    twins.loader.update_user(ids(twins)[2], name="Not Yet")
    twins.loader.execute("ALTER TABLE sessions RENAME TO sessions_away")
    try:
        with closing(twins.provider()) as provider:
            runner = PullRunner(twins.digest, twins.engine(), provider)
            with pytest.raises(ConfigError, match="sessions"):
                runner.run(full=True)
    finally:
        twins.loader.execute("ALTER TABLE sessions_away RENAME TO sessions")
    assert normalized(twins.digest) == before
    twins.run()
    assert twins.mapped[True] == 1
    twins.assert_same()


def test_a_second_unchanged_pass_maps_nobody_and_writes_nothing(twins: Twins) -> None:
    before = normalized(twins.digest)
    stored = stored_digests(twins.digest, "authjs")
    assert len(stored) == 30
    twins.run()
    assert twins.mapped[True] == 0
    assert twins.mapped[False] == 30
    assert normalized(twins.digest) == before  # no audit row, no write stamp moved
    report = twins.reports[True]
    assert report.counts == {"unchanged": 30}
    assert report.sessions == twins.reports[False].sessions
    assert stored_digests(twins.digest, "authjs") == stored


def test_a_new_digest_definition_rereads_everyone_once_and_writes_only_digests(
    twins: Twins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade that changes the digest's definition (``DIGEST_VERSION``, as authjs-1's
    md5 to authjs-2's hashes did): no stored digest matches, so the first pass re-reads
    every user, and the engine, finding each unchanged, writes no audit row and moves no
    write stamp. Only the digests are replaced; the pass after skips everyone again."""
    monkeypatch.setattr("providers.authjs_digest.DIGEST_VERSION", "authjs-previous")
    twins.run()  # digests of the "previous" definition
    before = normalized(twins.digest)
    previous = stored_digests(twins.digest, "authjs")
    monkeypatch.undo()
    twins.run()
    assert twins.mapped[True] == 30  # every user re-read ...
    assert normalized(twins.digest) == before  # ... and nothing but digests written
    assert twins.reports[True].counts == {"unchanged": 30}
    current = stored_digests(twins.digest, "authjs")
    assert current.keys() == previous.keys()
    assert not set(current.items()) & set(previous.items())
    twins.run()
    assert twins.mapped[True] == 0
    twins.assert_same()


def test_the_digest_counts_each_row_however_often_it_repeats(twins: Twins) -> None:
    """A user's digest sums its rows' hashes: rows repeated (a schema without unique keys)
    count each time, where an XOR would cancel pairs: two rows alike, then two other rows
    alike in their place (as many rows, the same XOR) must still differ."""
    a = ids(twins)[0]

    def digest() -> str:
        with closing(twins.provider()) as provider, provider._reading() as conn:
            query = provider._digest_query(None, twins.now)
            return {str(r[0]): str(r[1]) for r in conn.execute(query)}[str(a)]

    found = []
    for pair in ("first", "second"):
        twins.loader.execute("DELETE FROM accounts WHERE provider = %s", ["dup"])
        for _ in range(2):
            twins.loader.link_account(a, FakeAccount(provider="dup", provider_account_id=pair))
        found.append(digest())
    assert found[0] != found[1]


def test_an_unchanged_pass_still_reconciles_a_user_removed_upstream(twins: Twins) -> None:
    twins.run()
    a = ids(twins)[0]
    twins.loader.delete_user(a)
    twins.run()
    assert twins.mapped[True] == 0
    report = twins.reports[True]
    assert report.reconcile is not None
    assert report.reconcile.deleted == 1
    twins.assert_same()


def test_a_pass_whose_every_digest_matches_still_reconciles_a_user_only_the_worker_has(
    twins: Twins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user a webhook created that the source does not hold: that live identity has no
    digest, so the totals differ; every source digest then matches its stored one, yet
    one live user was not seen, and reconcile lists it from the ids copied in."""
    twins.run()
    twins.both(
        UserChange(
            provider="authjs",
            external_id="900001",
            kind=ChangeKind.UPSERT,
            version=twins.now,
            attributes=UserAttributes(name="Webhook Only", stated=frozenset({"name"})),
            raw={"id": "900001", "name": "Webhook Only"},
        )
    )
    staged = staging_spied(monkeypatch)
    twins.run()
    assert twins.mapped[True] == 0
    assert len(staged) == 1
    reconciled = twins.reports[True].reconcile
    assert reconciled == ReconcileReport(live=31, missing=1, deleted=1, refused=False)
    twins.assert_same()


def staging_spied(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many bytes each ``stage_digests`` call copied into the worker (it copies on
    the driver's cursor, which SQLAlchemy's events do not see)."""
    calls: list[int] = []
    real = db.digests.stage_digests

    def stage(conn: Any, rows: Iterable[bytes]) -> None:
        blocks = list(rows)
        calls.append(sum(map(len, blocks)))
        real(conn, blocks)

    monkeypatch.setattr("sync_worker.pull.stage_digests", stage)
    return calls


def digest_reads_spied(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The ``after`` of each pass that read every user's digest from the source."""
    calls: list[object] = []
    real = AuthjsProvider._digest_copy

    def copy(self: AuthjsProvider, conn: Any, after: Any, observed: datetime) -> Any:
        calls.append(after)
        return real(self, conn, after, observed)

    monkeypatch.setattr(AuthjsProvider, "_digest_copy", copy)
    return calls


def test_the_source_total_is_the_sum_of_its_digests(twins: Twins) -> None:
    """Digests add up: the source's total over every row, grouped by no user, is the sum
    of the users' digests, with rows repeated, a user with no session and one whose
    session expired."""
    a, b = ids(twins)[:2]
    for _ in range(2):
        twins.loader.link_account(a, FakeAccount(provider="dup", provider_account_id="same"))
    twins.loader.create_user(name="No Session", email="no.session@example.com")
    twins.loader.create_session(
        b, FakeSession(session_token="expired", expires=twins.now - timedelta(days=1))
    )
    with closing(twins.provider()) as provider, provider._reading() as conn:
        rows = list(conn.execute(provider._digest_query(None, twins.now)))
        summed = provider._digest_sum(conn, twins.now)
    assert summed.users == len(rows) == 31
    assert summed.total == sum(int(r[1]) for r in rows) % MODULUS
    assert all(0 <= int(r[1]) < MODULUS for r in rows)
    live = twins.loader.execute("SELECT count(*) FROM sessions WHERE expires >= %s", [twins.now])
    assert summed.sessions == sum(int(r[2]) for r in rows) == live[0][0]


def test_rows_of_no_user_keep_the_totals_apart(
    twins: Twins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account of a user the source no longer has (the adapter's schema has no foreign
    keys) is in the source's total and in no digest: the totals never agree, and each pass
    compares user by user, finding nothing changed."""
    twins.run()
    twins.loader.link_account(999_999, FakeAccount(provider="github", provider_account_id="gone"))
    read = digest_reads_spied(monkeypatch)
    twins.run()
    assert read == [None]  # the digest pass read every user's digest
    assert twins.mapped[True] == 0
    twins.assert_same()


def test_a_stored_digest_that_is_no_number_totals_without_error(twins: Twins) -> None:
    """A digest of authjs-1 (32 hex digits) still stored: counted, not summed, so the
    totals differ and that user is read again; the pass after, the totals agree."""
    a = str(ids(twins)[3])
    with transaction(twins.digest) as conn:
        conn.execute(
            text(
                "UPDATE sync_source_digests SET digest = md5(digest)"
                " WHERE provider = 'authjs' AND external_id = :a"
            ),
            {"a": a},
        )
    twins.run()
    assert twins.mapped[True] == 1
    twins.assert_same()
    twins.run()
    assert twins.mapped[True] == 0


@pytest.mark.parametrize("totals", ["agree", "differ"])
def test_an_unchanged_pass_counts_for_reconcile_where_it_compared(
    twins: Twins, monkeypatch: pytest.MonkeyPatch, totals: str
) -> None:
    """Reconcile's counts are taken where the pass compared: the seen ids are not
    unnested again from sync_seen (and with nobody missing, not even recorded). Where the
    source's total equals the stored digests', no user's digest is read from the source,
    none copied in, none joined; where the totals differ (made so here), the digests are
    copied in and joined once, and the counts come from that comparison."""
    twins.run()
    if totals == "differ":
        monkeypatch.setattr(_Stored, "unchanged", lambda *_: None)
    staged = staging_spied(monkeypatch)
    read = digest_reads_spied(monkeypatch)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(twins.digest, "before_cursor_execute", record)
    try:
        twins.run()
    finally:
        event.remove(twins.digest, "before_cursor_execute", record)
    # Nobody missing: the seen ids are neither recorded nor unnested.
    assert not [s for s in statements if "INSERT INTO sync_seen" in s]
    assert not [s for s in statements if "jsonb_array_elements_text" in s]
    joins = [s for s in statements if "JOIN sync_source_digests" in s]
    if totals == "agree":
        assert (joins, staged, read) == ([], [], [])
    else:
        assert (len(joins), len(staged), read) == (1, 1, [None])
    assert twins.mapped[True] == 0
    reconciled = twins.reports[True].reconcile
    assert reconciled == ReconcileReport(live=30, missing=0, deleted=0, refused=False)
    twins.assert_same()


@pytest.mark.parametrize("change", [False, True], ids=["unchanged", "one_changed"])
def test_digests_compared_user_by_user_arrive_in_chunks_from_two_halves(
    twins: Twins, monkeypatch: pytest.MonkeyPatch, change: bool
) -> None:
    """Where the totals differ (made so here), the source's digests come in chunks from
    two connections and are copied into the worker as they come, in one COPY: the join
    finds what changed, and nothing where nothing did."""
    monkeypatch.setattr(_Stored, "unchanged", lambda *_: None)  # as if the totals differed
    monkeypatch.setattr("providers.authjs.SPLIT_AT", 2)
    monkeypatch.setattr("providers.authjs_copy.CHUNK_ROWS", 4)  # several chunks a half
    twins.run()
    if change:
        twins.loader.update_user(ids(twins)[3], name="Held Back")
    staged = staging_spied(monkeypatch)
    twins.run()
    assert len(staged) == 1
    assert staged[0] > 0
    assert twins.mapped[True] == (1 if change else 0)
    twins.assert_same()


def test_digests_swapped_between_two_users_still_total_the_same(twins: Twins) -> None:
    """Each row's hash names its user, so a stored digest under another user's id still
    stands for its own user's rows: the totals agree, and rightly, since the source holds
    the rows the worker applied. Once one of the two changes, the users are compared one
    by one and both are read again (one changed, the other found unchanged)."""
    twins.run()
    a, b = (str(i) for i in ids(twins)[:2])
    with transaction(twins.digest) as conn:
        conn.execute(
            text(
                "UPDATE sync_source_digests SET digest = CASE external_id"
                " WHEN :a THEN (SELECT digest FROM sync_source_digests WHERE external_id = :b)"
                " ELSE (SELECT digest FROM sync_source_digests WHERE external_id = :a) END"
                " WHERE provider = 'authjs' AND external_id IN (:a, :b)"
            ),
            {"a": a, "b": b},
        )
    before = normalized(twins.digest)
    twins.run()
    assert twins.mapped[True] == 0
    assert normalized(twins.digest) == before
    twins.loader.update_user(int(a), name="Swapped Then Renamed")
    twins.run()
    assert twins.mapped[True] == 2
    twins.assert_same()
    twins.run()
    assert twins.mapped[True] == 0


def test_digests_that_outlived_their_identity_leave_reconcile_to_the_seen_ids(
    twins: Twins,
) -> None:
    """A digest whose identity went without its trigger (replication role, TRUNCATE) would
    make more users seen than live: the counts come from the seen ids instead."""
    twins.run()
    gone = str(ids(twins)[4])
    with transaction(twins.digest) as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))  # no triggers
        conn.execute(
            text("DELETE FROM user_identities WHERE provider = 'authjs' AND external_id = :e"),
            {"e": gone},
        )
    assert gone in stored_digests(twins.digest, "authjs")
    with closing(twins.provider()) as provider:
        report = PullRunner(twins.digest, twins.engine(), provider).run(full=True)
    assert report.reconcile == ReconcileReport(live=29, missing=0, deleted=0, refused=False)


@pytest.mark.parametrize("changed", [0, 3])
def test_the_deletion_guard_refuses_alike(twins: Twins, changed: int) -> None:
    """The guard refuses on the counts taken with the comparison as on those of the
    per-row pass, whether or not the pass then applies changed users."""
    for user in ids(twins)[:changed]:
        twins.loader.update_user(user, name=f"Guarded {user}")
    for user in ids(twins)[-7:]:  # 7 of 30: more than max_delete_fraction 0.2
        twins.loader.delete_user(user)
    twins.tick()
    refused = []
    for digests, worker in ((True, twins.digest), (False, twins.plain)):
        with closing(twins.provider()) as provider:
            runner = PullRunner(
                worker, twins.engine(), provider, max_delete_fraction=0.2, digests=digests
            )
            with pytest.raises(ReconcileRefused) as raised:
                runner.run(full=True)
        refused.append(raised.value.report.reconcile)
    assert refused[0] == refused[1] == ReconcileReport(live=30, missing=7, deleted=0, refused=True)
    assert normalized(twins.digest) == normalized(twins.plain)


def test_a_poison_row_is_reported_on_every_pass(twins: Twins) -> None:
    poison_row(twins)
    for _ in range(2):
        twins.run()
        assert twins.reports[True].counts["failed"] == 1
        assert twins.mapped[True] == 1  # the poison user is read again; nobody else
        twins.assert_same()


def test_any_other_write_clears_the_digest(twins: Twins) -> None:
    """The triggers, one write at a time, each through a path other than the pass."""
    twins.run()
    key = str(ids(twins)[13])

    def digest() -> str | None:
        return stored_digests(twins.digest, "authjs").get(key)

    def restore(value: str) -> None:
        with transaction(twins.digest) as conn:
            conn.execute(
                text(
                    "INSERT INTO sync_source_digests (provider, external_id, digest) "
                    "VALUES ('authjs', :e, :d) ON CONFLICT (provider, external_id) "
                    "DO UPDATE SET digest = excluded.digest"
                ),
                {"e": key, "d": value},
            )
        assert digest() == value

    owner = "(SELECT user_id FROM user_identities WHERE provider = 'authjs' AND external_id = :e)"
    writes = [
        "UPDATE user_identities SET last_synced_at = now() WHERE provider = 'authjs' "
        "AND external_id = :e",
        f"INSERT INTO user_sessions (id, user_id, provider, external_session_id, created_at) "
        f"VALUES ('{uuid.uuid4()}', {owner}, 'authjs', 'extra', now())",
        f"UPDATE user_sessions SET last_seen_at = now() WHERE user_id = {owner}",
        f"DELETE FROM user_sessions WHERE user_id = {owner}",
        f"DELETE FROM users WHERE id = {owner}",  # its identities go by cascade
    ]
    assert digest() is not None
    for n, statement in enumerate(writes):
        restore(f"held-{n}")
        with transaction(twins.digest) as conn:
            conn.execute(text(statement), {"e": key})
        if statement.startswith("INSERT"):
            assert digest() == f"held-{n}"  # a new session row changes no stored session
        else:
            assert digest() is None, statement


@pytest.mark.parametrize("flavour", ["pg", "drizzle", "prisma"])
def test_the_digest_pass_on_either_worker_database(
    engine: Engine, make_pg_database: Callable[[], str], flavour: str
) -> None:
    """The worker side is portable (SQLite stores digests row by row), with integer and
    text ids (merged with the stored digests in numeric and in byte order), and sessions
    expiring in ``timestamptz`` or ``timestamp`` (Drizzle, Prisma): a session further off
    than maxAge has its user read again on every pass, as its login time moves."""
    source = make_pg_database()
    loader = make_loader(flavour, source)
    loader.populate(12, now=START)
    settings = AuthjsSettings.model_validate(
        {"database_url": sqlalchemy_url(source), "schema": flavour}
    )

    def run() -> tuple[PullReport, int]:
        with closing(Recording(AuthjsProvider(settings, batch_size=5))) as provider:
            report = PullRunner(engine, SyncEngine(PlanSettings()), provider).run(full=True)
            return report, provider.mapped

    with loader:
        first, mapped = run()
        assert (first.counts["created"], mapped) == (12, 12)
        assert len(stored_digests(engine, "authjs")) == 12
        again, mapped = run()
        assert (dict(again.counts), mapped) == ({"unchanged": 12}, 0)
        (user_id,) = loader.execute(f'SELECT min(id) FROM "{loader.user_table}"')[0]
        far = FakeSession(session_token="far-off", expires=datetime.now(UTC) + timedelta(days=45))
        loader.create_session(user_id, far)
        for _ in range(2):
            _, mapped = run()
            assert mapped == 1


@pytest.mark.parametrize("split", [False, True])
def test_text_ids_that_copy_must_escape(
    engine: Engine,
    make_pg_database: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    split: bool,
) -> None:
    """Text ids holding the characters COPY's text format escapes (backslash, tab,
    newline, carriage return) reach the worker's comparison as they are: a second pass
    finds them unchanged, and a change to one of them is found."""
    if split:
        monkeypatch.setattr("providers.authjs.SPLIT_AT", 2)  # text ids are never split
        monkeypatch.setattr("providers.authjs_copy.CHUNK_ROWS", 2)  # chunks by id hash
    source = make_pg_database()
    odd = ["back\\slash", "tab\there", "new\nline", "carriage\rreturn", "\\N"]
    with make_loader("drizzle", source) as loader:
        loader.populate(3, now=START)
        for n, user_id in enumerate(odd):
            loader.execute(
                'INSERT INTO "user" (id, name, email) VALUES (%s, %s, %s)',
                [user_id, f"Odd {n}", f"odd{n}@example.com"],
            )
            loader.execute(
                'INSERT INTO "account" ("userId", type, provider, "providerAccountId")'
                " VALUES (%s, 'oauth', 'github', %s)",
                [user_id, f"gh-odd-{n}"],
            )
    settings = AuthjsSettings.model_validate(
        {"database_url": sqlalchemy_url(source), "schema": "drizzle"}
    )

    def run() -> tuple[dict[str, int], int]:
        with closing(Recording(AuthjsProvider(settings, batch_size=5))) as provider:
            report = PullRunner(engine, SyncEngine(PlanSettings()), provider).run(full=True)
            return dict(report.counts), provider.mapped

    assert run() == ({"created": 8}, 8)
    assert set(odd) <= set(stored_digests(engine, "authjs"))
    assert run() == ({"unchanged": 8}, 0)
    with make_loader("drizzle", source) as loader:
        loader.execute('UPDATE "user" SET name = %s WHERE id = %s', ["Renamed", odd[1]])
    assert run() == ({"unchanged": 7, "updated": 1}, 1)


def test_a_sqlite_source_keeps_the_per_row_pass(tmp_path: Any) -> None:
    """The source side is not portable: a SQLite Auth.js database keeps the per-row pass."""
    app = f"sqlite:///{tmp_path / 'app.db'}"
    with make_loader("prisma", app) as loader:
        loader.populate(3)
    settings = AuthjsSettings.model_validate({"database_url": app, "schema": "prisma"})
    with closing(AuthjsProvider(settings)) as provider:
        assert provider.iter_digested(None, full=True, known=Nothing()) is None


class Nothing:
    """No digest stored."""

    def held(self) -> bool:
        return False

    def in_order(self, *, numeric: bool) -> Iterator[tuple[str, str]]:
        return iter(())

    def of(self, external_ids: Sequence[str]) -> Mapping[str, str]:
        return {}

    def unchanged(self, summed: Callable[[], DigestSum]) -> Compared | None:
        return None

    def compare(self, digests: Iterable[bytes], *, limit: int) -> Compared | None:
        return None


def test_more_changes_than_held_read_every_user_in_step(
    twins: Twins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond ``CHANGED_HELD`` changed users the pass reads every row in step with the
    digests (memory stays flat): the same outcome, still skipping the unchanged."""
    monkeypatch.setattr("providers.authjs.CHANGED_HELD", 1)
    twins.run()
    for scenario in (user_fields_changed, sessions_changed, updated_by_webhook, poison_row):
        scenario(twins)
        twins.run()
        twins.assert_same()
        assert 0 < twins.mapped[True] < twins.mapped[False]
    twins.run()
    twins.assert_same()
    assert twins.mapped[True] == 1  # the poison user alone


def test_a_source_before_postgresql_14_gets_the_per_row_pass(twins: Twins) -> None:
    """``hash_record_extended`` came with PostgreSQL 14: an older source offers neither the
    digest pass nor the set pass, and the runner reads every user per row instead."""
    with closing(twins.provider()) as provider:
        with provider._engine.connect():
            pass  # the dialect learns the server's version
        provider._engine.dialect.server_version_info = (13, 16)
        assert (
            provider.iter_digested(None, full=True, known=_Stored(twins.digest, "authjs", None))
            is None
        )
        assert provider.set_pass(None, full=True) is None
        before = normalized(twins.digest)
        report = PullRunner(twins.digest, twins.engine(), provider).run(full=True)
    assert report.counts == {"unchanged": 30}
    assert normalized(twins.digest) == before
