"""The inbox's group INSERT on the event loop (PostgreSQL): the same rows as the engine's path,
one statement per group, and a fresh connection after the old one broke."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select, text

from db import inbox
from db.connect import make_engine
from db.inbox_writer import InboxWriter
from db.tables import sync_inbox
from db.transaction import transaction
from sync_worker.errors import StoreUnavailable

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _arrivals(tag: str) -> list[inbox.Arrival]:
    payload = {"type": "user.created", "data": {"id": "u1", "name": 'Zoë "quoted" \\ back'}}
    return [
        inbox.Arrival("stack", [inbox.Delivery(f"{tag}-a", payload, "user.created")], T0),
        inbox.Arrival(
            "stack",
            [
                inbox.Delivery(f"{tag}-a", payload, "user.created"),  # the first arrival's
                inbox.Delivery(f"{tag}-b", {"n": [1, 2.5, None]}, "team.created", "ignored"),
            ],
            T0.replace(second=1),
        ),
        inbox.Arrival(
            "authjs", [inbox.Delivery(f"{tag}-a", {"k": "v"}, None)], T0.replace(second=2)
        ),
    ]


def _rows(engine: Engine, tag: str) -> list[tuple[object, ...]]:
    columns = [c for c in sync_inbox.c if c.name != "id"]
    query = select(*columns).where(sync_inbox.c.event_id.like(f"{tag}-%")).order_by(sync_inbox.c.id)
    with engine.connect() as conn:  # the event id without its tag
        return [(r[0], r[1].split("-", 1)[1], *r[2:]) for r in conn.execute(query)]


def test_the_writer_stores_what_the_engines_path_stores(pg_engine: Engine) -> None:
    with transaction(pg_engine) as conn:
        expected = inbox.store_arrivals(conn, _arrivals("sync"))

    async def run() -> list[inbox.StoreResult]:
        writer = InboxWriter(pg_engine)
        try:
            return await writer.store(_arrivals("loop"))
        finally:
            await writer.close()

    got = asyncio.run(run())
    assert got == expected
    assert [(r.inserted, r.duplicates) for r in got] == [(1, 0), (1, 1), (1, 0)]
    assert _rows(pg_engine, "loop") == _rows(pg_engine, "sync")
    assert len(_rows(pg_engine, "loop")) == 3


def test_a_redelivery_stores_nothing(pg_engine: Engine) -> None:
    async def run() -> list[inbox.StoreResult]:
        writer = InboxWriter(pg_engine)
        try:
            await writer.store(_arrivals("r"))
            return await writer.store(_arrivals("r"))
        finally:
            await writer.close()

    assert [(r.inserted, r.duplicates) for r in asyncio.run(run())] == [(0, 1), (0, 2), (0, 1)]
    with pg_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(sync_inbox)).scalar_one() == 3


def test_a_connection_the_server_dropped_is_replaced_for_the_group_at_hand(
    pg_engine: Engine,
) -> None:
    async def run() -> tuple[int, int, list[inbox.StoreResult]]:
        writer = InboxWriter(pg_engine)
        try:
            await writer.store(_arrivals("before"))
            assert writer._conn is not None
            pid = writer._conn.info.backend_pid
            with pg_engine.begin() as conn:  # as a restart of the server would
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            after = await writer.store(_arrivals("after"))
            assert writer._conn is not None
            return pid, writer._conn.info.backend_pid, after
        finally:
            await writer.close()

    old, new, after = asyncio.run(run())
    assert new != old
    assert [(r.inserted, r.duplicates) for r in after] == [(1, 0), (1, 1), (1, 0)]
    assert len(_rows(pg_engine, "after")) == 3


def test_a_server_that_is_away_fails_the_group(pg_engine: Engine) -> None:
    away = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", schema="identity")

    async def run() -> None:
        writer = InboxWriter(away)
        try:
            await writer.store(_arrivals("lost"))
        finally:
            await writer.close()

    with pytest.raises(StoreUnavailable):
        asyncio.run(run())
    away.dispose()


def test_sqlite_is_refused(sqlite_engine: Engine) -> None:
    with pytest.raises(ValueError, match="PostgreSQL only"):
        InboxWriter(sqlite_engine)


@pytest.mark.parametrize("prepared", [True, False])
def test_prepared_statements_follow_the_engine(pg_engine: Engine, prepared: bool) -> None:
    """``database.prepared_statements: false`` (a pooler in transaction mode that loses
    them): the writer's connection prepares nothing either, however many groups it stores;
    by default psycopg prepares the statement from its fifth run."""
    db = make_engine(
        pg_engine.url.render_as_string(hide_password=False),
        schema="identity",
        prepared_statements=prepared,
    )

    async def run() -> int:
        writer = InboxWriter(db)
        try:
            for n in range(7):
                await writer.store(_arrivals(f"p{n}"))
            assert writer._conn is not None
            cursor = await writer._conn.execute("SELECT count(*) FROM pg_prepared_statements")
            row = await cursor.fetchone()
            assert row is not None
            return int(row[0])
        finally:
            await writer.close()

    try:
        held = asyncio.run(run())
    finally:
        db.dispose()
    assert (held > 0) is prepared
