"""Properties of the engine under reordering, replay and concurrency."""

from __future__ import annotations

import itertools
import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from db.tables import user_identities, users
from sync_worker.changes import Source, UserChange
from sync_worker.engine import PlanSettings
from tests.factories import BoundEngine, delete, upsert

NAMES = st.sampled_from(["Ada", "Grace", "Edsger", "Barbara", "Alan"])


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[int, int, str | None]]:
    """(user, version, name) events; name None is a deletion. Versions are distinct per user."""
    events: list[tuple[int, int, str | None]] = []
    for user in range(draw(st.integers(1, 3))):
        versions = draw(st.lists(st.integers(0, 50), min_size=1, max_size=6, unique=True))
        for version in versions:
            deleted = draw(st.booleans()) and draw(st.booleans())
            events.append((user, version, None if deleted else draw(NAMES)))
    return events


def state(engine: Engine, prefix: str) -> dict[str, tuple[bool, str | None]]:
    stmt = (
        select(user_identities.c.external_id, users.c.deleted_at, users.c.name)
        .join(users, users.c.id == user_identities.c.user_id)
        .where(user_identities.c.external_id.like(f"{prefix}%"))
    )
    with engine.connect() as conn:
        return {r.external_id: (r.deleted_at is not None, r.name) for r in conn.execute(stmt)}


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=histories(), data=st.data())
def test_any_order_converges_to_the_newest_versions(engine: Engine, events, data) -> None:  # type: ignore[no-untyped-def]
    """Whatever order (and batching) the changes arrive in, each user ends in its newest state."""
    prefix = f"p{uuid.uuid4().hex[:8]}-"  # one database for all examples: fresh ids each time
    changes = [
        delete(f"{prefix}{u}", v)
        if name is None
        else upsert(f"{prefix}{u}", v, name=name, email=f"{prefix}{u}@example.org")
        for u, v, name in events
    ]
    order = data.draw(st.permutations(changes))
    cut = data.draw(st.integers(1, len(order)))
    sync = BoundEngine(engine, PlanSettings(link_by_verified_email=False))
    for start in range(0, len(order), cut):
        sync.apply(list(order[start : start + cut]), source=Source.PULL)

    final = state(engine, prefix)
    for user, group in itertools.groupby(sorted(events), key=lambda e: e[0]):
        newest = max(group, key=lambda e: e[1])
        key = f"{prefix}{user}"
        if newest[2] is None:
            assert final[key][0] is True  # newest is a deletion: deleted, whatever came before
        else:
            assert final[key] == (False, newest[2])


@pytest.mark.postgres
def test_concurrent_applies_of_a_new_identity_create_one_user(pg_engine: Engine) -> None:
    """A webhook and a backfill racing on the same new user must not create two."""
    sync = BoundEngine(pg_engine, PlanSettings())
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        change: UserChange = upsert("auth0|race", n, name=f"writer {n}")
        try:
            barrier.wait()
            sync.apply([change], source=Source.WEBHOOK)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pg_engine.connect() as conn:
        names = conn.execute(select(users.c.name)).scalars().all()
    assert names == ["writer 3"]  # one user, holding the newest version
