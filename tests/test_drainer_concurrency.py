"""The drainer under concurrency: several drainer processes on one PostgreSQL inbox, leases
that run out (PostgreSQL), versionless events of the same second and a sign-in before its
user (both dialects).

Deliveries are real (built and signed by ``sync_worker.simulate`` or re-signed after an
edit, verified by the real receivers) and stored with ``db.inbox.store`` at chosen
``received_at`` times, so that two databases can be given exactly the same inbox.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text

from db import inbox
from db.connect import make_engine
from db.migrate import upgrade
from db.tables import profiles, sync_inbox, user_identities, user_sessions, users
from db.transaction import transaction
from providers import registry
from providers.webhook import WebhookReceiver, Work, WorkDecoder
from sync_worker import simulate
from sync_worker.changes import UserChange
from sync_worker.daemon.drainer import BACKLOG_FACTOR, Drainer
from tests import drain_worker
from tests.conftest import SCHEMA, sqlalchemy_url
from tests.daemon_harness import SECRETS, settings_with_secrets
from tests.drain_worker import RecordingEngine, drain_all, make_drainer
from tests.factories import audit, rows, upsert
from tests.webhook_cases import standard_headers, svix_headers

WORKERS = 3
BATCH = 7  # small and odd: a user's events fall into different batches, and workers


# -- deliveries ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """One verified delivery and when the inbox is to have received it."""

    provider: str
    delivery: inbox.Delivery
    received_at: datetime


def deliver(
    provider: str, event: str, email: str, at: datetime, *, name: str | None = None
) -> Stored:
    """A real delivery of ``event`` made at ``at``, its user renamed to ``name``, signed now
    (the signature libraries check their own clock) and verified by the receiver."""
    _, body = simulate.build(provider, event, email=email, now=at, secret=SECRETS[provider])
    if name is not None:
        document = json.loads(body)
        user = document["data"] if provider == "stack" else document["data"]["user"]
        user["display_name" if provider == "stack" else "name"] = name
        body = json.dumps(document).encode()
    now = datetime.now(UTC)
    sign = svix_headers if provider == "stack" else standard_headers
    headers = sign(SECRETS[provider], f"msg_{uuid.uuid4().hex}", now, body)
    (item,) = _receivers()[provider].verify(headers, body, now=now)
    status: inbox.ArrivalStatus = "ignored" if item.ignored else "pending"
    delivery = inbox.Delivery(item.event_id, item.payload, item.event_type, status)
    return Stored(provider, delivery, at)


@functools.cache
def _receivers() -> dict[str, WebhookReceiver]:
    # Built on first use: drainer processes never verify, and svix takes seconds to import.
    return registry.receivers(settings_with_secrets(), local={})


def store(db: Engine, stored: Sequence[Stored]) -> None:
    with transaction(db) as conn:
        for s in stored:
            inbox.store(conn, s.provider, [s.delivery], now=s.received_at)


def workload(start: datetime, users: int) -> tuple[list[Stored], list[Stored]]:
    """Two rounds of deliveries, interleaved across users, each 1 ms after the last.

    Round one: per user of each provider, a creation then three renames. Round two, once
    every user exists: a sign-in per Auth.js user and a fourth rename per Stack user."""
    clock = (start + timedelta(milliseconds=n) for n in range(10**6))
    first = [
        _step(provider, n, step, next(clock))
        for step in range(4)
        for n in range(users)
        for provider in ("stack", "authjs")
    ]
    second: list[Stored] = []
    for n in range(users):
        second.append(deliver("authjs", "signIn", _email("authjs", n), next(clock)))
        second.append(_step("stack", n, 4, next(clock)))
    return first, second


def _step(provider: str, n: int, step: int, at: datetime) -> Stored:
    created = "user.created" if provider == "stack" else "createUser"
    updated = "user.updated" if provider == "stack" else "updateUser"
    event = created if step == 0 else updated
    return deliver(provider, event, _email(provider, n), at, name=f"{provider} {n} v{step}")


def _email(provider: str, n: int) -> str:
    return f"{provider}-{n}@example.org"


# -- drainers ----------------------------------------------------------------------------------


def drainer(
    db: Engine,
    *,
    batch: int = BATCH,
    lease: timedelta = timedelta(minutes=5),
    clock: Callable[[], datetime] | None = None,
    decoders: Mapping[str, WorkDecoder] | None = None,
) -> tuple[Drainer, RecordingEngine]:
    return make_drainer(db, batch=batch, lease=lease, clock=clock, decoders_=decoders)


# -- what a database ends with ----------------------------------------------------------------


def state(db: Engine) -> dict[str, Any]:
    """Everything the deliveries decide, keyed by identity, without generated ids or the
    times of applying."""
    with db.connect() as conn:
        people = conn.execute(
            select(
                user_identities.c.provider, user_identities.c.external_id,
                user_identities.c.upstream_updated_at, user_identities.c.content_hash,
                user_identities.c.deleted_at, users.c.email, users.c.email_verified,
                users.c.name, users.c.avatar_url, users.c.last_login_at, users.c.deleted_at,
                profiles.c.display_name, profiles.c.timezone, profiles.c.settings,
            )
            .join(users, users.c.id == user_identities.c.user_id)
            .join(profiles, profiles.c.user_id == users.c.id)
            .order_by(user_identities.c.provider, user_identities.c.external_id)
        ).all()  # fmt: skip
        sessions = conn.execute(
            select(
                user_sessions.c.provider, user_sessions.c.external_session_id,
                user_identities.c.external_id, user_sessions.c.created_at,
                user_sessions.c.last_seen_at, user_sessions.c.revoked_at,
            )
            .join(user_identities, user_identities.c.user_id == user_sessions.c.user_id)
            .order_by(user_sessions.c.external_session_id)
        ).all()  # fmt: skip
        counts = {t.name: _count(conn, t.name) for t in (users, profiles, user_sessions)}
    return {"people": [tuple(p) for p in people], "sessions": [tuple(s) for s in sessions],
            "counts": counts}  # fmt: skip


def _count(conn: Connection, table: str) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {SCHEMA}.{table}")).scalar_one())


def inbox_rows(db: Engine) -> list[dict[str, Any]]:
    with db.connect() as conn:
        found = conn.execute(select(sync_inbox).order_by(sync_inbox.c.id)).mappings()
        return [dict(r) for r in found]


# -- 1. drainers in separate processes never apply an event twice ------------------------------


@pytest.fixture
def fresh_pg(make_pg_database: Callable[[], str]) -> Iterator[Callable[[], tuple[str, Engine]]]:
    """Migrated, empty PostgreSQL databases of their own (URL and engine), disposed after."""
    made: list[Engine] = []

    def make() -> tuple[str, Engine]:
        url = sqlalchemy_url(make_pg_database())
        db = make_engine(url, schema=SCHEMA)
        upgrade(db, SCHEMA)
        made.append(db)
        return url, db

    yield make
    for db in made:
        db.dispose()


@pytest.mark.postgres
def test_drainer_processes_on_one_inbox_apply_each_event_once(
    fresh_pg: Callable[[], tuple[str, Engine]],
) -> None:
    first, second = workload(datetime.now(UTC) - timedelta(hours=1), users=30)
    assert len(first) + len(second) == 300
    url, db = fresh_pg()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS + 1), ctx.Queue()
    workers = [
        ctx.Process(target=drain_worker.run, args=(url, BATCH, 2, barrier, results))
        for _ in range(WORKERS)
    ]
    for w in workers:
        w.start()
    try:
        try:
            for deliveries in (first, second):  # round two needs every user of round one
                store(db, deliveries)
                barrier.wait(timeout=120)
                barrier.wait(timeout=120)
        except threading.BrokenBarrierError:  # a drainer failed and aborted: say why
            errors = [results.get(timeout=30)[-1] for _ in range(results.qsize())]
            pytest.fail(f"a drainer process failed: {errors}")
        reports = [results.get(timeout=120) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    assert [error for *_, error in reports] == [None] * WORKERS

    everything = [s.delivery.event_id for s in (*first, *second)]
    applied = Counter(e for *_, events, _ in reports for e in events)
    assert applied == Counter(everything)  # every event to the engine exactly once
    busy = [claimed for _, claimed, *_ in reports if claimed]
    assert len(busy) >= 2  # the drainers did share the inbox
    assert sum(busy) == len(everything)  # and no row was claimed twice
    finished = inbox_rows(db)
    assert {(r["status"], r["attempts"], r["claimed_by"]) for r in finished} == {("done", 1, None)}

    trail = audit(db)
    assert max(Counter(a["event_id"] for a in trail).values()) == 1  # never two for one event
    actions = Counter(a["action"] for a in trail)
    assert actions["created"] == 60
    assert actions["login"] == 30
    assert set(actions) <= {"created", "updated", "stale_skipped", "login"}
    assert len(rows(db, "users")) == 60  # no duplicate users

    # The same inbox drained by one drainer in a fresh database ends the same.
    _, alone = fresh_pg()
    single, _ = drainer(alone, batch=100)
    for deliveries in (first, second):
        store(alone, deliveries)
        drain_all(single)
    assert state(db) == state(alone)
    names = {p[7] for p in state(db)["people"]}
    assert names == {f"stack {n} v4" for n in range(30)} | {f"authjs {n} v3" for n in range(30)}


# -- 2. a lease that runs out is taken over, and the first worker's late apply is not applied ---


class Paused:
    """A decoder that stops in ``to_work`` (between claim and apply, no transaction open,
    as a slow IdP re-read would) until released."""

    def __init__(self, inner: WorkDecoder) -> None:
        self.inner, self.provider = inner, inner.provider
        self.entered, self.release = threading.Event(), threading.Event()

    def to_work(
        self, item_payload: Mapping[str, Any], *, event_id: str, received_at: datetime
    ) -> Work:
        self.entered.set()
        assert self.release.wait(timeout=60)
        return self.inner.to_work(item_payload, event_id=event_id, received_at=received_at)


def _in_thread(run: Callable[[], int]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def target() -> None:
        try:
            out.append(run())
        except BaseException as exc:  # handed to the test, which re-raises it
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _finished(thread: threading.Thread, out: list[object]) -> object:
    thread.join(timeout=60)
    assert not thread.is_alive()
    (result,) = out
    if isinstance(result, BaseException):
        raise result
    return result


def _lock_waiters(db: Engine) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


LEASE = timedelta(seconds=1)
LATER = timedelta(seconds=5)  # B's clock: A's lease ran out


def _five_users(db: Engine) -> list[str]:
    start = datetime.now(UTC) - timedelta(minutes=1)
    stored = [
        deliver("stack", "user.created", f"lease-{n}@example.org", start + timedelta(seconds=n))
        for n in range(5)
    ]
    store(db, stored)
    return [s.delivery.event_id for s in stored]


@pytest.mark.postgres
@pytest.mark.parametrize("race", ["B applies first", "A tries first", "B's claim in flight"])
def test_a_lease_taken_over_is_applied_by_the_new_holder_only(pg_engine: Engine, race: str) -> None:
    events = _five_users(pg_engine)
    stack = drain_worker.decoders()["stack"]
    a_decoder, b_decoder = Paused(stack), Paused(stack)
    a, a_engine = drainer(pg_engine, lease=LEASE, decoders={"stack": a_decoder})
    b, b_engine = drainer(pg_engine, lease=LEASE, decoders={"stack": b_decoder},
                          clock=lambda: datetime.now(UTC) + LATER)  # fmt: skip

    a_thread, a_out = _in_thread(a.drain_once)
    assert a_decoder.entered.wait(timeout=30)  # A claimed every row, and stalls
    claims = 2
    if race == "B applies first":
        b_decoder.release.set()
        assert b.drain_once() == 5  # A's lease ran out: B claims the same rows, applies
        a_decoder.release.set()
        assert _finished(a_thread, a_out) == 5  # A's late apply finds them B's
    elif race == "A tries first":
        b_thread, b_out = _in_thread(b.drain_once)
        assert b_decoder.entered.wait(timeout=30)  # B claimed them too, and stalls
        a_decoder.release.set()
        assert _finished(a_thread, a_out) == 5  # A's apply finds them B's
        assert a_engine.applied == []
        b_decoder.release.set()
        assert _finished(b_thread, b_out) == 5
    else:  # B's claim is not committed yet when A's hold runs: hold waits, then re-reads
        with transaction(pg_engine) as conn:
            claimed = inbox.claim(conn, limit=BATCH, now=datetime.now(UTC) + LATER,
                                  lease=LEASE, worker=b.worker)  # fmt: skip
            assert len(claimed) == 5
            a_decoder.release.set()
            _wait_for(lambda: _lock_waiters(pg_engine) >= 1, "A's hold to wait for B's claim")
        assert _finished(a_thread, a_out) == 5
        b_decoder.release.set()
        b.clock = lambda: datetime.now(UTC) + 2 * LATER  # B's own short lease ran out too
        assert b.drain_once() == 5
        claims = 3

    assert a_engine.applied == []
    assert sorted(b_engine.applied) == sorted(events)
    finished = [(r["status"], r["attempts"], r["claimed_by"]) for r in inbox_rows(pg_engine)]
    assert finished == [("done", claims, None)] * 5
    assert sorted((a["action"], a["event_id"]) for a in audit(pg_engine)) == sorted(
        ("created", e) for e in events
    )
    assert len(rows(pg_engine, "users")) == 5


@pytest.mark.postgres
def test_a_lease_that_ran_out_unclaimed_is_still_applied_by_its_holder(
    pg_engine: Engine,
) -> None:
    """The control of the takeover test: with no other claimant, the late apply goes on."""
    events = _five_users(pg_engine)
    paused = Paused(drain_worker.decoders()["stack"])
    a, a_engine = drainer(pg_engine, lease=LEASE, decoders={"stack": paused})
    a_thread, a_out = _in_thread(a.drain_once)
    assert paused.entered.wait(timeout=30)
    other, other_engine = drainer(pg_engine, clock=lambda: datetime.now(UTC) - LATER)
    assert other.drain_once() == 0  # by its clock A's lease is live: nothing to claim
    paused.release.set()
    assert _finished(a_thread, a_out) == 5
    assert (sorted(a_engine.applied), other_engine.applied) == (sorted(events), [])
    assert {r["status"] for r in inbox_rows(pg_engine)} == {"done"}
    assert len(audit(pg_engine)) == 5


# -- 3. versionless events of the same second apply in the order received ---------------------

SAME_SECOND = [timedelta(0), timedelta(microseconds=1), timedelta(milliseconds=300)]
SAME_SECOND_IDS = ["same instant", "1us apart", "300ms apart"]


def _two_updates(db: Engine, gap: timedelta) -> tuple[Stored, Stored]:
    """Two renames of one Stack user, received ``gap`` apart within one second."""
    second = datetime.now(UTC).replace(microsecond=100_000) - timedelta(minutes=1)
    email = "order@example.org"
    earlier = deliver("stack", "user.updated", email, second, name="First")
    later = deliver("stack", "user.updated", email, second + gap, name="Second")
    store(db, [earlier, later])
    return earlier, later


@pytest.mark.parametrize("gap", SAME_SECOND, ids=SAME_SECOND_IDS)
@pytest.mark.parametrize("batch", [2, 1], ids=["one batch", "two batches"])
def test_stack_updates_of_one_second_apply_in_the_order_received(
    engine: Engine, gap: timedelta, batch: int
) -> None:
    earlier, later = _two_updates(engine, gap)
    d, recorded = drainer(engine, batch=batch)

    assert drain_all(d) == 2
    (user,) = rows(engine, "users")
    assert user["name"] == "Second"
    (identity,) = rows(engine, "user_identities")
    assert identity["upstream_updated_at"] == later.received_at  # sub-second kept
    assert recorded.applied == [earlier.delivery.event_id, later.delivery.event_id]
    assert {r["status"] for r in inbox_rows(engine)} == {"done"}


@pytest.mark.parametrize(
    "gap",
    [
        pytest.param(
            timedelta(0),
            marks=pytest.mark.xfail(
                strict=True,
                reason="equal received_at: equal versions, so the last applied wins, and "
                "two drainers may apply them in either order (no tie-break on the inbox id)",
            ),
        ),
        *SAME_SECOND[1:],
    ],
    ids=SAME_SECOND_IDS,
)
def test_stack_updates_of_one_second_applied_out_of_order_keep_the_later(
    engine: Engine, gap: timedelta
) -> None:
    """Two drainers: A claims the earlier update and stalls, B claims the later one and
    applies it first; A's late apply of the earlier one must not win."""
    earlier, later = _two_updates(engine, gap)
    paused = Paused(drain_worker.decoders()["stack"])
    a, _ = drainer(engine, batch=1, decoders={"stack": paused})
    b, _ = drainer(engine, batch=1)
    a_thread, a_out = _in_thread(a.drain_once)
    assert paused.entered.wait(timeout=30)  # A holds the earlier one
    assert b.drain_once() == 1  # B applies the later one
    paused.release.set()
    assert _finished(a_thread, a_out) == 1

    (user,) = rows(engine, "users")
    assert user["name"] == "Second"
    actions = {a["event_id"]: a["action"] for a in audit(engine)}
    assert actions == {
        later.delivery.event_id: "created",
        earlier.delivery.event_id: "stale_skipped",
    }


@pytest.mark.parametrize("batch", [10, 1], ids=["batch 10", "batch 1"])
def test_a_rename_then_a_delete_end_alike_in_one_claim_or_several(
    engine: Engine, batch: int
) -> None:
    """The engine keeps one upsert or delete per identity in a call; the drainer applies a
    claim in turns (``in_turns``), so a claim holding a user's rename and deletion leaves it
    renamed and deleted, as two claims do (the kill -9 test's clean run compares them)."""
    start = datetime.now(UTC) - timedelta(minutes=1)
    email = "turns@example.org"
    stored = [
        deliver("stack", "user.created", email, start, name="Before"),
        deliver("stack", "user.updated", email, start + timedelta(milliseconds=1), name="After"),
        deliver("stack", "user.deleted", email, start + timedelta(milliseconds=2)),
        deliver("stack", "user.created", "other@example.org", start + timedelta(milliseconds=3)),
    ]
    store(engine, stored)
    d, recorded = drainer(engine, batch=batch)

    assert drain_all(d) == 4
    assert sorted(recorded.applied) == sorted(s.delivery.event_id for s in stored)
    by_email = {u["email"]: u for u in rows(engine, "users")}
    assert by_email[email]["deleted_at"] is not None
    (profile,) = rows(engine, "profiles", user_id=by_email[email]["id"])
    assert profile["display_name"] == "After"
    actions = {a["event_id"]: a["action"] for a in audit(engine)}
    assert actions == {
        stored[0].delivery.event_id: "created",
        stored[1].delivery.event_id: "updated",
        stored[2].delivery.event_id: "deleted",
        stored[3].delivery.event_id: "created",
    }


def test_turns_hold_the_kth_change_of_each_identity_in_order() -> None:
    from sync_worker.daemon.drainer import in_turns

    def change(external_id: str, name: str) -> UserChange:
        return upsert(external_id, provider="stack", name=name)

    a1, b1, a2, c1, a3, b2 = (
        change("a", "1"), change("b", "1"), change("a", "2"),
        change("c", "1"), change("a", "3"), change("b", "2"),
    )  # fmt: skip
    assert in_turns([a1, b1, a2, c1, a3, b2]) == [[a1, b1, c1], [a2, b2], [a3]]
    assert in_turns([a1, b1, c1]) == [[a1, b1, c1]]
    assert in_turns([]) == []


# -- 4. a sign-in that arrives before its user's creation ------------------------------------


def test_a_sign_in_before_its_user_is_retried_until_the_user_exists(engine: Engine) -> None:
    start = datetime.now(UTC) - timedelta(minutes=1)
    email = "early@example.org"
    sign_in = deliver("authjs", "signIn", email, start)
    created = deliver("authjs", "createUser", email, start + timedelta(milliseconds=1))
    store(engine, [sign_in, created])
    now = [datetime.now(UTC)]
    d, _ = drainer(engine, batch=1, clock=lambda: now[0])

    assert d.drain_once() == 1  # the sign-in, alone: no such user yet
    early = inbox_rows(engine)[0]
    assert (early["status"], early["attempts"]) == ("failed", 1)  # retried later, not dead
    assert early["next_attempt_at"] > now[0]
    assert d.drain_once() == 1  # the creation
    assert d.drain_once() == 0  # the sign-in waits for its backoff
    now[0] = early["next_attempt_at"] + timedelta(seconds=1)
    assert d.drain_once() == 1

    (row, _) = inbox_rows(engine)
    assert (row["status"], row["attempts"]) == ("done", 2)
    (user,) = rows(engine, "users")
    assert user["last_login_at"] == start
    assert rows(engine, "user_sessions") == []  # a sign-in names no session
    trail = [(a["action"], a["event_id"]) for a in audit(engine)]
    assert trail == [
        ("failed", sign_in.delivery.event_id),
        ("created", created.delivery.event_id),
        ("login", sign_in.delivery.event_id),
    ]


# -- 5. claims sized to the backlog ----------------------------------------------------------


def test_a_backlog_is_claimed_in_larger_batches_and_a_trickle_in_small_ones(
    engine: Engine,
) -> None:
    """A full claim means more are waiting: the next claims take BACKLOG_FACTOR x the batch
    size, until one comes back short; then the configured size again."""
    start = datetime.now(UTC) - timedelta(minutes=1)
    clock = (start + timedelta(milliseconds=n) for n in range(10**6))
    backlog = [_step("stack", n, 0, next(clock)) for n in range(2 + 5 * 2 + 3)]
    store(engine, backlog)
    d, applied = drainer(engine, batch=2)
    assert d.settings.backlog_batch == 2 * BACKLOG_FACTOR == 10
    assert [d.drain_once() for _ in range(4)] == [2, 10, 3, 0]
    trickle = [_step("stack", n, 0, next(clock)) for n in range(100, 103)]
    store(engine, trickle)
    assert [d.drain_once() for _ in range(3)] == [2, 1, 0]  # the short claim reset the size
    assert Counter(applied.applied) == Counter(s.delivery.event_id for s in backlog + trickle)
    assert {(r["status"], r["attempts"]) for r in inbox_rows(engine)} == {("done", 1)}


def test_a_backlog_is_claimed_in_batches_that_fit_the_lease(engine: Engine) -> None:
    """Claims grow only while a claim of the larger size would take a small share of the
    lease at the pace of the last one: here no batch is quick enough for a 10 ms lease."""
    start = datetime.now(UTC) - timedelta(minutes=1)
    clock = (start + timedelta(milliseconds=n) for n in range(10**6))
    store(engine, [_step("stack", n, 0, next(clock)) for n in range(7)])
    d, applied = drainer(engine, batch=2, lease=timedelta(milliseconds=10))
    assert [d.drain_once() for _ in range(5)] == [2, 2, 2, 1, 0]
    assert len(applied.applied) == 7
    assert {(r["status"], r["attempts"]) for r in inbox_rows(engine)} == {("done", 1)}
