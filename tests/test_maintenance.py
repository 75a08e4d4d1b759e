"""The housekeeping jobs against real databases: profile backfill, session cleanup and
retention, as functions and as CLI commands."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update

from db import inbox
from db.inbox import Delivery
from db.tables import profiles, sync_audit, sync_inbox, sync_runs, user_sessions, users
from db.transaction import transaction
from providers.authjs import AuthjsProvider
from sync_worker.cli import main
from sync_worker.config import AuthjsSettings, RetentionSettings
from sync_worker.jobs.maintenance import (
    backfill_profiles,
    cleanup_sessions,
    idle_cutoff,
    purge_retention,
)
from tests.factories import rows
from tests.fakes.authjs import make_loader

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DEFAULTS = {"timezone": "Europe/Paris", "currency": "EUR", "locale": "fr", "settings": {"a": 1}}


def days(n: float) -> timedelta:
    return timedelta(days=n)


def add_user(engine: Engine, name: str | None = "Ada Lovelace", **fields: Any) -> uuid.UUID:
    """A user as a legacy database holds it: inserted directly, without a profile."""
    user_id = uuid.uuid4()
    values = {"id": user_id, "name": name, "created_at": NOW - days(400), "updated_at": NOW}
    with engine.begin() as conn:
        conn.execute(insert(users).values(**values, **fields))
    return user_id


def add_profile(engine: Engine, user_id: uuid.UUID, **fields: Any) -> None:
    values = {"id": uuid.uuid4(), "user_id": user_id, "created_at": NOW, "updated_at": NOW}
    with engine.begin() as conn:
        conn.execute(insert(profiles).values(**values, **fields))


def profile_of(engine: Engine, user_id: uuid.UUID) -> dict[str, Any]:
    [profile] = rows(engine, "profiles", user_id=user_id)
    return profile


# -- profile backfill ---------------------------------------------------------------------


def test_backfill_gives_every_user_one_profile_with_the_defaults(engine: Engine) -> None:
    ada = add_user(engine, avatar_url="https://example.org/ada.png")
    nameless = add_user(engine, name=None)
    gone = add_user(engine, name="Gone", deleted_at=NOW - days(3))  # soft-deleted: still a user
    kept = add_user(engine, name="Kept")
    add_profile(engine, kept, timezone="Asia/Tokyo", display_name="Mine")
    more = [add_user(engine, name=f"User {i}") for i in range(4)]

    counts = backfill_profiles(engine, defaults=DEFAULTS, batch_size=2, now=NOW)

    assert counts == {"created": 7, "users": 8}
    assert len(rows(engine, "profiles")) == 8
    profile = profile_of(engine, ada)
    assert (profile["display_name"], profile["avatar_url"]) == (
        "Ada Lovelace",
        "https://example.org/ada.png",
    )
    assert (profile["timezone"], profile["currency"], profile["locale"]) == (
        "Europe/Paris",
        "EUR",
        "fr",
    )
    assert profile["settings"] == {"a": 1}
    assert profile["created_at"] == profile["updated_at"] == NOW
    assert profile_of(engine, nameless)["display_name"] is None
    assert profile_of(engine, gone)["display_name"] == "Gone"
    assert (profile_of(engine, kept)["timezone"], profile_of(engine, kept)["display_name"]) == (
        "Asia/Tokyo",
        "Mine",
    )  # an existing profile is left alone
    audit = rows(engine, "sync_audit")
    assert {a["user_id"] for a in audit} == {ada, nameless, gone, *more}
    assert {(a["action"], a["source"], a["provider"]) for a in audit} == {
        ("profile_created", "backfill", "sync-worker")
    }
    [ada_audit] = [a for a in audit if a["user_id"] == ada]
    assert ada_audit["changes"] == {
        "profile.display_name": [None, "Ada Lovelace"],
        "profile.avatar_url": [None, "https://example.org/ada.png"],
        "profile.timezone": [None, "Europe/Paris"],
        "profile.currency": [None, "EUR"],
        "profile.locale": [None, "fr"],
        "profile.settings": [None, {"a": 1}],
    }
    assert ada_audit["occurred_at"] == NOW
    [nameless_audit] = [a for a in audit if a["user_id"] == nameless]
    assert "profile.display_name" not in nameless_audit["changes"]


def test_backfill_twice_creates_nothing_the_second_time(engine: Engine) -> None:
    for i in range(5):
        add_user(engine, name=f"User {i}")
    assert backfill_profiles(engine, defaults={}, batch_size=5, now=NOW) == {
        "created": 5,
        "users": 5,
    }
    assert backfill_profiles(engine, defaults={}, batch_size=5, now=NOW) == {
        "created": 0,
        "users": 5,
    }
    assert len(rows(engine, "sync_audit")) == 5
    shipped = {(p["timezone"], p["currency"], p["locale"]) for p in rows(engine, "profiles")}
    assert shipped == {("UTC", "USD", "en")}  # the engine's fallbacks without defaults


def test_backfill_of_an_empty_database(engine: Engine) -> None:
    assert backfill_profiles(engine, defaults=DEFAULTS, batch_size=10, now=NOW) == {
        "created": 0,
        "users": 0,
    }


@pytest.mark.parametrize("size", [0, 10_001])
def test_batch_size_out_of_bounds_is_refused(engine: Engine, size: int) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        backfill_profiles(engine, defaults={}, batch_size=size, now=NOW)
    with pytest.raises(ValueError, match="batch_size"):
        cleanup_sessions(engine, older_than=NOW, batch_size=size, authjs=None)
    with pytest.raises(ValueError, match="batch_size"):
        purge_retention(engine, audit_before=NOW, inbox_done_before=NOW, batch_size=size)


# -- session cleanup ----------------------------------------------------------------------


def add_session(
    engine: Engine,
    user_id: uuid.UUID,
    name: str,
    *,
    expires: datetime | None = None,
    revoked: datetime | None = None,
    created: datetime | None = None,
    seen: datetime | None = None,
) -> None:
    values = {
        "id": uuid.uuid4(),
        "user_id": user_id,
        "provider": "auth0",
        "external_session_id": name,
        "created_at": created or NOW - days(90),
        "last_seen_at": seen,
        "expires_at": expires,
        "revoked_at": revoked,
    }
    with engine.begin() as conn:
        conn.execute(insert(user_sessions).values(**values))


def session_names(engine: Engine) -> set[str]:
    return {s["external_session_id"] for s in rows(engine, "user_sessions")}


def test_cleanup_deletes_sessions_ended_before_the_cutoff_only(engine: Engine) -> None:
    user = add_user(engine)
    cutoff = NOW - days(30)
    gone = {
        "expired-long-ago": {"expires": cutoff - days(1)},
        "expired-and-revoked": {"expires": cutoff - days(5), "revoked": cutoff - days(6)},
        "revoked-long-ago": {"revoked": cutoff - days(2)},  # an Auth0 session: no expiry
        "revoked-not-expired": {"expires": NOW + days(5), "revoked": cutoff - timedelta(seconds=1)},
    }
    kept = {
        "live": {"expires": NOW + days(1)},
        "expired-recently": {"expires": cutoff + days(1)},
        "revoked-recently": {"revoked": cutoff + days(1)},
        "never-ends": {},
    }
    for name, ends in {**gone, **kept}.items():
        add_session(engine, user, name, **ends)
    for i in range(7):  # enough rows for several windows and batches
        add_session(engine, user, f"old-{i}", expires=cutoff - days(i + 1))
        add_session(engine, user, f"new-{i}", expires=NOW + days(i + 1))

    counts = cleanup_sessions(engine, older_than=cutoff, batch_size=3, authjs=None)

    assert counts == {"deleted": len(gone) + 7, "authjs_deleted": 0}
    assert session_names(engine) == set(kept) | {f"new-{i}" for i in range(7)}
    again = cleanup_sessions(engine, older_than=cutoff, batch_size=3, authjs=None)
    assert again == {"deleted": 0, "authjs_deleted": 0}


def test_sessions_stating_no_expiry_end_when_idle_longer_than_any_upstream_allows(
    engine: Engine,
) -> None:
    """An Auth0 login's session states no expiry: once unseen for ``idle_sessions`` (then
    kept ``sessions`` like any ended one), it is deleted; one seen since, or one that states
    an expiry, is not. ``idle_before`` None (``off``) keeps them all."""
    user = add_user(engine)
    retention = RetentionSettings.model_validate({"sessions": "30d", "idle_sessions": "100d"})
    cutoff = idle_cutoff(retention, NOW)
    assert cutoff == NOW - days(130)
    gone: dict[str, dict[str, Any]] = {
        "idle-long-ago": {"created": NOW - days(400), "seen": cutoff - days(1)},
        "idle-never-seen-again": {"created": cutoff - days(1), "seen": None},
    }
    kept: dict[str, dict[str, Any]] = {
        "seen-lately": {"created": NOW - days(400), "seen": cutoff + days(1)},
        "idle-but-expires-later": {"created": NOW - days(400), "expires": NOW + days(1)},
        "created-lately-never-seen": {"created": cutoff + days(1)},
    }
    for name, shape in {**gone, **kept}.items():
        add_session(engine, user, name, **shape)
    off = cleanup_sessions(engine, older_than=NOW - days(30), batch_size=2, authjs=None)
    assert off["deleted"] == 0
    counts = cleanup_sessions(
        engine, older_than=NOW - days(30), batch_size=2, authjs=None, idle_before=cutoff
    )
    assert counts == {"deleted": len(gone), "authjs_deleted": 0}
    assert session_names(engine) == set(kept)
    assert idle_cutoff(RetentionSettings.model_validate({"idle_sessions": "off"}), NOW) is None


@pytest.mark.parametrize("flavour", ["pg", "prisma"])
def test_cleanup_also_empties_the_authjs_sessions_table(
    pg_engine: Engine, make_pg_database: Callable[[], str], flavour: str
) -> None:
    add_session(pg_engine, add_user(pg_engine), "worker-expired", expires=NOW - days(40))
    app_url = make_pg_database()
    with make_loader(flavour, app_url) as loader:
        people = loader.populate(25, seed=7, now=NOW)
        ends = [s.expires for u in people for s in u.sessions]
        cutoff = NOW - days(1)
        expired = sum(1 for e in ends if e < cutoff)
        assert expired > 3
        assert len(ends) > expired  # some live ones to leave alone
        settings = AuthjsSettings.model_validate({"database_url": app_url, "schema": flavour})
        authjs = AuthjsProvider(settings, batch_size=4)
        try:
            counts = cleanup_sessions(pg_engine, older_than=cutoff, batch_size=3, authjs=authjs)
            assert authjs.expired_sessions(cutoff) == 0
        finally:
            authjs.close()
        assert counts == {"deleted": 1, "authjs_deleted": expired}
        table = loader.session_table
        assert loader.execute(f'SELECT count(*) FROM "{table}"') == [(len(ends) - expired,)]


# -- retention ----------------------------------------------------------------------------


def add_audit(engine: Engine, *ages_in_days: float) -> None:
    """Audit rows in insertion (id) order, each ``age`` days old."""
    values = [
        {
            "occurred_at": NOW - days(age),
            "source": "pull",
            "provider": "auth0",
            "external_id": f"auth0|{i}",
            "action": "updated",
        }
        for i, age in enumerate(ages_in_days)
    ]
    with engine.begin() as conn:
        conn.execute(insert(sync_audit), values)


def audit_ages(engine: Engine) -> list[float]:
    with engine.connect() as conn:
        times = conn.execute(select(sync_audit.c.occurred_at).order_by(sync_audit.c.id)).scalars()
        return [(NOW - t) / days(1) for t in times]


def test_retention_purges_old_audit_rows_and_keeps_recent_ones(engine: Engine) -> None:
    # Ids follow time, but not exactly (concurrent batches): a 399-day row sits among older
    # ones, and a 401-day row comes after a window of recent ones.
    ages = [500, 480, 450, 430, 420, 410, 405, 399, 402, 401.5, 300, 200, 150, 100, 50, 401, 1, 0]
    add_audit(engine, *ages)
    counts = purge_retention(
        engine, audit_before=NOW - days(400), inbox_done_before=NOW - days(3), batch_size=3
    )
    # Every row younger than the cutoff is kept; the old ones went, bar the one past the
    # boundary, which goes on a later run.
    assert audit_ages(engine) == [399, 300, 200, 150, 100, 50, 401, 1, 0]
    assert counts == {"audit_deleted": 9, "inbox_deleted": 0}
    again = purge_retention(
        engine, audit_before=NOW - days(100), inbox_done_before=NOW - days(3), batch_size=3
    )
    assert again["audit_deleted"] == 5
    assert audit_ages(engine) == [100, 50, 1, 0]


def test_audit_retention_off_keeps_every_row(engine: Engine) -> None:
    add_audit(engine, 5000, 800, 1)
    counts = purge_retention(
        engine, audit_before=None, inbox_done_before=NOW - days(3), batch_size=2
    )
    assert counts == {"audit_deleted": 0, "inbox_deleted": 0}
    assert audit_ages(engine) == [5000, 800, 1]


def store(engine: Engine, event_ids: list[str], *, at: datetime, ignored: bool = False) -> int:
    status: Any = "ignored" if ignored else "pending"
    items = [Delivery(e, {"id": e}, event_type="user.updated", status=status) for e in event_ids]
    with transaction(engine) as conn:
        return inbox.store(conn, "stack", items, now=at).duplicates


def finish(engine: Engine, event_ids: list[str], *, at: datetime) -> None:
    with transaction(engine) as conn:
        conn.execute(
            update(sync_inbox)
            .where(sync_inbox.c.event_id.in_(event_ids))
            .values(status="done", processed_at=at)
        )


def inbox_ids(engine: Engine) -> set[str]:
    return {r["event_id"] for r in rows(engine, "sync_inbox")}


def test_retention_purges_done_inbox_rows_and_still_recognises_recent_redeliveries(
    engine: Engine,
) -> None:
    store(engine, ["old-done", "old-pending", "recent-done"], at=NOW - days(10))
    store(engine, ["old-ignored"], at=NOW - days(9), ignored=True)
    store(engine, [f"old-{i}" for i in range(5)], at=NOW - days(8))
    finish(engine, ["old-done", *(f"old-{i}" for i in range(5))], at=NOW - days(8))
    finish(engine, ["recent-done"], at=NOW - days(1))
    counts = purge_retention(
        engine, audit_before=NOW - days(365), inbox_done_before=NOW - days(3), batch_size=2
    )
    assert counts == {"audit_deleted": 0, "inbox_deleted": 7}
    assert inbox_ids(engine) == {"old-pending", "recent-done"}  # pending rows are never purged
    # A late redelivery within the retention window is still a duplicate...
    assert store(engine, ["recent-done"], at=NOW) == 1
    # ...while one of a purged row, beyond every sender's retries, would be stored anew.
    assert store(engine, ["old-done"], at=NOW) == 0


# -- the commands -------------------------------------------------------------------------


@pytest.fixture
def cli(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """The CLI pointed at ``engine``'s database (migrated, empty)."""
    for name in ("AUTH0_DOMAIN", "STACK_PROJECT_ID", "AUTHJS_DATABASE_URL", "SYNC_WORKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", engine.url.render_as_string(hide_password=False))
    return engine


def runs(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        found = conn.execute(select(sync_runs).order_by(sync_runs.c.started_at)).mappings()
        return [dict(r) for r in found]


def test_backfill_profiles_command(cli: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        add_user(cli, name=f"User {i}")
    assert main(["backfill-profiles"]) == 0
    assert capsys.readouterr().out == "3 profiles created (3 users)\n"
    assert main(["backfill-profiles"]) == 0
    assert capsys.readouterr().out == "all 3 users already have profiles\n"
    recorded = runs(cli)
    assert [(r["kind"], r["status"]) for r in recorded] == [("backfill_profiles", "succeeded")] * 2
    assert recorded[0]["counts"] == {"created": 3, "users": 3}
    assert {p["timezone"] for p in rows(cli, "profiles")} == {"UTC"}  # config.yaml's defaults
    # Each profile's audit row names the run that created it (the first, which created all).
    made = [r["id"] for r in recorded if r["counts"]["created"] == 3]
    assert {a["run_id"] for a in rows(cli, "sync_audit")} == set(made)


def test_cleanup_sessions_command(cli: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    user = add_user(cli)
    now = datetime.now(UTC)
    add_session(cli, user, "ended", expires=now - days(31))  # retention.sessions: 30d
    add_session(cli, user, "recent", expires=now - days(29))
    assert main(["cleanup-sessions"]) == 0
    assert capsys.readouterr().out == "1 ended sessions deleted\n"
    assert session_names(cli) == {"recent"}
    [run] = runs(cli)
    assert (run["kind"], run["status"], run["counts"]) == (
        "session_cleanup",
        "succeeded",
        {"deleted": 1, "authjs_deleted": 0},
    )


@pytest.fixture
def config_with(tmp_path: Path) -> Callable[[str], str]:
    def write(extra: str) -> str:
        path = tmp_path / "config.yaml"
        path.write_text("database:\n  url: sqlite:///unused.db\n" + extra)
        return str(path)

    return write


def test_cleanup_sessions_command_with_authjs(
    pg_engine: Engine,
    make_pg_database: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    config_with: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_engine.url.render_as_string(hide_password=False))
    app_url = make_pg_database()
    with make_loader("drizzle", app_url) as loader:
        people = loader.populate(20, seed=2, now=datetime.now(UTC))
        ends = [s.expires for u in people for s in u.sessions]
        cutoff = datetime.now(UTC) - days(30)
        expired = sum(1 for e in ends if e < cutoff)
        assert 0 < expired < len(ends)
        path = config_with(
            "retention:\n  authjs_sessions: true\n"
            f"providers:\n  authjs:\n    database_url: {app_url}\n    schema: drizzle\n"
        )
        assert main(["--config", path, "cleanup-sessions"]) == 0
        assert capsys.readouterr().out == (
            f"0 ended sessions deleted; {expired} expired Auth.js sessions deleted\n"
        )
        count = loader.execute(f'SELECT count(*) FROM "{loader.session_table}"')
        assert count == [(len(ends) - expired,)]


def test_cleanup_sessions_with_authjs_on_but_no_database_is_a_usage_error(
    cli: Engine, config_with: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["--config", config_with("retention:\n  authjs_sessions: true\n"), "cleanup-sessions"])
        == 2
    )
    err = capsys.readouterr().err
    assert "retention.authjs_sessions" in err
    assert "AUTHJS_DATABASE_URL" in err


def test_a_failed_job_is_recorded_as_failed(
    pg_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    config_with: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_engine.url.render_as_string(hide_password=False))
    add_user(pg_engine)
    path = config_with("profile:\n  defaults: {currency: EURO}\n")  # wider than its column
    assert main(["--config", path, "backfill-profiles"]) == 1
    assert "database refused the record" in capsys.readouterr().err
    [run] = runs(pg_engine)
    assert (run["kind"], run["status"]) == ("backfill_profiles", "failed")
    assert run["error"].startswith("database refused the record")
    assert rows(pg_engine, "profiles") == []


def test_command_help_lists_the_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for name in ("backfill-profiles", "cleanup-sessions", "export-user"):
        assert name in out
