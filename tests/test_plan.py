"""``plan()`` is pure: tables of cases on in-memory snapshots, no database.

Each case gives the current rows, a batch, and what the plan must decide: the outcome per
change and which rows it writes. The snapshot is checked unchanged afterwards, and new ids
come from the counter the test passes in.
"""

from __future__ import annotations

import copy
import itertools
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest

from db.rows import IdentityRow, ProfileRow, SessionRow, Snapshot, UserRow
from sync_worker.changes import Action, SessionInfo, UserChange
from sync_worker.engine.ids import time_ordered_id, time_ordered_ids
from sync_worker.engine.plan import Plan, PlanSettings, dedupe, plan, triage, unchanged
from tests.factories import T0, at, delete, login, upsert

NOW = at(60)
U1 = uuid.UUID(int=1)
U2 = uuid.UUID(int=2)


def ids() -> Any:
    counter = itertools.count(1000)
    return lambda: uuid.UUID(int=next(counter))


def user(user_id: uuid.UUID = U1, **values: Any) -> UserRow:
    row: UserRow = {
        "id": user_id,
        "email": "auth0-1@example.org",
        "email_verified": True,
        "name": "Name auth0|1",
        "given_name": None,
        "family_name": None,
        "phone": None,
        "avatar_url": None,
        "role": "member",
        "tenant_id": None,
        "blocked": False,
        "last_login_at": None,
        "created_at": T0,
        "updated_at": T0,
        "deleted_at": None,
    }
    row.update(values)  # type: ignore[typeddict-item]
    return row


def profile(user_id: uuid.UUID = U1) -> ProfileRow:
    return {
        "id": uuid.UUID(int=user_id.int + 100),
        "user_id": user_id,
        "display_name": "Name auth0|1",
        "avatar_url": None,
        "timezone": "Europe/Paris",
        "currency": "EUR",
        "locale": "fr",
        "settings": {"theme": "dark"},
        "created_at": T0,
        "updated_at": T0,
    }


def identity(change: UserChange, user_id: uuid.UUID = U1, **values: Any) -> IdentityRow:
    row: IdentityRow = {
        "provider": change.provider,
        "external_id": change.external_id,
        "user_id": user_id,
        "email": change.attributes.email if change.attributes else None,
        "upstream_updated_at": change.version,
        "content_hash": change.content_hash(),
        "raw": change.raw,
        "first_seen_at": T0,
        "last_synced_at": T0,
        "deleted_at": None,
    }
    row.update(values)  # type: ignore[typeddict-item]
    return row


def snapshot(*held: IdentityRow, users: tuple[UserRow, ...] = (), **kw: Any) -> Snapshot:
    return Snapshot(
        identities={(i["provider"], i["external_id"]): i for i in held},
        users={u["id"]: u for u in users},
        profiles={u["id"]: profile(u["id"]) for u in users},
        **kw,
    )


ORIGINAL = upsert("auth0|1", 0)
SECONDARY: IdentityRow = {
    **identity(ORIGINAL), "provider": "auth0:google", "external_id": "g-1", "content_hash": None,
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    snap: Snapshot
    batch: list[UserChange]
    actions: list[Action]
    writes: dict[str, int] = field(default_factory=dict)  # Writes field -> rows
    settings: PlanSettings = field(default_factory=PlanSettings)


CASES = [
    Case("a new identity creates user, profile, identity and audit",
         snapshot(), [upsert("auth0|1")], [Action.CREATED],
         {"new_users": 1, "new_profiles": 1, "new_identities": 1, "audit": 1}),
    Case("the same content again writes nothing",
         snapshot(identity(ORIGINAL), users=(user(),)), [ORIGINAL], [Action.UNCHANGED], {}),
    Case("a newer version with a new name updates user and profile",
         snapshot(identity(ORIGINAL), users=(user(),)), [upsert("auth0|1", 5, name="Ada")],
         [Action.UPDATED],
         {"user_updates": 1, "profile_updates": 1, "identity_updates": 1, "audit": 1}),
    Case("an older version is skipped and, with an event id, audited once",
         snapshot(identity(upsert("auth0|1", 10)), users=(user(),)),
         [upsert("auth0|1", 5, name="Old", event_id="evt-1")], [Action.STALE_SKIPPED],
         {"audit": 1}),
    Case("a stale delivery already audited is not audited again",
         snapshot(identity(upsert("auth0|1", 10)), users=(user(),),
                  stale_audited=frozenset({("auth0", "auth0|1", "evt-1")})),
         [upsert("auth0|1", 5, name="Old", event_id="evt-1")], [Action.STALE_SKIPPED], {}),
    Case("a verified email links a new identity to its owner",
         snapshot(identity(ORIGINAL), users=(user(),),
                  verified_email_owner={"auth0-1@example.org": U1}),
         [upsert("google|9", email="auth0-1@example.org", provider="google")],
         [Action.LINKED], {"new_identities": 1, "audit": 1}),
    Case("linking is off: a second user",
         snapshot(identity(ORIGINAL), users=(user(),),
                  verified_email_owner={"auth0-1@example.org": U1}),
         [upsert("google|9", email="auth0-1@example.org", provider="google")],
         [Action.CREATED],
         {"new_users": 1, "new_profiles": 1, "new_identities": 1, "audit": 1},
         PlanSettings(link_by_verified_email=False)),
    Case("a deletion soft-deletes the user and revokes its sessions",
         snapshot(identity(ORIGINAL), users=(user(),)), [delete("auth0|1", 5)],
         [Action.DELETED],
         {"user_updates": 1, "identity_updates": 1, "revoke_sessions_of": 1, "audit": 1}),
    Case("a versioned deletion of an unknown identity leaves a tombstone",
         snapshot(), [delete("auth0|9", 5)], [Action.DELETED],
         {"new_users": 1, "new_profiles": 1, "new_identities": 1, "audit": 1}),
    Case("an unversioned deletion of an unknown identity is unknown",
         snapshot(), [UserChange(provider="auth0", external_id="x", kind=delete("x").kind)],
         [Action.UNKNOWN], {}),
    Case("an upsert after a deletion restores",
         snapshot(identity(ORIGINAL, deleted_at=at(3)), users=(user(deleted_at=at(3)),)),
         [upsert("auth0|1", 5)], [Action.RESTORED],
         {"user_updates": 1, "identity_updates": 1, "audit": 1}),
    Case("a first login records the session and the login time",
         snapshot(identity(ORIGINAL), users=(user(),)), [login("auth0|1", "s-1", 5)],
         [Action.LOGIN], {"new_sessions": 1, "user_updates": 1, "audit": 1}),
    Case("a login for an unknown identity fails, audited",
         snapshot(), [login("auth0|1", "s-1", 5)], [Action.FAILED], {"audit": 1}),
    Case("a record stating no linked accounts removes the stored one",
         snapshot(identity(ORIGINAL), SECONDARY, users=(user(),)),
         [upsert("auth0|1", 5, name="Ada", linked=())], [Action.UPDATED],
         {"user_updates": 1, "profile_updates": 1, "identity_updates": 2, "audit": 1}),
    Case("a record that does not state linked accounts keeps the stored one",
         snapshot(identity(ORIGINAL), SECONDARY, users=(user(),)),
         [upsert("auth0|1", 5, name="Ada", linked=(), linked_stated=False)], [Action.UPDATED],
         {"user_updates": 1, "profile_updates": 1, "identity_updates": 1, "audit": 1}),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_plan(case: Case) -> None:
    before = copy.deepcopy(case.snap)
    decided = plan(dedupe(case.batch), case.snap, case.settings, NOW, ids())
    assert [o.action for o in decided.outcomes] == case.actions
    assert _written(decided) == case.writes
    assert case.snap == before  # the input is read, never changed


def _written(decided: Plan) -> dict[str, int]:
    writes = decided.writes
    counts = {
        name: len(getattr(writes, name))
        for name in ("new_users", "new_profiles", "new_identities", "identity_updates",
                     "new_sessions", "sessions", "revoke_sessions_of", "audit")
    }  # fmt: skip
    counts["user_updates"] = sum(len(g.rows) for g in writes.user_updates)
    counts["profile_updates"] = sum(len(g.rows) for g in writes.profile_updates)
    return {k: v for k, v in counts.items() if v}


def test_new_ids_come_from_the_caller() -> None:
    decided = plan([upsert("auth0|1"), upsert("auth0|2")], snapshot(), PlanSettings(), NOW, ids())
    assert [u["id"].int for u in decided.writes.new_users] == [1000, 1002]
    assert [p["id"].int for p in decided.writes.new_profiles] == [1001, 1003]


def test_app_owned_profile_fields_are_never_clobbered() -> None:
    change = upsert("auth0|1", 5, name="Ada", profile={"timezone": "UTC", "locale": "en"})
    decided = plan([change], snapshot(identity(ORIGINAL), users=(user(),)), PlanSettings(), NOW)
    (group,) = decided.writes.profile_updates
    assert group.columns == ("display_name", "updated_at")
    assert group.rows[0]["timezone"] == "Europe/Paris"


def test_a_login_keeps_the_newest_login_time() -> None:
    snap = snapshot(identity(ORIGINAL), users=(user(last_login_at=at(30)),))
    decided = plan([login("auth0|1", "s-1", 5)], snap, PlanSettings(), NOW, ids())
    assert decided.writes.new_sessions[0]["created_at"] == at(5)
    assert decided.writes.user_updates == []  # 30 minutes is newer than 5


HELD_SESSION: SessionRow = {
    "id": U2, "user_id": U1, "provider": "auth0", "external_session_id": "s-1",
    "ip": "203.0.113.7", "user_agent": None, "created_at": at(5), "last_seen_at": at(5),
    "expires_at": None, "revoked_at": None,
}  # fmt: skip


def test_a_stored_session_seen_again_unchanged_writes_nothing() -> None:
    change = login("auth0|1", "s-1", 5)
    assert change.session is not None
    held = HELD_SESSION
    snap = snapshot(identity(ORIGINAL), users=(user(last_login_at=at(5)),),
                    sessions={("auth0", "s-1"): held})  # fmt: skip
    decided = plan([change], snap, PlanSettings(), NOW, ids())
    assert [o.action for o in decided.outcomes] == [Action.UNCHANGED]
    assert decided.outcomes[0].is_session


@pytest.mark.parametrize(
    ("held", "version", "expected"),
    [
        (ORIGINAL, 0, True),  # same content, same version
        (ORIGINAL, 5, False),  # same content... but a newer version carries other raw
        (upsert("auth0|1", 10), 10, True),
    ],
)
def test_unchanged_is_one_rule(held: UserChange, version: float, expected: bool) -> None:
    change = upsert("auth0|1", version)
    assert unchanged(change, identity(held)) is expected


def test_unchanged_never_holds_for_deleted_or_older_identities() -> None:
    assert not unchanged(ORIGINAL, identity(ORIGINAL, deleted_at=at(1)))
    older = upsert("auth0|1", 0, raw=dict(upsert("auth0|1", 10).raw or {}))
    assert not unchanged(older, identity(upsert("auth0|1", 10)))
    assert not unchanged(delete("auth0|1"), identity(ORIGINAL))
    assert not unchanged(ORIGINAL, None)


def test_dedupe_keeps_the_newest_per_identity_and_each_session_once() -> None:
    batch = [upsert("a", 5), upsert("a", 3), login("a", "s", 1), login("a", "s", 2)]
    kept = dedupe(batch)
    assert [(c.kind, c.version) for c in kept] == [
        (batch[0].kind, at(5)),
        (batch[3].kind, at(2)),
    ]


def test_the_timestamp_is_the_callers() -> None:
    decided = plan([upsert("auth0|1")], snapshot(), PlanSettings(), datetime(2030, 1, 1), ids())
    assert decided.writes.new_users[0]["updated_at"] == datetime(2030, 1, 1)


def test_a_logout_is_not_a_login_time() -> None:
    logout = UserChange(
        provider="auth0",
        external_id="auth0|1",
        kind=login("auth0|1", "s-1").kind,
        version=at(50),
        session=SessionInfo(external_session_id="s-1", revoked_at=at(50)),
    )
    snap = snapshot(identity(ORIGINAL), users=(user(last_login_at=at(5)),))
    decided = plan([logout], snap, PlanSettings(), NOW, ids())
    assert decided.writes.new_sessions[0]["revoked_at"] == at(50)
    assert decided.writes.user_updates == []  # last_login_at stays at 5 minutes


def test_triage_sets_aside_unchanged_upserts_and_logins_before_loading() -> None:
    identities = {("auth0", "auth0|1"): identity(ORIGINAL)}
    sessions = {("auth0", "s-1"): HELD_SESSION}
    again, moved = login("auth0|1", "s-1", 5), login("auth0|1", "s-1", 9)
    done, todo = triage([ORIGINAL, again, moved, upsert("auth0|2")], identities, sessions, NOW)
    assert [(o.action, o.is_session) for o in done] == [
        (Action.UNCHANGED, False),
        (Action.UNCHANGED, True),
    ]
    assert todo == [upsert("auth0|2"), moved]


def test_triage_leaves_a_login_to_the_planner_when_its_identity_is_deleted() -> None:
    sessions = {("auth0", "s-1"): HELD_SESSION}
    again = login("auth0|1", "s-1", 5)
    gone = {("auth0", "auth0|1"): identity(ORIGINAL, deleted_at=at(1))}
    assert triage([again], gone, sessions, NOW)[1] == [again]
    live = {("auth0", "auth0|1"): identity(ORIGINAL)}
    deleting = delete("auth0|1", 7)
    assert triage([deleting, again], live, sessions, NOW)[1] == [deleting, again]
    assert triage([again], {}, sessions, NOW)[1] == [again]


def test_a_change_triage_passes_on_is_hashed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner reuses the content hash triage computed (a tenth of a drain's CPU)."""
    snap = snapshot(identity(ORIGINAL), users=(user(),))  # hashes ORIGINAL: before counting
    hashed: list[str] = []
    original = UserChange.content_hash

    def counting(change: UserChange) -> str:
        hashed.append(change.external_id)
        return original(change)

    monkeypatch.setattr(UserChange, "content_hash", counting)
    renamed = upsert("auth0|1", 5, name="Renamed")
    done, todo = triage([renamed, upsert("auth0|2")], dict(snap.identities), {}, NOW)
    assert (done, todo) == ([], [renamed, upsert("auth0|2")])
    decided = plan(todo, snap, PlanSettings(), NOW, ids())
    assert [o.action for o in decided.outcomes] == [Action.UPDATED, Action.CREATED]
    assert sorted(hashed) == ["auth0|1", "auth0|2"]  # once each: the new one only in plan
    # A change the planner gets without triage is hashed there.
    again = upsert("auth0|1", 6, name="Again")
    plan([again], snap, PlanSettings(), NOW, ids())
    assert hashed.count("auth0|1") == 2
    # The next batch's triage drops what an earlier one left unplanned: one batch is held.
    left = upsert("auth0|1", 7, name="Left")
    triage([left], dict(snap.identities), {}, NOW)
    triage([upsert("auth0|3")], dict(snap.identities), {}, NOW)
    plan([left], snap, PlanSettings(), NOW, ids())
    assert hashed.count("auth0|1") == 4  # left: in its triage, and again in plan


def test_new_ids_are_time_ordered_version_7() -> None:
    first = time_ordered_id()
    time.sleep(0.002)
    later = [time_ordered_id() for _ in range(1000)]
    assert {u.version for u in [first, *later]} == {7}
    assert {u.variant for u in later} == {uuid.RFC_4122}
    assert len(set(later)) == 1000
    assert all(first < u for u in later)  # a later millisecond sorts after
    millis = first.int >> 80
    assert abs(millis - time.time() * 1000) < 60_000


def test_ids_made_by_the_batch_are_those_of_time_ordered_id() -> None:
    first = time_ordered_id()
    time.sleep(0.002)
    batch = time_ordered_ids(1000)
    assert len(batch) == 1000
    assert len(set(batch)) == 1000
    assert {u.version for u in batch} == {7}
    assert {u.variant for u in batch} == {uuid.RFC_4122}
    assert all(first < u for u in batch)
    assert {u.int >> 80 for u in batch} == {batch[0].int >> 80}  # one clock read
    assert time_ordered_ids(0) == []
