"""Group commit: concurrent deliveries share a transaction; a refused one fails alone."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, event

from db import inbox
from sync_worker.daemon.group_store import GroupStore
from sync_worker.errors import StoreError
from tests.daemon_harness import harness


def _delivery(event_id: str) -> list[inbox.Delivery]:
    return [inbox.Delivery(event_id=event_id, payload={"n": event_id})]


def test_concurrent_requests_share_commits_and_a_refused_one_fails_alone(engine: Engine) -> None:
    woken: list[int] = []
    group = GroupStore(engine, lambda: datetime.now(UTC), on_commit=lambda: woken.append(1))
    groups: list[int] = []  # requests per statement
    write = group._write

    async def run() -> list[inbox.StoreResult | BaseException]:
        gate = asyncio.Event()

        async def held_write(arrivals: list[inbox.Arrival], writer: object) -> object:
            groups.append(len(arrivals))
            if len(groups) == 1:
                await gate.wait()  # the first group waits, so the others queue up behind it
            return await write(arrivals, writer)  # type: ignore[arg-type]

        group._write = held_write  # type: ignore[method-assign,assignment]
        first = asyncio.ensure_future(group.store("stack", _delivery("first")))
        await asyncio.sleep(0.2)
        rest = [group.store("stack", _delivery(f"e{n}")) for n in range(20)]
        rest.append(group.store("stack", _delivery("x" * 300)))  # too wide: refused
        waiting = asyncio.gather(first, *rest, return_exceptions=True)
        await asyncio.sleep(0.2)
        gate.set()
        return await waiting

    outcomes = asyncio.run(run())
    stored = [o for o in outcomes if isinstance(o, inbox.StoreResult)]
    refused = [o for o in outcomes if isinstance(o, ValueError)]
    assert (len(stored), len(refused)) == (21, 1)
    assert all(o.inserted == 1 for o in stored)
    assert groups == [1, 20]  # 22 requests: the first alone, then the rest together
    assert len(woken) == 2  # the drainer woken once per group, not once per request
    assert len(inbox_rows(engine)) == 21


def test_a_database_that_cannot_store_fails_every_request_of_the_group() -> None:
    from sqlalchemy import create_engine

    dead = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    group = GroupStore(dead, lambda: datetime.now(UTC))

    async def run() -> list[object]:
        calls = [group.store("stack", _delivery(f"e{n}")) for n in range(3)]
        return await asyncio.gather(*calls, return_exceptions=True)

    assert all(isinstance(o, StoreError) for o in asyncio.run(run()))


def test_the_app_answers_after_the_commit(engine: Engine) -> None:
    daemon = harness(engine)
    assert daemon.send("stack", "user.created").json() == {"stored": 1, "duplicates": 0}
    assert len(daemon.inbox()) == 1  # stored when the answer came


def test_one_statement_stores_a_group_and_counts_duplicates_per_request(engine: Engine) -> None:
    from db.transaction import transaction

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with transaction(engine) as conn:
        inbox.store(conn, "stack", _delivery("old"), now=t0)
    statements: list[str] = []

    def seen(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", seen)
    arrivals = [
        inbox.Arrival("stack", _delivery("a") + _delivery("b"), t0.replace(second=1)),
        inbox.Arrival("stack", _delivery("b") + _delivery("old"), t0.replace(second=2)),
        inbox.Arrival("authjs", _delivery("a"), t0.replace(second=3)),  # another provider's
        inbox.Arrival("stack", [], t0.replace(second=4)),
    ]
    try:
        with transaction(engine) as conn:
            results = inbox.store_arrivals(conn, arrivals)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert [(r.inserted, r.duplicates) for r in results] == [(2, 0), (0, 2), (1, 0), (0, 0)]
    assert sum("INSERT" in s for s in statements) == 1
    rows = {(r.provider, r.event_id): r.received_at for r in inbox_rows(engine)}
    assert rows[("stack", "b")] == t0.replace(second=1)  # the first request listing it
    assert rows[("authjs", "a")] == t0.replace(second=3)
    assert rows[("stack", "old")] == t0  # a redelivery changes nothing


def inbox_rows(engine: Engine) -> list[inbox.InboxRow]:
    from sqlalchemy import select

    from db.tables import sync_inbox

    with engine.connect() as conn:
        return [inbox._inbox_row(r) for r in conn.execute(select(sync_inbox))]


def test_requests_get_strictly_increasing_receipt_times_even_from_a_stopped_clock(
    engine: Engine,
) -> None:
    frozen = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    group = GroupStore(engine, lambda: frozen)

    async def run() -> None:
        await asyncio.gather(*(group.store("stack", _delivery(f"e{n}")) for n in range(5)))
        await group.store("stack", _delivery("later"))

    asyncio.run(run())
    times = sorted(r.received_at for r in inbox_rows(engine))
    assert len(set(times)) == 6
    assert times[0] == frozen
    assert times[-1] - times[0] == timedelta(microseconds=5)
