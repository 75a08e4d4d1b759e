"""db.upsert: bulk inserts (COPY on PostgreSQL) store what a plain INSERT stores, and fail alike."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, insert, select, text
from sqlalchemy.exc import DataError, IntegrityError

from db.tables import sync_audit, user_identities, users
from db.upsert import PIPELINE_INSERT_MAX, Step, insert_rows, upsert_rows, write_steps

AWARE = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=-5)))
NAIVE = datetime(2026, 3, 2, 8, 0, 0)  # taken to be UTC


def user(**values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": uuid.uuid4(),
        "email": "tab\tnew\nline\\back@example.org",
        "email_verified": True,
        "name": 'Zoë "quoted" O\'Brien',
        "given_name": None,
        "family_name": "",
        "phone": None,
        "avatar_url": "https://example.org/a.png?x=1&y=\\N",
        "role": "member",
        "tenant_id": None,
        "blocked": False,
        "last_login_at": AWARE,
        "created_at": NAIVE,
        "updated_at": AWARE,
        "deleted_at": None,
    }
    row.update(values)
    return row


def identity(user_id: uuid.UUID, external_id: str, raw: Any) -> dict[str, Any]:
    return {
        "provider": "auth0",
        "external_id": external_id,
        "user_id": user_id,
        "email": None,
        "upstream_updated_at": AWARE,
        "content_hash": "ab" * 32,
        "raw": raw,
        "first_seen_at": NAIVE,
        "last_synced_at": AWARE,
        "deleted_at": None,
    }


RAW = {"name": "tab\there", "nested": {"list": [1, 2.5, None, True], "back": "\\N"}, "é": "ü"}


def read(engine: Engine, table: Any, **where: Any) -> dict[str, Any]:
    stmt = select(table).where(*(table.c[k] == v for k, v in where.items()))
    with engine.connect() as conn:
        return dict(conn.execute(stmt).mappings().one())


def test_bulk_insert_stores_what_insert_stores(engine: Engine) -> None:
    bulk, plain = user(), user(email="plain@example.org")
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # naive values must not follow the session zone
            conn.execute(text("SET LOCAL TIME ZONE 'America/New_York'"))
        insert_rows(conn, users, [bulk])
        conn.execute(insert(users), [plain])
        insert_rows(conn, user_identities, [identity(bulk["id"], "bulk", RAW)])
        conn.execute(insert(user_identities), [identity(plain["id"], "plain", RAW)])
    got_bulk, got_plain = read(engine, users, id=bulk["id"]), read(engine, users, id=plain["id"])
    assert got_bulk == {**got_plain, "id": bulk["id"], "email": bulk["email"]}
    assert got_bulk["last_login_at"] == AWARE
    assert got_bulk["created_at"] == NAIVE.replace(tzinfo=UTC)
    one = read(engine, user_identities, external_id="bulk")
    other = read(engine, user_identities, external_id="plain")
    assert one == {**other, "external_id": "bulk", "user_id": bulk["id"]}
    assert one["raw"] == RAW


def test_none_in_a_json_column_is_stored_as_insert_stores_it(engine: Engine) -> None:
    owner = user()
    audit = {"occurred_at": AWARE, "run_id": None, "source": "pull", "provider": "auth0",
             "external_id": "x", "user_id": None, "action": "failed", "changes": None,
             "event_id": None, "error": "why"}  # fmt: skip
    with engine.begin() as conn:
        insert_rows(conn, users, [owner])
        insert_rows(conn, user_identities, [identity(owner["id"], "bulk", None)])
        conn.execute(insert(user_identities), [identity(owner["id"], "plain", None)])
        write_steps(conn, [Step(user_identities, [identity(owner["id"], "steps", None)])])
        insert_rows(conn, sync_audit, [audit])
        conn.execute(insert(sync_audit), [{**audit, "external_id": "y"}])
        write_steps(conn, [Step(sync_audit, [{**audit, "external_id": "z"}])])
    with engine.connect() as conn:  # JSON null and SQL NULL both read back as None
        raw_null = conn.execute(
            select(user_identities.c.external_id, user_identities.c.raw.is_(None))
        ).all()
        changes_null = conn.execute(
            select(sync_audit.c.external_id, sync_audit.c.changes.is_(None))
        ).all()
    assert len({is_null for _, is_null in raw_null}) == 1, raw_null
    assert len({is_null for _, is_null in changes_null}) == 1, changes_null


def test_a_refused_row_raises_integrity_error_and_the_savepoint_recovers(engine: Engine) -> None:
    taken = user()
    with engine.begin() as conn:
        insert_rows(conn, users, [taken])
        with pytest.raises(IntegrityError) as duplicate, conn.begin_nested():
            insert_rows(conn, users, [user(), {**taken, "email": "other@example.org"}])
        with pytest.raises(IntegrityError) as shape, conn.begin_nested():
            insert_rows(conn, users, [user(email="no-at-sign")])
        insert_rows(conn, users, [user(email="after@example.org")])
    assert "unique" in str(duplicate.value.orig).lower()
    assert "email_shape" in str(shape.value.orig).splitlines()[0]
    with engine.connect() as conn:
        emails = set(conn.execute(select(users.c.email)).scalars())
    assert emails == {taken["email"], "after@example.org"}


def test_upsert_updates_only_the_named_columns(engine: Engine) -> None:
    first = user(name="First")
    with engine.begin() as conn:
        insert_rows(conn, users, [first])
        changed = {**first, "name": "Second", "role": "admin"}
        upsert_rows(conn, users, [changed, user()], conflict=["id"], update=["name"])
    stored = read(engine, users, id=first["id"])
    assert (stored["name"], stored["role"]) == ("Second", "member")
    with engine.connect() as conn:
        assert len(conn.execute(select(users.c.id)).all()) == 2


@pytest.mark.postgres
@pytest.mark.parametrize("way", ["insert_rows", "write_steps", "upsert step"])
def test_a_value_too_long_raises_data_error(pg_engine: Engine, way: str) -> None:
    """Never cut to the column's width: a cast to varchar(64) would have."""
    too_long = user(phone="5" * 65)
    writes: dict[str, Callable[[Connection], None]] = {
        "insert_rows": lambda conn: insert_rows(conn, users, [too_long]),
        "write_steps": lambda conn: write_steps(conn, [Step(users, [too_long])]),
        "upsert step": lambda conn: write_steps(
            conn, [Step(users, [too_long], ("id",), ("phone",))]
        ),
    }
    with pg_engine.begin() as conn, pytest.raises(DataError) as refused:
        writes[way](conn)
    assert "too long" in str(refused.value.orig).splitlines()[0]


def test_an_unknown_column_is_refused_before_the_database(engine: Engine) -> None:
    with engine.begin() as conn, pytest.raises(ValueError, match="nickname"):
        insert_rows(conn, users, [user(nickname="x")])


def test_write_steps_run_in_order_and_store_what_insert_stores(engine: Engine) -> None:
    """Small inserts (pipelined INSERTs on PostgreSQL) and a large one (a COPY, which leaves
    the pipeline) keep their order: identities reference users inserted in an earlier step."""
    small = [user(email=f"small{i}@example.org") for i in range(3)]
    large = [user(email=f"large{i}@example.org") for i in range(PIPELINE_INSERT_MAX + 1)]
    plain = user(email="plain@example.org")
    renamed = {**small[0], "name": "Renamed", "role": "admin"}
    with engine.begin() as conn:
        write_steps(conn, [
            Step(users, small),
            Step(user_identities, [identity(small[1]["id"], "s1", RAW)]),
            Step(users, large),
            Step(user_identities, [identity(large[-1]["id"], "l1", RAW)]),
            Step(users, [renamed], ("id",), ("name",)),
            Step(users, []),
        ])  # fmt: skip
        conn.execute(insert(users), [plain])
    assert read(engine, users, id=small[0]["id"])["name"] == "Renamed"
    assert read(engine, users, id=small[0]["id"])["role"] == "member"
    got, want = read(engine, users, id=small[2]["id"]), read(engine, users, id=plain["id"])
    assert got == {**want, "id": small[2]["id"], "email": small[2]["email"]}
    assert read(engine, user_identities, external_id="s1")["raw"] == RAW
    with engine.connect() as conn:
        assert len(conn.execute(select(users.c.id)).all()) == len(small) + len(large) + 1


def test_write_steps_raise_integrity_error_and_the_savepoint_recovers(engine: Engine) -> None:
    taken = user()
    with engine.begin() as conn:
        insert_rows(conn, users, [taken])
        with pytest.raises(IntegrityError) as refused, conn.begin_nested():
            write_steps(conn, [
                Step(users, [user(email="fine@example.org")]),
                Step(users, [{**taken, "email": "no-at-sign"}], ("id",), ("email",)),
                Step(sync_audit, []),
            ])  # fmt: skip
        write_steps(conn, [Step(users, [user(email="after@example.org")])])
    assert "email_shape" in str(refused.value.orig).splitlines()[0]
    with engine.connect() as conn:
        emails = set(conn.execute(select(users.c.email)).scalars())
    assert emails == {taken["email"], "after@example.org"}


def test_an_upsert_step_naming_one_row_twice_applies_both_in_order(engine: Engine) -> None:
    """One INSERT ... SELECT may not update a row twice (PostgreSQL refuses it): such a step
    goes row by row, the later row winning, as an executemany did."""
    first = user(name="First")
    with engine.begin() as conn:
        insert_rows(conn, users, [first])
        write_steps(conn, [Step(users, [{**first, "name": "Second"}, {**first, "name": "Third"}],
                                ("id",), ("name",))])  # fmt: skip
    assert read(engine, users, id=first["id"])["name"] == "Third"


def test_a_statement_first_sent_after_a_refused_one_runs_after_the_rollback(
    engine: Engine,
) -> None:
    """A pipeline stops at its first error: statements after it were never prepared, and
    must be prepared (not merely named) when the batch runs again after the savepoint."""
    taken = user()
    # A column set no other test writes: this statement is new to the connection.
    note = {"occurred_at": AWARE, "source": "cli", "provider": "auth0", "action": "failed",
            "error": "first sent after a refused statement"}  # fmt: skip
    with engine.begin() as conn:
        insert_rows(conn, users, [taken])
        with pytest.raises(IntegrityError), conn.begin_nested():
            write_steps(conn, [
                Step(users, [{**taken, "email": "no-at-sign"}], ("id",), ("email",)),
                Step(sync_audit, [note]),
            ])  # fmt: skip
        write_steps(conn, [Step(sync_audit, [note])])
        write_steps(conn, [Step(sync_audit, [note])])
    with engine.connect() as conn:
        errors = list(conn.execute(select(sync_audit.c.error)).scalars())
    assert errors == [note["error"]] * 2
