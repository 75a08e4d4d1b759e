"""Ids a full pass saw: stored a page per row, unnested by the database for reconcile."""

from __future__ import annotations

import uuid

from sqlalchemy import Engine

from db.seen import forget_seen, mark_seen, seen_ids


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
