"""The set pass decides which users changed against the digests stored when it began."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, delete, insert, text

from db import setbased
from db.tables import sync_source_digests

pytestmark = pytest.mark.postgres

USERS = (
    ("id", "integer"),
    ("name", "text"),
    ("email", "text"),
    ("email_verified", "timestamp with time zone"),
    ("image", "text"),
    ("ord", "bigint"),
)
TZ = "timestamp with time zone"
RELATIONS: setbased.Streams = (
    ("users", USERS, [b"1\tAda\tada@x.io\t\\N\t\\N\t1\n", b"2\tBob\tbob@x.io\t\\N\t\\N\t2\n"]),
    ("accounts", (("uid", "integer"), ("provider", "text"), ("acct", "text")), []),
    ("sessions", (("uid", "integer"), ("token", "text"), ("expires", TZ)), []),
    ("digests", (("uid", "integer"), ("digest", "text"), ("n", "integer")),
     [b"1\td1\t0\n", b"2\td2\t0\n"]),
)  # fmt: skip


def test_changed_is_decided_against_the_digests_stored_when_the_pass_began(
    pg_engine: Engine,
) -> None:
    """A range derived late in the pass (its part copied while the writer is batches ahead)
    must not see what the pass's own batches did to the stored digests: a digest dropped
    meanwhile (a session moved to another user drops its owner's) made its user look
    changed, where the per-row pass, deciding at its start, skipped it."""
    with pg_engine.begin() as conn:
        conn.execute(
            insert(sync_source_digests),
            [
                {"provider": "authjs", "external_id": "1", "digest": "d1"},
                {"provider": "authjs", "external_id": "2", "digest": "old"},
            ],
        )
    with pg_engine.connect() as conn, conn.begin():
        setbased.drop(conn)
        kinds = setbased.create_sources(conn, RELATIONS, temp=True)
        setbased.known_digests(conn, "authjs", temp=True)
        setbased.copy_sources(conn, RELATIONS)
        setbased.analyze_sources(conn)
        setbased.derive_sources(
            conn, kinds, lo=1, hi=2, observed=datetime.now(UTC), max_age_seconds=3600.0,
            create=True, temp=True,
        )  # fmt: skip
        # What an earlier batch of the pass does: user 1's digest is dropped.
        conn.execute(delete(sync_source_digests).where(sync_source_digests.c.external_id == "1"))
        setbased.derive_users(
            conn, kinds["users"], role="member", lo=1, hi=2, create=True, temp=True
        )
        changed: dict[str, bool] = dict(
            conn.execute(text("SELECT ext, changed FROM sw_u ORDER BY ord")).all()
        )
        setbased.drop(conn)
    assert changed == {"1": False, "2": True}
