"""Auth0 logins and logouts: the log events' mapping (a table of real-shaped payloads),
through the log pull and Log Streams alike, then through the engine into user_sessions."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from providers.auth0 import login_change, plan_logs
from providers.auth0_webhook import Auth0WebhookReceiver
from sync_worker.changes import ChangeKind, Source, UserChange, utcnow
from sync_worker.jobs.maintenance import cleanup_sessions
from tests.factories import BoundEngine, rows, upsert

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "auth0" / "sessions.json").read_text()
)["cases"]
TOKEN = "5f0c2a7e9b1d4c3a8e6f0b2d4a6c8e1f"
_TIMES = frozenset({"created_at", "last_seen_at", "revoked_at"})


def check(change: UserChange, want: dict[str, Any]) -> None:
    assert change.kind is ChangeKind.LOGIN
    assert (change.external_id, change.event_id) == (want["external_id"], want["event_id"])
    assert change.session is not None
    for name, value in want["session"].items():
        expected = datetime.fromisoformat(value) if name in _TIMES and value else value
        assert getattr(change.session, name) == expected, name


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_session_log_events_from_the_logs_api(case: dict[str, Any]) -> None:
    plan = plan_logs([case["event"]])
    assert (plan.fetch, plan.delete) == ({}, {})
    if case["change"] is None:
        assert plan.logins == ()
        return
    [event] = plan.logins
    check(login_change(event), case["change"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_session_log_events_from_a_log_stream(case: dict[str, Any]) -> None:
    receiver = Auth0WebhookReceiver((TOKEN,))
    event = case["event"]
    body = json.dumps([{"log_id": event["log_id"], "data": event}]).encode()
    [item] = receiver.verify({"Authorization": f"Bearer {TOKEN}"}, body, now=utcnow())
    assert item.ignored is (case["change"] is None)
    work = receiver.to_work(item.payload, event_id=item.event_id, received_at=utcnow())
    if case["change"] is None:
        assert work.changes == ()
        return
    [change] = work.changes
    check(change, case["change"])


def test_login_single_sign_on_and_logout_are_one_session_that_cleanup_removes(
    engine: Engine,
) -> None:
    login, sso, logout = (c["event"] for c in CASES[:3])
    user = login["user_id"]
    sync = BoundEngine(engine)
    sync.apply([upsert(user, -10_000, email="ada@example.org")], source=Source.PULL)
    for event in (login, sso, logout):  # one batch each, as pages of the log would come
        sync.apply([login_change(event)], source=Source.PULL)

    [session] = rows(engine, "user_sessions")
    assert session["external_session_id"] == login["details"]["session_id"]
    assert session["created_at"] == datetime.fromisoformat(login["date"])
    assert (
        session["last_seen_at"] == session["revoked_at"] == datetime.fromisoformat(logout["date"])
    )
    assert (session["ip"], session["user_agent"]) == (logout["ip"], logout["user_agent"])
    assert session["expires_at"] is None  # Auth0 logs do not say; the logout ends it
    [stored] = rows(engine, "users")
    assert stored["last_login_at"] is not None
    logins = [a for a in rows(engine, "sync_audit") if a["action"] == "login"]
    assert len(logins) == 1  # a session opened once; later events update it

    ended = datetime.fromisoformat(logout["date"])
    kept = cleanup_sessions(engine, older_than=ended, batch_size=10, authjs=None)
    assert kept["deleted"] == 0  # revoked at the cutoff, not before it
    gone = cleanup_sessions(
        engine, older_than=ended + timedelta(days=1), batch_size=10, authjs=None
    )
    assert gone["deleted"] == 1
    assert rows(engine, "user_sessions") == []
