"""Thin and versionless deliveries are resolved by re-reading the user from the IdP.

The drainer's lookups are the real adapters talking to the fake IdP servers on loopback:
an Auth0 log names a user only, and a Stack payload carries no version, so the user as the
IdP has it now is what gets applied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine
from svix.webhooks import Webhook

from providers.auth0 import Auth0Provider
from providers.http import HttpPolicy
from providers.stack import StackProvider
from sync_worker.config import Auth0Settings, StackSettings
from tests.daemon_harness import SECRETS, Harness, harness
from tests.factories import audit, rows
from tests.fakes.auth0 import FakeAuth0
from tests.fakes.stack import StackFake

FAST = HttpPolicy(
    connect_timeout=2.0, read_timeout=2.0, max_attempts=2, max_retry_seconds=2.0,
    backoff_base=0.01, backoff_max=0.02,
)  # fmt: skip


@pytest.fixture
def stack() -> Iterator[StackFake]:
    with StackFake() as fake:
        yield fake


def _stack_lookup(fake: StackFake) -> StackProvider:
    settings = StackSettings(
        project_id=fake.project_id, secret_server_key=fake.secret_server_key, base_url=fake.url
    )
    return StackProvider(settings, policy=FAST)


def _send_stack(daemon: Harness, event_type: str, data: dict[str, object], event_id: str) -> int:
    """Sign ``{"type", "data"}`` as Svix does and post it; the HTTP status."""
    body = json.dumps({"type": event_type, "data": data}).encode()
    now = datetime.now(UTC)
    headers = {
        "svix-id": event_id,
        "svix-timestamp": str(int(now.timestamp())),
        "svix-signature": Webhook(SECRETS["stack"]).sign(event_id, now, body.decode()),
        "content-type": "application/json",
    }
    return daemon.post("stack", body, headers).status_code


def test_a_stale_stack_payload_is_resolved_by_re_reading_the_user(
    engine: Engine, stack: StackFake
) -> None:
    user_id = stack.add_user(display_name="Current Name")
    stale = {**stack._render_user(stack.users[user_id]), "display_name": "Stale Name"}
    lookup = _stack_lookup(stack)
    try:
        daemon = harness(engine, lookups={"stack": lookup})
        assert _send_stack(daemon, "user.updated", stale, "msg_late_retry") == 200
        daemon.drain()
    finally:
        lookup.close()
    (user,) = rows(engine, "users")
    assert user["name"] == "Current Name"
    assert [a["event_id"] for a in audit(engine)] == ["msg_late_retry"]


def test_a_stack_user_gone_upstream_is_deleted(engine: Engine, stack: StackFake) -> None:
    user_id = stack.add_user(display_name="Soon Gone")
    record = stack._render_user(stack.users[user_id])
    lookup = _stack_lookup(stack)
    try:
        daemon = harness(engine, lookups={"stack": lookup})
        _send_stack(daemon, "user.created", record, "msg_1")
        daemon.drain()
        stack.delete_user(user_id)
        _send_stack(daemon, "user.updated", record, "msg_2")
        daemon.drain()
    finally:
        lookup.close()
    (user,) = rows(engine, "users")
    assert user["deleted_at"] is not None


def test_an_auth0_log_is_resolved_through_the_management_api(engine: Engine) -> None:
    fake = FakeAuth0(job_polls=0)
    fake.start()
    settings = Auth0Settings(
        domain=fake.domain, client_id=fake.client_id, client_secret=fake.client_secret,
        base_url=fake.url,
    )  # fmt: skip
    lookup = Auth0Provider(settings, policy=FAST, batch_size=10)
    try:
        (user,) = fake.seed_users(1)
        log = {
            "log_id": "90020260000000000001",
            "data": {"type": "ss", "date": user["created_at"], "user_id": user["user_id"]},
        }
        twice = [log, {**log, "log_id": "90020260000000000002"}]  # one re-read serves both
        daemon = harness(engine, lookups={"auth0": lookup})
        body = json.dumps(twice).encode()
        headers = {"content-type": "application/json", "authorization": SECRETS["auth0"]}
        assert daemon.post("auth0", body, headers).json() == {"stored": 2, "duplicates": 0}
        daemon.drain()
    finally:
        lookup.close()
        fake.stop()
    (stored,) = rows(engine, "users")
    assert stored["email"] == user["email"]
    assert [r["status"] for r in daemon.inbox()] == ["done", "done"]
    user_reads = [r for r in fake.requests if r.path.startswith("/api/v2/users/")]
    assert len(user_reads) == 1
