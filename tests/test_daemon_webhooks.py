"""The webhook path end to end, in one process: signed delivery -> inbox -> drainer -> engine.

On SQLite and PostgreSQL (the ``engine`` fixture). Deliveries are signed by the real svix
and standardwebhooks libraries (``sync_worker.simulate``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from starlette.types import Message, Scope

from db import inbox
from db.transaction import transaction
from sync_worker.daemon.app import route_path
from sync_worker.daemon.drainer import DrainSettings
from tests.daemon_harness import SECRETS, Harness, harness
from tests.factories import audit, rows


@pytest.fixture
def daemon(engine: Engine) -> Harness:
    return harness(engine)


def live_users(db: Engine) -> list[dict[str, object]]:
    return [u for u in rows(db, "users") if u["deleted_at"] is None]


class TestEveryProvider:
    def test_stack_user_lifecycle(self, daemon: Harness) -> None:
        assert daemon.send("stack", "user.created").status_code == 200
        assert daemon.woken  # the receiver woke the drainer
        daemon.drain()
        (user,) = live_users(daemon.db)
        assert user["email"] == "ada@example.org"
        assert len(rows(daemon.db, "profiles")) == 1
        assert {i["provider"] for i in rows(daemon.db, "user_identities")} >= {"stack"}
        daemon.send("stack", "user.deleted")
        daemon.drain()
        assert live_users(daemon.db) == []
        assert [a["action"] for a in audit(daemon.db)] == ["created", "deleted"]
        assert {a["source"] for a in audit(daemon.db)} == {"webhook"}

    def test_authjs_user_then_sign_in(self, daemon: Harness) -> None:
        daemon.send("authjs", "createUser")
        daemon.send("authjs", "signIn")
        daemon.drain()
        (user,) = live_users(daemon.db)
        assert user["last_login_at"] is not None
        assert rows(daemon.db, "user_sessions") == []  # a sign-in names no session
        assert [a["action"] for a in audit(daemon.db)] == ["created", "login"]

    def test_auth0_event_stream_user_lifecycle(self, daemon: Harness) -> None:
        daemon.send("auth0", "user.created")
        daemon.drain()
        assert len(live_users(daemon.db)) == 1
        daemon.send("auth0", "user.deleted")
        daemon.drain()
        assert live_users(daemon.db) == []

    def test_auth0_log_event_without_api_access_is_done_with_nothing_applied(
        self, daemon: Harness
    ) -> None:
        assert daemon.send("auth0", "ss").status_code == 200  # a thin log: re-read the user
        daemon.drain()
        assert [r["status"] for r in daemon.inbox()] == ["done"]
        assert rows(daemon.db, "users") == []


class TestIdempotence:
    def test_a_redelivery_is_2xx_and_changes_nothing(self, daemon: Harness) -> None:
        first = daemon.send("stack", "user.created", event_id="msg_same")
        daemon.drain()
        before = (rows(daemon.db, "users"), audit(daemon.db), daemon.inbox())
        again = daemon.send("stack", "user.created", event_id="msg_same")
        daemon.drain()
        assert (first.json(), again.json()) == (
            {"stored": 1, "duplicates": 0},
            {"stored": 0, "duplicates": 1},
        )
        assert (rows(daemon.db, "users"), audit(daemon.db), daemon.inbox()) == before

    def test_an_older_update_changes_nothing(self, daemon: Harness) -> None:
        now = datetime.now(UTC)
        daemon.send("auth0", "user.updated", now=now)
        daemon.drain()
        before = rows(daemon.db, "users")
        older = _event_stream(now - timedelta(hours=1), name="Old Name")
        assert daemon.post("auth0", older, _auth0_headers()).status_code == 200
        daemon.drain()
        assert rows(daemon.db, "users") == before
        assert "stale_skipped" in [a["action"] for a in audit(daemon.db)]

    def test_a_thousand_log_items_are_stored_whole_or_not_at_all(self, daemon: Harness) -> None:
        records = [_log(n) for n in range(1000)]
        body = json.dumps([*records[:-1], {**records[-1], "log_id": "x" * 300}]).encode()
        assert daemon.post("auth0", body, _auth0_headers()).status_code == 400
        assert daemon.inbox() == []
        whole = json.dumps(records).encode()
        assert daemon.post("auth0", whole, _auth0_headers()).json() == {
            "stored": 1000,
            "duplicates": 0,
        }
        assert len(daemon.inbox()) == 1000


class TestRejected:
    @pytest.mark.parametrize(
        ("mangle", "status"),
        [
            (lambda h, b: ({**h, "svix-signature": "v1,AAAA"}, b), 401),
            (lambda h, b: ({k: v for k, v in h.items() if k != "svix-id"}, b), 401),
            (lambda h, b: (h, b + b" "), 401),  # tampered body
            (lambda h, b: ({**h, "content-type": "text/plain"}, b), 415),
        ],
        ids=["bad signature", "missing header", "tampered", "content type"],
    )
    def test_bad_requests_store_nothing(self, daemon: Harness, mangle: object, status: int) -> None:
        from sync_worker import simulate

        headers, body = simulate.build(
            "stack", "user.created", email="a@example.org", now=datetime.now(UTC),
            secret=SECRETS["stack"],
        )  # fmt: skip
        headers, body = mangle(headers, body)  # type: ignore[operator]
        assert daemon.post("stack", body, headers).status_code == status
        assert daemon.inbox() == []

    def test_a_malformed_body_well_signed_is_400(self, daemon: Harness) -> None:
        from svix.webhooks import Webhook

        body = b'{"type": "user.created"}'  # no data
        now = datetime.now(UTC)
        signature = Webhook(SECRETS["stack"]).sign("msg_1", now, body.decode())
        headers = {
            "svix-id": "msg_1",
            "svix-timestamp": str(int(now.timestamp())),
            "svix-signature": signature,
            "content-type": "application/json",
        }
        assert daemon.post("stack", body, headers).status_code == 400
        assert daemon.inbox() == []

    def test_an_oversized_body_is_refused_without_being_read_whole(self, engine: Engine) -> None:
        """Straight through ASGI: the body comes 64 KiB at a time, 64 MiB offered, and the
        app stops asking for more once past the limit (no Content-Length to go by)."""
        small = harness(engine, max_body_bytes=4096)
        asked = 0

        async def receive() -> dict[str, object]:
            nonlocal asked
            asked += 1
            return {"type": "http.request", "body": b" " * 65536, "more_body": asked < 1024}

        scope = post_scope("/webhooks/auth0", authorization=SECRETS["auth0"])
        sent = served(small, scope, receive)
        assert sent[0]["status"] == 413
        assert asked <= 2  # 64 KiB read, not 64 MiB
        assert small.inbox() == []

    def test_a_webhook_below_a_root_path_is_answered_by_its_receiver(self, engine: Engine) -> None:
        """Behind a proxy that mounts the app at ``/sync`` (ASGI ``root_path``), a POST to
        ``/sync/webhooks/auth0`` is the Auth0 receiver's: without its token, 401."""
        daemon = harness(engine)

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"[]", "more_body": False}

        sent = served(daemon, post_scope("/sync/webhooks/auth0", root_path="/sync"), receive)
        assert sent[0]["status"] == 401
        assert daemon.inbox() == []

    def test_a_declared_oversized_body_is_refused_at_once(self, engine: Engine) -> None:
        small = harness(engine, max_body_bytes=4096)
        response = small.post("auth0", b"[]" + b" " * 5000, _auth0_headers())
        assert response.status_code == 413

    def test_an_endpoint_without_a_secret_is_404(self, engine: Engine) -> None:
        off = harness(engine, receivers={})
        assert off.send("stack", "user.created").status_code == 404
        assert off.client.post("/webhooks/nope", content=b"{}").status_code == 404


def post_scope(path: str, *, root_path: str = "", authorization: str = "") -> Scope:
    """The ASGI scope of a JSON POST to ``path`` (for tests that drive the app directly)."""
    headers = [(b"content-type", b"application/json")]
    if authorization:
        headers.append((b"authorization", authorization.encode()))
    return {
        "type": "http", "method": "POST", "path": path, "raw_path": b"", "query_string": b"",
        "root_path": root_path, "scheme": "http", "http_version": "1.1",
        "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 1), "headers": headers,
    }  # fmt: skip


def served(
    daemon: Harness, scope: Scope, receive: Callable[[], Awaitable[dict[str, object]]]
) -> list[Message]:
    """The messages the app sends for one request, driven straight through ASGI."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def request() -> None:
        await daemon.client.app(scope, receive, send)

    asyncio.run(request())
    return sent


class TestPoison:
    def test_a_poison_row_goes_dead_without_blocking_others_and_replay_revives_it(
        self, engine: Engine
    ) -> None:
        daemon = harness(engine, drain=DrainSettings(max_attempts=2))
        daemon.send("stack", "user.created", email="good@example.org")
        with transaction(engine) as conn:  # a stored payload no code can apply
            inbox.store(conn, "stack", [inbox.Delivery(event_id="poison", payload={"x": 1})],
                        now=datetime.now(UTC))  # fmt: skip
        daemon.send("stack", "user.created", email="also-good@example.org")
        daemon.drain()
        statuses = {r["event_id"]: r["status"] for r in daemon.inbox()}
        assert statuses.pop("poison") == "dead"
        assert set(statuses.values()) == {"done"}
        assert len(live_users(engine)) == 2
        with transaction(engine) as conn:
            assert inbox.replay(conn, now=datetime.now(UTC), statuses=("dead",)) == 1
        assert [r["status"] for r in daemon.inbox() if r["event_id"] == "poison"] == ["pending"]


class TestOperations:
    def test_health_readiness_and_metrics(self, daemon: Harness) -> None:
        assert daemon.client.get("/healthz").json() == {"status": "ok"}
        assert daemon.client.get("/readyz").status_code == 200
        daemon.send("stack", "user.created")
        daemon.send("stack", "user.created", event_id="x", email="b@example.org")
        daemon.post("stack", b"{}", {"content-type": "application/json"})
        daemon.drain()
        text = daemon.client.get("/metrics").text
        for line in (
            'sync_worker_webhook_requests_total{provider="stack",status="200"} 2.0',
            'sync_worker_webhook_requests_total{provider="stack",status="401"} 1.0',
            'sync_worker_inbox_rows{status="done"} 2.0',
            "sync_worker_inbox_oldest_pending_seconds 0.0",
            'sync_worker_changes_applied_total{action="created",provider="stack"} 2.0',
            "sync_worker_apply_seconds_count",
            'sync_worker_last_delivery_timestamp_seconds{provider="stack"}',
        ):
            assert line in text, line

    def test_readiness_reports_a_stalled_loop(self, engine: Engine) -> None:
        from fastapi.testclient import TestClient

        from sync_worker.daemon.app import Health, create_app
        from sync_worker.daemon.metrics import Metrics

        app = create_app(
            engine, {}, Metrics(engine), health=Health(heartbeats=lambda: {"drainer": 120.0})
        )
        response = TestClient(app).get("/readyz")
        assert response.status_code == 503
        assert response.json()["problems"] == ["drainer: stalled"]


def _auth0_headers() -> dict[str, str]:
    return {"content-type": "application/json", "authorization": SECRETS["auth0"]}


def _log(n: int) -> dict[str, object]:
    return {
        "log_id": f"9000{n:06d}",
        "data": {"type": "fp", "date": "2026-11-28T10:00:00.000Z", "user_id": f"auth0|{n}"},
    }


def _event_stream(updated: datetime, *, name: str) -> bytes:
    from sync_worker import simulate

    _, body = simulate.build(
        "auth0", "user.updated", email="ada@example.org", now=updated, secret=SECRETS["auth0"]
    )
    event = json.loads(body)
    event["id"] = "evt-older"
    event["data"]["object"]["name"] = name
    event["data"]["object"]["updated_at"] = updated.isoformat()
    return json.dumps(event).encode()


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("/webhooks/stack", "", "/webhooks/stack"),
        ("/sync/webhooks/stack", "/sync", "/webhooks/stack"),
        ("/sync", "/sync", ""),
        ("/syncer/webhooks/stack", "/sync", "/syncer/webhooks/stack"),  # not below /sync
        ("/other/webhooks/stack", "/sync", "/other/webhooks/stack"),
    ],
)
def test_the_route_path_is_the_path_below_the_root_path(
    path: str, root: str, expected: str
) -> None:
    assert route_path({"type": "http", "path": path, "root_path": root}) == expected
