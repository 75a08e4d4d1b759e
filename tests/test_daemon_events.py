"""Every event ``simulate`` knows, of every provider, end to end: signed, stored, drained,
and the rows it should leave (users, profiles, identities, sessions, audit).

Each event follows the creation of its user (as it would upstream), so what is checked is
that event's own effect. Thin events that only re-read the user (Auth0 ``ss``, Stack team
memberships) need API access, which this harness does not give: they are done with nothing
applied, as the drainer documents (tests/test_daemon_reread.py covers the re-read).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from sync_worker import simulate
from tests.daemon_harness import Harness, harness
from tests.factories import audit, rows

CREATE = {"stack": "user.created", "authjs": "createUser", "auth0": "user.created"}
EVENTS = [(p, e) for p, events in simulate.EVENTS.items() for e in events]


def _live(db: Engine) -> list[dict[str, object]]:
    return [u for u in rows(db, "users") if u["deleted_at"] is None]


def _check(daemon: Harness, provider: str, event: str) -> None:
    db = daemon.db
    actions = [a["action"] for a in audit(db)]
    if event in ("user.deleted", "sdu"):
        assert _live(db) == []
        assert actions[-1] == "deleted", actions
        return
    (user,) = _live(db)
    assert len(rows(db, "profiles")) == 1
    assert any(i["provider"] == provider for i in rows(db, "user_identities"))
    if event == "signIn":  # names no session: last_login_at alone
        assert rows(db, "user_sessions") == []
        assert user["last_login_at"] is not None
        assert actions[-1] == "login"
    elif event == "s":
        (session,) = rows(db, "user_sessions")
        assert user["last_login_at"] is not None
        assert session["revoked_at"] is None
        assert actions[-1] == "login"
    elif event == "signOut":
        (session,) = rows(db, "user_sessions")
        assert session["revoked_at"] is not None
    elif event in ("user.updated", "updateUser"):
        assert actions[-1] in ("updated", "created"), actions  # "created": same content
    elif event == "linkAccount":
        assert actions == ["created"]  # an event names one account: nothing removed
    else:
        assert actions[0] == "created"


@pytest.mark.parametrize(("provider", "event"), EVENTS, ids=[f"{p}-{e}" for p, e in EVENTS])
def test_every_event_applies(engine: Engine, provider: str, event: str) -> None:
    daemon = harness(engine)
    now = datetime.now(UTC)
    assert daemon.send(provider, CREATE[provider], now=now - timedelta(seconds=2)).is_success
    daemon.drain()
    if event != CREATE[provider]:
        assert daemon.send(provider, event, now=now).is_success
        daemon.drain()
    assert {r["status"] for r in daemon.inbox()} == {"done"}
    _check(daemon, provider, event)
