"""Ids a full pass saw: stored a page per row, unnested by the database for reconcile."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine, func, select, text

from db.seen import forget_seen, mark_seen, mark_seen_staged, seen_ids
from db.tables import sync_seen


def stored(engine: Engine, run_id: uuid.UUID) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(seen_ids(engine.dialect.name, run_id)).scalars())


def test_pages_unnest_into_the_ids_of_their_run_only(engine: Engine) -> None:
    run, other = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as conn:
        mark_seen(conn, run, ["auth0|b", "auth0|a", "auth0|b"])
        mark_seen(conn, run, ["auth0|c", "auth0|a"])  # an id listed again on a later page
        mark_seen(conn, other, ["auth0|z"])
        mark_seen(conn, run, ["名前|ü", 'quote"and\\slash'])  # JSON escapes come back intact
    assert stored(engine, run) == sorted(
        ["auth0|a", "auth0|a", "auth0|b", "auth0|c", "名前|ü", 'quote"and\\slash']
    )
    forget_seen(engine, run)
    assert stored(engine, run) == []
    assert stored(engine, other) == ["auth0|z"]


def test_a_rolled_back_batch_leaves_no_seen_ids(engine: Engine) -> None:
    run = uuid.uuid4()
    with engine.connect() as conn:
        transaction = conn.begin()
        mark_seen(conn, run, ["auth0|a"])
        transaction.rollback()
    assert stored(engine, run) == []


@pytest.mark.postgres
@pytest.mark.parametrize("chunk", [100_000, 2])
def test_a_staged_table_is_recorded_whole_in_rows_of_at_most_a_chunk(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr("db.seen.SEEN_CHUNK", chunk)
    run, empty = uuid.uuid4(), uuid.uuid4()
    ids = ["authjs|1", "authjs|2", "名前|ü", 'quote"and\\slash', "5"]
    with pg_engine.begin() as conn:
        conn.execute(text("CREATE TEMP TABLE staged (ext text) ON COMMIT DROP"))
        conn.execute(text("INSERT INTO staged SELECT unnest(CAST(:ids AS text[]))"), {"ids": ids})
        mark_seen_staged(conn, run, "staged", "ext", rows=len(ids))
        conn.execute(text("TRUNCATE staged"))
        mark_seen_staged(conn, empty, "staged", "ext", rows=0)
        sizes = conn.execute(
            select(func.jsonb_array_length(sync_seen.c.external_ids)).where(
                sync_seen.c.run_id == run
            )
        ).scalars()
        assert max(sizes) <= chunk
    assert stored(pg_engine, run) == sorted(ids)
    assert stored(pg_engine, empty) == []
    forget_seen(pg_engine, run)
