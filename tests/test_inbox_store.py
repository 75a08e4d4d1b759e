"""db.inbox: the webhook inbox store, on both dialects (PostgreSQL-only where it says so)."""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg import sql
from sqlalchemy import Connection, Engine, event, func, select, update

from db import inbox
from db.inbox import Backoff, Delivery, InboxRow
from db.migrate import alembic_config, upgrade
from db.tables import sync_inbox
from db.upsert import insert_rows
from tests.conftest import SCHEMA

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
S = timedelta(seconds=1)
NO_JITTER = Backoff(base=timedelta(seconds=10), cap=timedelta(minutes=10), jitter=0.0)


def deliveries(count: int, prefix: str = "evt") -> list[Delivery]:
    return [
        Delivery(f"{prefix}-{i}", {"n": i, "text": "zoë"}, event_type="user.updated")
        for i in range(count)
    ]


def put(
    engine: Engine, items: list[Delivery], provider: str = "stack", now: datetime = NOW
) -> None:
    with engine.begin() as conn:
        inbox.store(conn, provider, items, now=now)


def claim(engine: Engine, worker: str = "w1", limit: int = 100, now: datetime = NOW) -> list[int]:
    with engine.begin() as conn:
        return [r.id for r in inbox.claim(conn, limit=limit, now=now, lease=LEASE, worker=worker)]


def rows(engine: Engine) -> dict[int, dict[str, Any]]:
    with engine.connect() as conn:
        found = conn.execute(select(sync_inbox).order_by(sync_inbox.c.id)).mappings()
        return {r["id"]: dict(r) for r in found}


def set_rows(engine: Engine, ids: list[int], **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(sync_inbox).where(sync_inbox.c.id.in_(ids)).values(**values))


def fail(engine: Engine, ids: list[int], now: datetime, max_attempts: int = 3) -> inbox.FailResult:
    with engine.begin() as conn:
        return inbox.fail(
            conn,
            dict.fromkeys(ids, "upstream 503"),
            worker="w1",
            now=now,
            max_attempts=max_attempts,
            backoff=NO_JITTER,
        )


@contextmanager
def statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The SQL sent to the driver while the block runs, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


# -- store ---------------------------------------------------------------------------------


def test_store_inserts_and_a_redelivery_changes_nothing(engine: Engine) -> None:
    with engine.begin() as conn:
        first = inbox.store(conn, "stack", deliveries(2), now=NOW)
    assert first == inbox.StoreResult(inserted=2, duplicates=0)
    claim(engine, limit=1)  # attempts and lease on row 1 must survive the redelivery
    before = rows(engine)
    assert before[1]["attempts"] == 1
    assert before[1]["payload"] == {"n": 0, "text": "zoë"}
    assert before[1]["event_type"] == "user.updated"
    assert before[1]["received_at"] == NOW

    again = [Delivery("evt-0", {"changed": True}, event_type="user.deleted"), *deliveries(3)[1:]]
    with engine.begin() as conn:
        second = inbox.store(conn, "stack", again, now=NOW + timedelta(hours=1))
    assert second == inbox.StoreResult(inserted=1, duplicates=2)
    after = rows(engine)
    assert {i: after[i] for i in before} == before
    # (PostgreSQL spends a sequence value on each conflicting row: ids may have gaps.)
    assert [r["event_id"] for r in after.values()] == ["evt-0", "evt-1", "evt-2"]


def test_same_event_id_from_another_provider_is_another_delivery(engine: Engine) -> None:
    put(engine, deliveries(1), provider="stack")
    with engine.begin() as conn:
        result = inbox.store(conn, "authjs", deliveries(1), now=NOW)
        twice = inbox.store(conn, "auth0", deliveries(1) * 2, now=NOW)
    assert result.inserted == 1
    assert twice == inbox.StoreResult(inserted=1, duplicates=1)  # listed twice in one call


def test_ignored_delivery_arrives_finished(engine: Engine) -> None:
    with engine.begin() as conn:
        inbox.store(conn, "auth0", [Delivery("log-1", {"type": "fp"}, "fp", "ignored")], now=NOW)
    (row,) = rows(engine).values()
    assert (row["status"], row["processed_at"]) == ("ignored", NOW)
    assert claim(engine) == []


def test_store_of_a_thousand_is_one_statement_and_all_or_nothing(engine: Engine) -> None:
    items = deliveries(1000)

    def store_then_fail() -> None:
        with engine.begin() as conn:
            with statements(engine) as sent:
                assert inbox.store(conn, "auth0", items, now=NOW).inserted == 1000
            assert len([s for s, _ in sent if s.lstrip().upper().startswith("INSERT")]) == 1
            raise RuntimeError("the apply failed after the store")

    with pytest.raises(RuntimeError, match="apply failed"):
        store_then_fail()
    assert rows(engine) == {}

    with engine.begin() as conn:
        assert inbox.store(conn, "auth0", items, now=NOW).inserted == 1000
    assert len(rows(engine)) == 1000


@pytest.mark.parametrize(
    ("provider", "item"),
    [
        ("", Delivery("e", {})),
        ("p" * 65, Delivery("e", {})),
        ("stack", Delivery("", {})),
        ("stack", Delivery("e" * 256, {})),
        ("stack", Delivery("e", {}, event_type="t" * 129)),
        ("stack", Delivery("e", {}, status="done")),  # type: ignore[arg-type]
    ],
)
def test_store_refuses_values_that_do_not_fit_before_any_sql(
    engine: Engine, provider: str, item: Delivery
) -> None:
    with (
        engine.begin() as conn,
        statements(engine) as sent,
        pytest.raises(ValueError, match=r"^inbox: "),
    ):
        inbox.store(conn, provider, [item], now=NOW)
    assert sent == []


# -- claim, lease, hold --------------------------------------------------------------------


def test_claim_takes_due_rows_in_id_order_up_to_the_limit(engine: Engine) -> None:
    put(engine, deliveries(5))
    with engine.begin() as conn:
        got = inbox.claim(conn, limit=3, now=NOW, lease=LEASE, worker="w1")
    assert [r.id for r in got] == [1, 2, 3]
    first = got[0]
    assert isinstance(first, InboxRow)
    assert (first.provider, first.event_id, first.payload) == (
        "stack",
        "evt-0",
        {"n": 0, "text": "zoë"},
    )
    assert (first.status, first.attempts, first.claimed_by) == ("pending", 1, "w1")
    assert first.claimed_until == NOW + LEASE
    assert claim(engine, worker="w2") == [4, 5]
    assert claim(engine, worker="w3") == []


def test_rows_not_due_are_not_claimed(engine: Engine) -> None:
    put(engine, deliveries(4))
    set_rows(engine, [1], status="failed", next_attempt_at=NOW + timedelta(seconds=1))
    set_rows(engine, [2], status="failed", next_attempt_at=NOW)  # due exactly now
    set_rows(engine, [3], next_attempt_at=NOW + timedelta(minutes=1))
    set_rows(engine, [4], status="dead")
    assert claim(engine) == [2]


def test_a_claimed_row_comes_back_only_when_its_lease_expires(engine: Engine) -> None:
    put(engine, deliveries(1))
    assert claim(engine, worker="w1") == [1]
    assert claim(engine, worker="w2", now=NOW + LEASE - timedelta(seconds=1)) == []
    assert claim(engine, worker="w2", now=NOW + LEASE) == []  # until is inclusive
    assert claim(engine, worker="w2", now=NOW + LEASE + timedelta(seconds=1)) == [1]
    row = rows(engine)[1]
    assert (row["claimed_by"], row["attempts"]) == ("w2", 2)


def test_hold_keeps_only_rows_this_worker_still_holds(engine: Engine) -> None:
    put(engine, deliveries(4))
    mine = claim(engine, worker="w1")
    later = NOW + timedelta(minutes=1)  # rows 1 and 3 are still leased to w1
    set_rows(engine, [2], claimed_until=NOW)  # row 2's lease ran out ...
    assert claim(engine, worker="w2", limit=1, now=later) == [2]  # ... and w2 took it
    with engine.begin() as conn:
        inbox.complete(conn, [3], worker="w1", now=NOW)
    set_rows(engine, [4], claimed_until=NOW)  # expired, but nobody took it over: still w1's
    with engine.begin() as conn:
        assert inbox.hold(conn, mine, worker="w1") == [1, 4]
        assert inbox.hold(conn, [], worker="w1") == []


def test_complete_marks_done_and_ends_the_lease(engine: Engine) -> None:
    put(engine, deliveries(3))
    claim(engine, limit=2)
    with engine.begin() as conn:
        held = inbox.hold(conn, [1, 2, 3], worker="w1")
        assert inbox.complete(conn, held, worker="w1", now=NOW + timedelta(seconds=3)) == 2
    got = rows(engine)
    assert [got[i]["status"] for i in (1, 2, 3)] == ["done", "done", "pending"]
    assert got[1]["processed_at"] == NOW + timedelta(seconds=3)
    assert (got[1]["claimed_by"], got[1]["claimed_until"]) == (None, None)
    assert claim(engine, now=NOW + timedelta(days=9)) == [3]


def test_release_gives_rows_back_without_counting_the_attempt(engine: Engine) -> None:
    put(engine, deliveries(2))
    claim(engine)
    with engine.begin() as conn:
        assert inbox.release(conn, [1, 2], worker="other") == 0
        assert inbox.release(conn, [1], worker="w1") == 1
    got = rows(engine)
    assert (got[1]["attempts"], got[1]["claimed_by"], got[1]["claimed_until"]) == (0, None, None)
    assert claim(engine, worker="w2") == [1]


# -- PostgreSQL: concurrent claimers -------------------------------------------------------


def lock_timeout(conn: Connection) -> None:
    """Fail fast instead of hanging if a statement ever waits on another's lock."""
    conn.exec_driver_sql("SET LOCAL lock_timeout = '3s'")


def test_concurrent_claims_skip_each_others_rows(pg_engine: Engine) -> None:
    put(pg_engine, deliveries(10))
    with pg_engine.connect() as one, pg_engine.connect() as two, one.begin():
        lock_timeout(one)
        first = inbox.claim(one, limit=4, now=NOW, lease=LEASE, worker="w1")
        with two.begin():  # while one's claim is not committed
            lock_timeout(two)
            second = inbox.claim(two, limit=4, now=NOW, lease=LEASE, worker="w2")
    assert [r.id for r in first] == [1, 2, 3, 4]
    assert [r.id for r in second] == [5, 6, 7, 8]


def test_many_claimers_never_share_a_row(pg_engine: Engine) -> None:
    put(pg_engine, deliveries(300))
    taken: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def drain(worker: str) -> None:
        got: list[int] = []
        try:
            while ids := claim(pg_engine, worker=worker, limit=7):
                got.extend(ids)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
        taken[worker] = got

    threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    every = [i for got in taken.values() for i in got]
    assert sorted(every) == list(range(1, 301))  # each row exactly once
    assert {row["attempts"] for row in rows(pg_engine).values()} == {1}


def test_hold_waits_for_a_worker_that_took_the_row_over_then_leaves_it(pg_engine: Engine) -> None:
    put(pg_engine, deliveries(2))
    claim(pg_engine, worker="w1")
    later = NOW + LEASE + timedelta(seconds=1)
    result: list[list[int]] = []
    with pg_engine.connect() as other:
        with other.begin():
            inbox.claim(other, limit=1, now=later, lease=LEASE, worker="w2")  # row 1

            def hold_as_w1() -> None:
                with pg_engine.begin() as conn:
                    lock_timeout(conn)
                    result.append(inbox.hold(conn, [1, 2], worker="w1"))

            waiting = threading.Thread(target=hold_as_w1)
            waiting.start()
            waiting.join(timeout=0.5)
            assert waiting.is_alive()  # blocked on w2's uncommitted claim of row 1
        waiting.join(timeout=10)
    assert result == [[2]]


# -- fail, backoff, dead -------------------------------------------------------------------


def test_fail_sets_failed_with_backoff_then_dead_after_max_attempts(engine: Engine) -> None:
    put(engine, deliveries(1))
    now = NOW
    for attempt in (1, 2):
        assert claim(engine, now=now) == [1]
        assert fail(engine, [1], now=now) == inbox.FailResult(retrying=(1,), dead=())
        row = rows(engine)[1]
        assert (row["status"], row["attempts"]) == ("failed", attempt)
        assert row["next_attempt_at"] == now + NO_JITTER.delay(attempt)
        assert (row["last_error"], row["claimed_by"], row["claimed_until"]) == (
            "upstream 503",
            None,
            None,
        )
        assert claim(engine, now=row["next_attempt_at"] - timedelta(microseconds=1)) == []
        now = row["next_attempt_at"]
    assert claim(engine, now=now) == [1]
    assert fail(engine, [1], now=now) == inbox.FailResult(retrying=(), dead=(1,))
    row = rows(engine)[1]
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("dead", 3, None)
    assert claim(engine, now=now + timedelta(days=365)) == []
    with engine.begin() as conn:
        assert inbox.requeue_due(conn, now=now + timedelta(days=365)) == 0


def test_a_row_whose_last_lease_runs_out_is_buried_not_claimed_forever(engine: Engine) -> None:
    put(engine, deliveries(3))
    set_rows(engine, [1, 2], attempts=2)
    assert claim(engine, worker="w1", limit=2) == [1, 2]  # attempt 3 of 3; then w1 dies
    set_rows(engine, [2], claimed_until=NOW + timedelta(hours=1))  # still worked on
    later = NOW + LEASE + S
    with engine.begin() as conn:
        again = inbox.claim(conn, limit=9, now=later, lease=LEASE, worker="w2", max_attempts=3)
        assert [r.id for r in again] == [3]
        assert inbox.bury_abandoned(conn, now=later, max_attempts=3) == 1
    got = rows(engine)
    assert (got[1]["status"], got[1]["claimed_by"], got[1]["claimed_until"]) == ("dead", None, None)
    assert got[1]["last_error"].startswith("abandoned")
    assert [got[i]["status"] for i in (2, 3)] == ["pending", "pending"]


def test_fail_leaves_rows_this_worker_no_longer_holds(engine: Engine) -> None:
    put(engine, deliveries(2))
    claim(engine, worker="w1", limit=1)
    claim(engine, worker="w2", limit=1)
    assert fail(engine, [1, 2], now=NOW) == inbox.FailResult(retrying=(1,), dead=())
    assert rows(engine)[2]["status"] == "pending"
    assert rows(engine)[2]["claimed_by"] == "w2"


def test_fail_keeps_the_error_on_one_bounded_line_and_jitters(engine: Engine) -> None:
    put(engine, deliveries(2))
    claim(engine)
    error = "Traceback:\n  line one\r\n\tline\x00two " + "x" * 5000
    jittery = Backoff(base=timedelta(seconds=100), cap=timedelta(hours=1), jitter=0.5)
    with engine.begin() as conn:
        inbox.fail(
            conn, {1: error, 2: error}, worker="w1", now=NOW, max_attempts=5,
            backoff=jittery, rng=random.Random(7),
        )  # fmt: skip
    draws = random.Random(7)
    got = rows(engine)
    for row_id in (1, 2):
        assert got[row_id]["next_attempt_at"] == NOW + jittery.delay(1, draws.random())
        assert got[row_id]["last_error"].startswith("Traceback: line one linetwo xxx")
        assert len(got[row_id]["last_error"]) == inbox.ERROR_MAX
        assert got[row_id]["last_error"].endswith("…")
    assert got[1]["next_attempt_at"] != got[2]["next_attempt_at"]


@pytest.mark.parametrize(
    ("backoff", "attempt", "draw", "expected"),
    [
        (Backoff(base=10 * S, cap=600 * S, jitter=0.0), 1, 0.0, 10 * S),
        (Backoff(base=10 * S, cap=600 * S, jitter=0.0), 2, 0.0, 20 * S),
        (Backoff(base=10 * S, cap=600 * S, jitter=0.0), 6, 0.0, 320 * S),
        (Backoff(base=10 * S, cap=600 * S, jitter=0.0), 7, 0.0, 600 * S),  # capped
        (Backoff(base=10 * S, cap=600 * S, jitter=0.0), 10_000, 0.0, 600 * S),  # no overflow
        (Backoff(base=10 * S, cap=600 * S, jitter=0.0), 3, 0.99, 40 * S),  # no jitter
        (Backoff(base=10 * S, cap=600 * S, jitter=0.5), 3, 0.0, 40 * S),
        (Backoff(base=10 * S, cap=600 * S, jitter=0.5), 3, 0.5, 30 * S),
        (Backoff(base=10 * S, cap=600 * S, jitter=0.5), 30, 0.5, 450 * S),  # under the cap
        (Backoff(base=10 * S, cap=600 * S, jitter=1.0), 1, 0.25, 7.5 * S),
        (Backoff(), 1, 0.0, 30 * S),
        (Backoff(), 8, 0.0, 3600 * S),
    ],
)
def test_backoff_delay(backoff: Backoff, attempt: int, draw: float, expected: timedelta) -> None:
    assert backoff.delay(attempt, draw) == expected


@pytest.mark.parametrize(
    "make",
    [
        lambda: Backoff(base=timedelta(0)),
        lambda: Backoff(base=10 * S, cap=5 * S),
        lambda: Backoff(jitter=1.5),
        lambda: Backoff(jitter=-0.1),
        lambda: Backoff().delay(0),
        lambda: Backoff().delay(1, 1.0),
    ],
)
def test_backoff_refuses_nonsense(make: Any) -> None:
    with pytest.raises(ValueError, match=r"^backoff: "):
        make()


# -- replay, requeue, purge ----------------------------------------------------------------


def test_replay_brings_dead_and_failed_rows_back(engine: Engine) -> None:
    put(engine, deliveries(3, "s"), provider="stack", now=NOW)
    put(engine, deliveries(3, "a"), provider="auth0", now=NOW + timedelta(hours=1))
    # 1, 4 dead; 2, 5 failed; 3 done; 6 failed but being retried right now.
    set_rows(engine, [1, 4], status="dead", attempts=5, last_error="boom")
    set_rows(engine, [2, 5], status="failed", attempts=2, next_attempt_at=NOW + timedelta(days=1))
    set_rows(engine, [3], status="done", processed_at=NOW)
    set_rows(engine, [6], status="failed", claimed_by="w9", claimed_until=NOW + LEASE)
    with engine.begin() as conn:
        assert inbox.replay(conn, now=NOW, provider="stack", statuses=("dead",)) == 1
        assert inbox.replay(conn, now=NOW, ids=[2, 3, 4]) == 2  # 3 is done: not asked for
        assert inbox.replay(conn, now=NOW, ids=[]) == 0
        assert inbox.replay(conn, now=NOW, since=NOW + timedelta(minutes=1)) == 1  # 5; 6 leased
        assert inbox.replay(conn, now=NOW, statuses=("done",)) == 1
    got = rows(engine)
    assert {i for i, r in got.items() if r["status"] == "pending"} == {1, 2, 3, 4, 5}
    assert got[6]["status"] == "failed"
    assert (got[1]["attempts"], got[1]["next_attempt_at"], got[1]["last_error"]) == (
        0,
        None,
        "boom",
    )
    assert got[3]["processed_at"] is None
    assert claim(engine, now=NOW) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: inbox.claim(c, limit=0, now=NOW, lease=LEASE, worker="w"),
        lambda c: inbox.claim(c, limit=inbox.MAX_BATCH + 1, now=NOW, lease=LEASE, worker="w"),
        lambda c: inbox.claim(c, limit=1, now=NOW, lease=timedelta(0), worker="w"),
        lambda c: inbox.claim(c, limit=1, now=NOW, lease=LEASE, worker="w" * 129),
        lambda c: inbox.claim(c, limit=1, now=NOW, lease=LEASE, worker="w", max_attempts=0),
        lambda c: inbox.purge_done(c, older_than=NOW, limit=0),
        lambda c: inbox.fail(c, {1: "e"}, worker="w", now=NOW, max_attempts=0, backoff=Backoff()),
        lambda c: inbox.bury_abandoned(c, now=NOW, max_attempts=0),
    ],
)
def test_arguments_out_of_range_are_refused(engine: Engine, call: Any) -> None:
    with engine.begin() as conn, pytest.raises(ValueError, match=r"^inbox: "):
        call(conn)


@pytest.mark.parametrize("statuses", [(), ("pending",), ("dead", "nope")])
def test_replay_refuses_statuses_it_cannot_replay(
    engine: Engine, statuses: tuple[str, ...]
) -> None:
    with engine.begin() as conn, pytest.raises(ValueError, match=r"^inbox: replay"):
        inbox.replay(conn, now=NOW, statuses=statuses)


def test_requeue_due_moves_failed_rows_whose_time_has_come(engine: Engine) -> None:
    put(engine, deliveries(4))
    set_rows(engine, [1], status="failed", attempts=2, next_attempt_at=NOW - S)
    set_rows(engine, [2], status="failed", attempts=2, next_attempt_at=NOW + S)
    set_rows(
        engine, [3], status="failed", attempts=2, next_attempt_at=NOW - S, claimed_until=NOW + S
    )
    with engine.begin() as conn:
        assert inbox.requeue_due(conn, now=NOW) == 1
    got = rows(engine)
    assert (got[1]["status"], got[1]["attempts"], got[1]["next_attempt_at"]) == ("pending", 2, None)
    assert [got[i]["status"] for i in (2, 3, 4)] == ["failed", "failed", "pending"]


def test_purge_done_deletes_only_old_finished_rows_in_batches(engine: Engine) -> None:
    put(engine, deliveries(10))
    old, recent, cutoff = NOW - timedelta(days=4), NOW - timedelta(days=1), NOW - timedelta(days=3)
    set_rows(engine, [1, 2, 3, 4], status="done", processed_at=old)
    set_rows(engine, [5], status="ignored", processed_at=old)
    set_rows(engine, [6], status="done", processed_at=recent)
    set_rows(engine, [7], status="dead", processed_at=old)
    set_rows(engine, [8], status="failed", next_attempt_at=old)
    with engine.begin() as conn:
        assert inbox.purge_done(conn, older_than=cutoff, limit=2) == 2
    assert len(rows(engine)) == 8
    assert inbox.purge_done_in_batches(engine, older_than=cutoff, batch=2) == 3
    assert sorted(rows(engine)) == [6, 7, 8, 9, 10]
    with engine.begin() as conn:
        assert inbox.purge_done(conn, older_than=cutoff, limit=2) == 0


def test_counts_and_oldest_pending_age(engine: Engine) -> None:
    with engine.connect() as conn:
        assert inbox.counts(conn) == dict.fromkeys(
            ("pending", "done", "failed", "dead", "ignored"), 0
        )
        assert inbox.oldest_pending_age(conn, now=NOW) is None
    put(engine, deliveries(2), now=NOW - timedelta(minutes=10))
    put(engine, deliveries(3, "late"), now=NOW - timedelta(minutes=1))
    set_rows(engine, [1], status="failed", next_attempt_at=NOW)
    set_rows(engine, [3], status="dead")
    set_rows(engine, [4], status="ignored", processed_at=NOW)
    with engine.connect() as conn:
        assert inbox.counts(conn) == {"pending": 2, "done": 0, "failed": 1, "dead": 1, "ignored": 1}
        assert inbox.oldest_pending_age(conn, now=NOW) == 600.0
        assert inbox.oldest_pending_age(conn, now=NOW - timedelta(hours=1)) == 0.0  # clock skew


# -- schema: indexes used, migration round trip --------------------------------------------


def fill_with_done_rows(engine: Engine, count: int) -> None:
    done = [
        {
            "provider": "auth0", "event_id": f"done-{i}", "event_type": "s",
            "received_at": NOW - timedelta(days=2), "payload": {"log_id": i},
            "status": "done", "attempts": 1, "processed_at": NOW - timedelta(days=2),
        }
        for i in range(count)
    ]  # fmt: skip
    with engine.begin() as conn:
        insert_rows(conn, sync_inbox, done)
        inbox.store(conn, "auth0", deliveries(5), now=NOW)
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE sync_inbox")


def captured(engine: Engine, run: Any, marker: str) -> tuple[str, Any]:
    with statements(engine) as sent:
        run()
    return next((s, p) for s, p in sent if marker in s)


def test_claim_and_purge_use_the_partial_indexes_on_postgresql(pg_engine: Engine) -> None:
    fill_with_done_rows(pg_engine, 100_000)
    claim_sql, claim_params = captured(pg_engine, lambda: claim(pg_engine, limit=3), "picked")
    purge_sql, purge_params = captured(
        pg_engine,
        lambda: inbox.purge_done_in_batches(pg_engine, older_than=NOW - timedelta(days=1)),
        "ORDER BY sync_inbox.processed_at",
    )
    with pg_engine.begin() as conn:
        claim_plan = explain(conn, claim_sql, claim_params)
        assert "Index Scan using ix_sync_inbox_claimable" in claim_plan, claim_plan
        assert "Seq Scan" not in claim_plan, claim_plan
        # psycopg prepares a statement run often; its generic plan must use the index too.
        generic = explain_generic(conn, claim_sql, claim_params)
        assert "Index Scan using ix_sync_inbox_claimable" in generic, generic
        purge_plan = explain(conn, purge_sql, purge_params)
        assert "ix_sync_inbox_finished_processed_at" in purge_plan, purge_plan


def explain(conn: Connection, statement: str, params: Any) -> str:
    return "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {statement}", params))


def explain_generic(conn: Connection, statement: str, params: dict[str, Any]) -> str:
    """The plan PostgreSQL 15 keeps for a prepared statement (no EXPLAIN (GENERIC_PLAN)
    before 16): PREPARE with $n placeholders, force the generic plan, EXPLAIN EXECUTE."""
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", statement)))
    numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m[1]) + 1}", statement)
    driver = conn.connection.driver_connection
    assert driver is not None
    args = ", ".join(sql.Literal(params[name]).as_string(driver) for name in names)
    with driver.cursor() as cursor:
        cursor.execute(f"PREPARE inbox_plan AS {numbered}")
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute(f"EXPLAIN EXECUTE inbox_plan({args})")
        plan = "\n".join(r[0] for r in cursor.fetchall())
        cursor.execute("DEALLOCATE inbox_plan")
    return plan


def test_claim_and_purge_use_the_partial_indexes_on_sqlite(sqlite_engine: Engine) -> None:
    engine = sqlite_engine
    fill_with_done_rows(engine, 2_000)
    claim_sql, claim_params = captured(engine, lambda: claim(engine, limit=3), "picked")
    purge_sql, purge_params = captured(
        engine,
        lambda: inbox.purge_done_in_batches(engine, older_than=NOW - timedelta(days=1)),
        "ORDER BY sync_inbox.processed_at",
    )
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {claim_sql}", claim_params).all()
        assert any("USING INDEX ix_sync_inbox_claimable" in r[3] for r in plan), plan
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {purge_sql}", purge_params).all()
        assert any("USING INDEX ix_sync_inbox_finished_processed_at" in r[3] for r in plan), plan


def test_downgrade_from_0005_keeps_ignored_rows_as_done(engine: Engine) -> None:
    from alembic import command

    with engine.begin() as conn:
        inbox.store(conn, "auth0", [Delivery("x", {}, "fp", "ignored"), Delivery("y", {})], now=NOW)
    claim(engine)
    config = alembic_config()
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0004")
            statuses = conn.exec_driver_sql("SELECT event_id, status FROM sync_inbox ORDER BY id")
            assert statuses.all() == [("x", "done"), ("y", "pending")]
    finally:
        upgrade(engine, SCHEMA)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(sync_inbox)).scalar_one() == 2
        assert conn.execute(select(sync_inbox.c.claimed_by)).scalars().all() == [None, None]


def test_new_worker_id_is_unique_and_fits() -> None:
    ids = {inbox.new_worker_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(0 < len(i) <= 128 for i in ids)


def test_one_line() -> None:
    assert inbox.one_line("a\n  b\r\n\tc\x00d") == "a b cd"
    assert inbox.one_line("x" * 2000) == "x" * (inbox.ERROR_MAX - 1) + "…"
