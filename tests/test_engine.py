"""The engine rules (docs/architecture.md), proven on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, update

from db import snapshot
from db.cursors import load_cursor
from db.tables import profiles, users
from sync_worker.changes import LinkedIdentity, Source
from sync_worker.engine import PlanSettings
from tests.factories import BoundEngine, at, audit, delete, dump, login, rows, sign_in, upsert


@pytest.fixture(autouse=True, params=["prefetched", "two-step"])
def snapshot_reads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rule on both ways of reading a batch's rows: a small batch reads its users'
    rows with its identities; a larger one reads its identities first (triage), then the
    rest of what it changes."""
    if request.param == "two-step":
        monkeypatch.setattr(snapshot, "PREFETCH_MAX", 0)


@pytest.fixture
def sync(engine: Engine) -> BoundEngine:
    return BoundEngine(engine, PlanSettings())


def apply(sync: BoundEngine, *changes, **kw):  # type: ignore[no-untyped-def]
    return sync.apply(list(changes), source=Source.PULL, **kw)


def only(items: list[dict]) -> dict:  # type: ignore[type-arg]
    assert len(items) == 1, items
    return items[0]


class TestCreate:
    def test_creates_user_profile_identity_and_audit_together(self, sync: BoundEngine) -> None:
        result = apply(sync, upsert("auth0|1", name="Ada Lovelace", avatar_url="https://img/1"))
        assert result.counts == {"created": 1}
        user = only(rows(sync.db, "users"))
        assert (user["email"], user["name"], user["role"]) == (
            "auth0-1@example.org",
            "Ada Lovelace",
            "member",
        )
        profile = only(rows(sync.db, "profiles", user_id=user["id"]))
        assert (profile["display_name"], profile["avatar_url"]) == ("Ada Lovelace", "https://img/1")
        assert (profile["timezone"], profile["currency"], profile["locale"]) == ("UTC", "USD", "en")
        identity = only(rows(sync.db, "user_identities"))
        assert identity["user_id"] == user["id"]
        assert identity["upstream_updated_at"] == at(0)
        entry = only(audit(sync.db))
        assert entry["action"] == "created"
        assert entry["changes"]["name"] == [None, "Ada Lovelace"]
        assert (entry["source"], entry["provider"], entry["user_id"]) == (
            "pull",
            "auth0",
            user["id"],
        )

    def test_profile_defaults_come_from_settings(self, engine: Engine) -> None:
        settings = PlanSettings(profile_defaults={"timezone": "Europe/Berlin", "currency": "EUR"})
        BoundEngine(engine, settings).apply([upsert("auth0|1")], source=Source.CLI)
        profile = only(rows(engine, "profiles"))
        assert (profile["timezone"], profile["currency"], profile["locale"]) == (
            "Europe/Berlin",
            "EUR",
            "en",
        )

    def test_mapped_profile_fields_are_used_on_create(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", profile={"locale": "es-ES"}))
        assert only(rows(sync.db, "profiles"))["locale"] == "es-ES"

    def test_audit_carries_event_id(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", event_id="evt_1"))
        assert only(audit(sync.db))["event_id"] == "evt_1"


class TestIdempotence:
    def test_applying_twice_changes_nothing(self, sync: BoundEngine) -> None:
        batch = [upsert(f"auth0|{i}", i) for i in range(20)]
        apply(sync, *batch)
        before, audit_before = dump(sync.db), audit(sync.db)
        result = apply(sync, *batch)
        assert result.counts == {"unchanged": 20}
        assert dump(sync.db) == before
        assert audit(sync.db) == audit_before
        assert len(audit_before) == 20

    def test_unchanged_record_touches_no_row(self, sync: BoundEngine) -> None:
        apply(sync, upsert("s-1", 0, provider="stack", raw={"id": "s-1"}))
        identity = only(rows(sync.db, "user_identities"))
        # Re-observed later with the same content (Stack has no updated_at): nothing is written.
        apply(sync, upsert("s-1", 5, provider="stack", raw={"id": "s-1"}))
        assert only(rows(sync.db, "user_identities")) == identity

    def test_each_real_change_gets_one_audit_row(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 0, name="A"))
        apply(sync, upsert("auth0|1", 1, name="B"))
        apply(sync, upsert("auth0|1", 1, name="B"))
        actions = [(a["action"], a["changes"]) for a in audit(sync.db)]
        assert actions[1:] == [
            ("updated", {"name": ["A", "B"], "profile.display_name": ["A", "B"]})
        ]


class TestVersionGuard:
    def test_older_after_newer_changes_nothing(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 10, name="Newest"))
        before = dump(sync.db)
        result = apply(sync, upsert("auth0|1", 5, name="Older"))
        assert result.counts == {"stale_skipped": 1}
        assert dump(sync.db) == before
        assert only(rows(sync.db, "users"))["name"] == "Newest"

    def test_stale_event_is_audited_once(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 10))
        apply(sync, upsert("auth0|1", 5, name="Old", event_id="evt_old"))
        apply(sync, upsert("auth0|1", 5, name="Old", event_id="evt_old"))
        stale = audit(sync.db, action="stale_skipped")
        assert [a["event_id"] for a in stale] == ["evt_old"]

    def test_delete_older_than_stored_version_is_ignored(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 10))
        assert apply(sync, delete("auth0|1", 5)).counts == {"stale_skipped": 1}
        assert only(rows(sync.db, "users"))["deleted_at"] is None

    def test_newest_in_batch_wins(self, sync: BoundEngine) -> None:
        result = apply(
            sync,
            upsert("auth0|1", 1, name="v1"),
            upsert("auth0|1", 3, name="v3"),
            upsert("auth0|1", 2, name="v2"),
        )
        assert result.counts == {"created": 1, "stale_skipped": 2}  # v1 and v2: superseded
        assert only(rows(sync.db, "users"))["name"] == "v3"
        assert only(audit(sync.db))["changes"]["name"] == [None, "v3"]  # no event ids

    def test_events_superseded_in_their_batch_are_audited_as_stale_once(
        self, sync: BoundEngine
    ) -> None:
        # A create and its update drained in one batch (after a crash, say) leave the same
        # audit trail per event as when they came one batch each: one row per event.
        result = apply(
            sync,
            upsert("auth0|1", 1, name="v1", event_id="evt_1"),
            upsert("auth0|1", 3, name="v3", event_id="evt_3"),
            upsert("auth0|1", 2, name="v2", event_id="evt_2"),
            upsert("auth0|1", 2, name="v2", event_id="evt_2"),  # the same event twice
        )
        assert result.counts == {"created": 1, "stale_skipped": 3}
        rows_by_event = {a["event_id"]: a for a in audit(sync.db)}
        assert sorted(rows_by_event) == ["evt_1", "evt_2", "evt_3"]
        assert len(audit(sync.db)) == 3
        user_id = only(rows(sync.db, "users"))["id"]
        for event in ("evt_1", "evt_2"):
            stale = rows_by_event[event]
            assert stale["action"] == "stale_skipped"
            assert stale["user_id"] == user_id
            assert (
                stale["changes"]["upstream_updated_at"][0]
                > stale["changes"]["upstream_updated_at"][1]
            )
        assert rows_by_event["evt_3"]["action"] == "created"


class TestLinking:
    def test_links_new_identity_by_verified_email(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", email="Ada@Example.org", email_verified=True))
        result = apply(
            sync, upsert("s-1", provider="stack", email="ada@example.org", email_verified=True)
        )
        assert result.counts == {"linked": 1}
        user = only(rows(sync.db, "users"))
        assert {i["provider"] for i in rows(sync.db, "user_identities", user_id=user["id"])} == {
            "auth0",
            "stack",
        }

    def test_never_links_by_unverified_email(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", email="ada@example.org", email_verified=True))
        result = apply(
            sync, upsert("s-1", provider="stack", email="ada@example.org", email_verified=False)
        )
        assert result.counts == {"created": 1}
        assert len(rows(sync.db, "users")) == 2

    def test_never_links_to_a_user_whose_email_is_unverified(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", email="ada@example.org", email_verified=False))
        apply(sync, upsert("s-1", provider="stack", email="ada@example.org", email_verified=True))
        assert len(rows(sync.db, "users")) == 2

    def test_linking_can_be_switched_off(self, engine: Engine) -> None:
        sync = BoundEngine(engine, PlanSettings(link_by_verified_email=False))
        apply(sync, upsert("auth0|1", email="ada@example.org"))
        apply(sync, upsert("s-1", provider="stack", email="ada@example.org"))
        assert len(rows(engine, "users")) == 2

    def test_links_within_one_batch(self, sync: BoundEngine) -> None:
        result = apply(
            sync,
            upsert("auth0|1", email="ada@example.org"),
            upsert("s-1", provider="stack", email="ada@example.org"),
        )
        assert sorted(result.counts) == ["created", "linked"]
        assert len(rows(sync.db, "users")) == 1

    def test_linked_accounts_become_identities_and_follow_upstream(self, sync: BoundEngine) -> None:
        github = LinkedIdentity(provider="authjs:github", external_id="gh-7")
        google = LinkedIdentity(provider="authjs:google", external_id="go-9")
        apply(sync, upsert("42", 0, provider="authjs", linked=(github, google)))
        user = only(rows(sync.db, "users"))
        found = rows(sync.db, "user_identities", user_id=user["id"])
        assert {(i["provider"], i["external_id"]) for i in found} == {
            ("authjs", "42"),
            ("authjs:github", "gh-7"),
            ("authjs:google", "go-9"),
        }
        apply(sync, upsert("42", 1, provider="authjs", linked=(github,)))
        gone = only(rows(sync.db, "user_identities", provider="authjs:google"))
        assert gone["deleted_at"] is not None


class TestSoftDelete:
    def test_delete_soft_deletes_and_revokes_sessions(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 0), login("auth0|1", "sess-1", 1))
        result = apply(sync, delete("auth0|1", 2))
        assert result.counts == {"deleted": 1}
        assert only(rows(sync.db, "users"))["deleted_at"] is not None
        assert only(rows(sync.db, "user_identities"))["deleted_at"] is not None
        assert only(rows(sync.db, "user_sessions"))["revoked_at"] is not None
        assert len(rows(sync.db, "profiles")) == 1  # soft, not hard

    def test_deleting_twice_writes_once(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 0))
        apply(sync, delete("auth0|1", 2))
        assert apply(sync, delete("auth0|1", 2)).counts == {"unchanged": 1}
        assert len(audit(sync.db, action="deleted")) == 1

    def test_restore_when_identity_reappears(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 0))
        apply(sync, delete("auth0|1", 2))
        result = apply(sync, upsert("auth0|1", 3))
        assert result.counts == {"restored": 1}
        assert only(rows(sync.db, "users"))["deleted_at"] is None
        assert only(rows(sync.db, "user_identities"))["deleted_at"] is None

    def test_user_with_another_live_identity_stays(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 0, email="ada@example.org"))
        apply(sync, upsert("s-1", provider="stack", email="ada@example.org"))
        apply(sync, delete("auth0|1", 1))
        assert only(rows(sync.db, "users"))["deleted_at"] is None

    def test_delete_before_create_leaves_a_tombstone(self, sync: BoundEngine) -> None:
        assert apply(sync, delete("stack-1", 5, provider="stack")).counts == {"deleted": 1}
        assert apply(sync, upsert("stack-1", 4, provider="stack")).counts == {"stale_skipped": 1}
        assert only(rows(sync.db, "users"))["deleted_at"] is not None
        assert apply(sync, upsert("stack-1", 6, provider="stack")).counts == {"restored": 1}
        user = only(rows(sync.db, "users"))
        assert (user["deleted_at"], user["email"]) == (None, "stack-1@example.org")

    def test_unversioned_delete_of_unknown_identity_writes_nothing(self, sync: BoundEngine) -> None:
        change = delete("auth0|404", 1)
        unversioned = type(change)(provider="auth0", external_id="auth0|404", kind=change.kind)
        assert apply(sync, unversioned).counts == {"unknown": 1}
        assert audit(sync.db) == []


class TestOwnership:
    def test_app_owned_profile_fields_are_never_clobbered(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 0, name="Ada", profile={"locale": "en-GB"}))
        with sync.db.begin() as conn:  # the app edits its own fields
            conn.execute(
                update(profiles).values(
                    timezone="Europe/Paris", currency="EUR", settings={"theme": "dark"}
                )
            )
        apply(sync, upsert("auth0|1", 1, name="Ada L.", profile={"locale": "fr-FR"}))
        profile = only(rows(sync.db, "profiles"))
        assert (profile["display_name"], profile["timezone"], profile["currency"]) == (
            "Ada L.",
            "Europe/Paris",
            "EUR",
        )
        assert (profile["locale"], profile["settings"]) == ("en-GB", {"theme": "dark"})

    def test_configured_overwrite_follows_upstream(self, engine: Engine) -> None:
        sync = BoundEngine(engine, PlanSettings(profile_overwrite=frozenset({"locale"})))
        apply(sync, upsert("auth0|1", 0, profile={"locale": "en-GB"}))
        apply(sync, upsert("auth0|1", 1, profile={"locale": "fr-FR"}))
        assert only(rows(engine, "profiles"))["locale"] == "fr-FR"

    def test_role_set_by_app_survives_when_provider_states_none(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 0))
        with sync.db.begin() as conn:
            conn.execute(update(users).values(role="admin"))
        apply(sync, upsert("auth0|1", 1, name="Renamed"))
        assert only(rows(sync.db, "users"))["role"] == "admin"
        apply(sync, upsert("auth0|1", 2, name="Renamed", role="editor"))
        assert only(rows(sync.db, "users"))["role"] == "editor"


class TestPoisonRecords:
    def test_bad_records_are_isolated_and_the_rest_commits(self, sync: BoundEngine) -> None:
        batch = [upsert(f"auth0|{i}", 0) for i in range(10)]
        batch[3] = upsert("auth0|3", 0, email="not-an-email")  # violates a constraint
        batch[7] = upsert("auth0|7", 0, name="bad\x00name")  # malformed field
        result = apply(sync, *batch, cursor=("auth0", {"log_id": "9"}))
        assert result.counts == {"created": 8, "failed": 2}
        assert len(rows(sync.db, "users")) == 8
        failed = {a["external_id"]: a["error"] for a in audit(sync.db, action="failed")}
        assert set(failed) == {"auth0|3", "auth0|7"}
        assert "email_shape" in failed["auth0|3"]
        assert "NUL" in failed["auth0|7"]
        assert load_cursor(sync.db, "auth0") == {"log_id": "9"}

    def test_a_batch_of_only_bad_records_commits_their_failures(self, sync: BoundEngine) -> None:
        result = apply(sync, upsert("auth0|1", email="x"), upsert("auth0|2", email="y"))
        assert result.counts == {"failed": 2}
        assert rows(sync.db, "users") == []
        assert len(audit(sync.db, action="failed")) == 2


class TestTransactions:
    def test_cursor_is_saved_with_the_batch(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1"), cursor=("auth0", {"log_id": "5"}))
        assert load_cursor(sync.db, "auth0") == {"log_id": "5"}

    def test_dry_run_writes_nothing(self, sync: BoundEngine) -> None:
        result = apply(
            sync,
            upsert("auth0|1"),
            cursor=("auth0", {"log_id": "5"}),
            dry_run=True,
        )
        assert result.counts == {"created": 1}
        assert rows(sync.db, "users") == []
        assert audit(sync.db) == []
        assert load_cursor(sync.db, "auth0") is None

    def test_large_batch_stays_under_bind_parameter_limits(self, sync: BoundEngine) -> None:
        batch = [upsert(f"auth0|{i}", 0) for i in range(5000)]
        assert apply(sync, *batch).counts == {"created": 5000}
        changed = [upsert(f"auth0|{i}", 1, name=f"N{i}") for i in range(5000)]
        assert apply(sync, *changed).counts == {"updated": 5000}


class TestLogins:
    def test_login_records_session_and_last_login(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 0))
        result = apply(sync, login("auth0|1", "log-1", 5, expires_in_minutes=60))
        assert result.counts == {"login": 1}
        session = only(rows(sync.db, "user_sessions"))
        assert (session["external_session_id"], session["expires_at"]) == ("log-1", at(65))
        assert only(rows(sync.db, "users"))["last_login_at"] == at(5)

    def test_same_login_twice_writes_once(self, sync: BoundEngine) -> None:
        apply(sync, upsert("auth0|1", 0))
        apply(sync, login("auth0|1", "log-1", 5))
        assert apply(sync, login("auth0|1", "log-1", 5)).counts == {"unchanged": 1}
        assert len(audit(sync.db, action="login")) == 1

    def test_login_of_unknown_identity_is_recorded_as_failed(self, sync: BoundEngine) -> None:
        assert apply(sync, login("auth0|404", "log-1", 5)).counts == {"failed": 1}

    def test_a_sign_in_without_a_session_moves_last_login_only(self, sync: BoundEngine) -> None:
        """A sign-in that names no session (Auth.js signIn) writes no session row: one per
        sign-in would never expire nor be revoked. An older one moves nothing back; a batch
        keeps the newest of an identity's; an unknown identity's fails like any login."""
        apply(sync, upsert("auth0|1", 0))
        result = apply(sync, sign_in("auth0|1", 5, "ev-1"))
        assert result.counts == {"login": 1}
        assert rows(sync.db, "user_sessions") == []
        assert only(rows(sync.db, "users"))["last_login_at"] == at(5)
        (entry,) = audit(sync.db, action="login")
        assert entry["event_id"] == "ev-1"
        assert entry["changes"] == {"last_login_at": [None, at(5).isoformat()]}
        assert apply(sync, sign_in("auth0|1", 3, "ev-0")).counts == {"unchanged": 1}
        assert apply(sync, sign_in("auth0|1", 5, "ev-1")).counts == {"unchanged": 1}
        both = apply(sync, sign_in("auth0|1", 9, "ev-3"), sign_in("auth0|1", 7, "ev-2"))
        assert both.counts == {"login": 1}
        assert only(rows(sync.db, "users"))["last_login_at"] == at(9)
        assert apply(sync, sign_in("auth0|404", 5, "ev-4")).counts == {"failed": 1}
        assert rows(sync.db, "user_sessions") == []

    def test_a_sign_in_beside_its_users_creation(self, sync: BoundEngine) -> None:
        """In the batch that creates the user (a large one takes the bulk path first)."""
        batch = [upsert(f"auth0|{n}", 0) for n in range(300)] + [sign_in("auth0|7", 5, "ev")]
        result = apply(sync, *batch)
        assert result.counts == {"created": 300, "login": 1}
        by_id = {u["email"]: u["last_login_at"] for u in rows(sync.db, "users")}
        assert by_id["auth0-7@example.org"] == at(5)
        assert rows(sync.db, "user_sessions") == []
