"""Differential: random batches through both paths, on twin databases, give identical tables.

Twin PostgreSQL databases receive the same batches, one engine never taking the bulk create
path (threshold out of reach), the other always trying it first (threshold 0), with one
fixed clock. Afterwards every worker table must hold the same rows, generated ids aside: a
user is named by the identities that point to it, and row ids are dropped. The batches are
drawn from a few users, emails, linked accounts and sessions, so that they collide: links
by verified email (in the batch and stored), accounts moving between users, tombstones,
restores, stale versions, logins of users created in the same batch, and poison records.
"""

from __future__ import annotations

import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from db.connect import make_engine
from db.migrate import upgrade
from db.tables import profiles, sync_audit, user_identities, user_sessions, users
from sync_worker.changes import LinkedIdentity, Source, UserChange
from sync_worker.engine import BatchResult, PlanSettings
from tests.conftest import SCHEMA, empty_tables, sqlalchemy_url
from tests.factories import T0, BoundEngine, at, delete, login, upsert

pytestmark = pytest.mark.postgres

NOW = T0 + timedelta(days=1)
IDS = [f"auth0|{i}" for i in range(4)]
EMAILS = ["ada@example.org", "ADA@example.org", "grace@example.org", None, "no-at-sign"]
ACCOUNTS = tuple(LinkedIdentity(provider="auth0:github", external_id=f"g{i}") for i in range(3))


@pytest.fixture(scope="module")
def twins(make_pg_database: Callable[[], str]) -> Iterator[tuple[Engine, Engine]]:
    engines = []
    for _ in range(2):
        db = make_engine(sqlalchemy_url(make_pg_database()), schema=SCHEMA)
        upgrade(db, SCHEMA)
        engines.append(db)
    yield engines[0], engines[1]
    for db in engines:
        db.dispose()


@st.composite
def upserts(draw: st.DrawFn) -> UserChange:
    external_id = draw(st.sampled_from(IDS))
    return upsert(
        external_id,
        draw(st.integers(0, 4)),
        email=draw(st.sampled_from(EMAILS)),
        email_verified=draw(st.booleans()),
        name=draw(st.sampled_from(["Ada", "Grace", None])),
        # created_at orders link targets: distinct per user, as upstream
        created_at=at(-100 - IDS.index(external_id)),
        linked=tuple(draw(st.lists(st.sampled_from(ACCOUNTS), max_size=2))),
        linked_stated=draw(st.booleans()) or draw(st.booleans()),
        event_id=draw(st.sampled_from([None, "evt_1", "evt_2"])),
        profile=draw(st.sampled_from([{}, {"locale": "es-ES"}])),
    )


changes = st.one_of(
    upserts(),
    upserts(),
    st.builds(
        delete,
        st.sampled_from(IDS),
        st.integers(0, 4),
        event_id=st.sampled_from([None, "evt_3"]),
    ),
    st.builds(
        login,
        st.sampled_from(IDS),
        st.sampled_from(["s1", "s2", "s3"]),
        st.integers(0, 4),
        expires_in_minutes=st.sampled_from([None, 60.0]),
    ),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# The collisions that decide what is simple, drawn for sure.
@example(  # two creates claim one verified email (case aside): the second links
    batches=[
        [upsert("auth0|0", email="ada@example.org"), upsert("auth0|1", email="ADA@example.org")]
    ],
    link=True,
)
@example(  # a stored user owns the email: the create links to it
    batches=[
        [upsert("auth0|0", email="ada@example.org")],
        [upsert("auth0|1", email="ada@example.org")],
    ],
    link=True,
)
@example(  # two creates name one linked account: the later one takes it
    batches=[[upsert("auth0|0", linked=ACCOUNTS[:1]), upsert("auth0|1", linked=ACCOUNTS[:2])]],
    link=False,
)
@example(  # a create names a stored account
    batches=[[upsert("auth0|0", linked=ACCOUNTS[:1])], [upsert("auth0|1", linked=ACCOUNTS[:1])]],
    link=False,
)
@example(  # logins of a user created in the batch, one of them with a stored session
    batches=[
        [upsert("auth0|0"), login("auth0|0", "s1", 1)],
        [upsert("auth0|1"), login("auth0|1", "s2", 3), login("auth0|1", "s1", 2)],
    ],
    link=True,
)
@example(  # a poison record among creates; a login of the poisoned one
    batches=[[upsert("auth0|0"), upsert("auth0|1", email="no-at-sign"), login("auth0|1", "s1")]],
    link=True,
)
@given(
    batches=st.lists(st.lists(changes, min_size=1, max_size=8), min_size=1, max_size=3),
    link=st.booleans(),
)
def test_both_paths_write_the_same_rows(
    twins: tuple[Engine, Engine], batches: list[list[UserChange]], link: bool
) -> None:
    per_row_db, bulk_db = twins
    plan = PlanSettings(link_by_verified_email=link)
    per_row = BoundEngine(per_row_db, plan, clock=lambda: NOW, bulk_threshold=sys.maxsize)
    bulk = BoundEngine(bulk_db, plan, clock=lambda: NOW, bulk_threshold=0)
    for db in twins:
        empty_tables(db)
    for batch in batches:
        expected = per_row.apply(batch, source=Source.PULL)
        got = bulk.apply(batch, source=Source.PULL)
        assert outcomes(got) == outcomes(expected)
    assert tables(bulk_db) == tables(per_row_db)


def outcomes(result: BatchResult) -> list[tuple[Any, ...]]:
    return sorted(
        (
            (o.provider, o.external_id, str(o.action), o.error, repr(o.changes), o.session_id)
            for o in result.outcomes
        ),
        key=repr,
    )


def tables(db: Engine) -> dict[str, list[Any]]:
    """Every row of the engine's tables, generated ids replaced by what they identify."""
    with db.connect() as conn:
        identity_rows = [dict(r) for r in conn.execute(select(user_identities)).mappings()]
        keys: dict[uuid.UUID, list[str]] = defaultdict(list)
        for row in identity_rows:
            keys[row["user_id"]].append(f"{row['provider']}:{row['external_id']}")

        def who(user_id: uuid.UUID | None) -> str | None:
            return None if user_id is None else ",".join(sorted(keys[user_id])) or "orphan"

        def rows(table: Any, *, drop: tuple[str, ...] = ("id",)) -> list[Any]:
            found = []
            for row in conn.execute(select(table)).mappings():
                values = {k: v for k, v in row.items() if k not in drop}
                if "user_id" in values:
                    values["user_id"] = who(values["user_id"])
                if table is users:
                    values["who"] = who(row["id"])
                found.append(values)
            return sorted(found, key=repr)

        return {
            "users": rows(users),
            "profiles": rows(profiles),
            "user_identities": rows(user_identities, drop=()),
            "user_sessions": rows(user_sessions),
            "sync_audit": rows(sync_audit),
        }
