"""Version guard on deleted identities (found by test_engine_properties; kept as a plain case)."""

from __future__ import annotations

from sqlalchemy import Engine

from sync_worker.changes import Source
from sync_worker.engine import PlanSettings
from tests.factories import BoundEngine, delete, rows, upsert


def test_a_newer_deletion_of_a_deleted_identity_keeps_an_older_upsert_out(engine: Engine) -> None:
    sync = BoundEngine(engine, PlanSettings())
    for change in (delete("auth0|1", 0), delete("auth0|1", 5), upsert("auth0|1", 1)):
        sync.apply([change], source=Source.WEBHOOK)
    (user,) = rows(engine, "users")
    assert user["deleted_at"] is not None
    (identity,) = rows(engine, "user_identities")
    assert identity["deleted_at"] is not None


def test_deleting_an_identity_again_at_the_same_version_writes_nothing(engine: Engine) -> None:
    sync = BoundEngine(engine, PlanSettings())
    sync.apply([upsert("auth0|1", 0), delete("auth0|1", 3)], source=Source.PULL)
    before = rows(engine, "user_identities")
    sync.apply([delete("auth0|1", 3)], source=Source.PULL)
    assert rows(engine, "user_identities") == before
