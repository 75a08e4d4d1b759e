"""simulate: every built event is accepted by the matching receiver; post delivers verbatim."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from providers.auth0_webhook import Auth0WebhookReceiver
from providers.authjs_webhook import AuthjsWebhookReceiver
from providers.stack_webhook import StackWebhookReceiver
from providers.webhook import WebhookReceiver, secrets_from
from sync_worker.changes import ChangeKind, utcnow
from sync_worker.errors import ConfigError, WebhookVerificationError
from sync_worker.simulate import (
    EVENTS,
    DeliveryError,
    UnknownEventError,
    build,
    endpoint,
    post,
)
from tests.webhook_cases import new_secret

SECRET = new_secret()
TOKEN = "simulate-token-0123456789abcdef"
EMAIL = "grace.hopper@example.com"
RECEIVED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PAIRS = [(provider, event) for provider, events in EVENTS.items() for event in events]
# What each simulated event becomes: (change kinds, how many users fetched).
EXPECTED: dict[tuple[str, str], tuple[tuple[ChangeKind, ...], int]] = {
    ("stack", "user.created"): ((ChangeKind.UPSERT,), 0),
    ("stack", "user.updated"): ((ChangeKind.UPSERT,), 0),
    ("stack", "user.deleted"): ((ChangeKind.DELETE,), 0),
    ("stack", "team_membership.created"): ((), 1),
    ("auth0", "ss"): ((), 1),
    ("auth0", "s"): ((ChangeKind.LOGIN,), 0),
    ("auth0", "sdu"): ((ChangeKind.DELETE,), 0),
    ("auth0", "user.created"): ((ChangeKind.UPSERT,), 0),
    ("auth0", "user.updated"): ((ChangeKind.UPSERT,), 0),
    ("auth0", "user.deleted"): ((ChangeKind.DELETE,), 0),
    ("authjs", "createUser"): ((ChangeKind.UPSERT,), 0),
    ("authjs", "updateUser"): ((ChangeKind.UPSERT,), 0),
    ("authjs", "signIn"): ((ChangeKind.LOGIN,), 0),
    ("authjs", "signOut"): ((ChangeKind.LOGIN,), 0),
    ("authjs", "linkAccount"): ((ChangeKind.UPSERT,), 1),
}


def receiver(provider: str, secret: str = SECRET, token: str = TOKEN) -> WebhookReceiver:
    if provider == "stack":
        return StackWebhookReceiver(secrets_from(secret))
    if provider == "authjs":
        return AuthjsWebhookReceiver(secrets_from(secret))
    return Auth0WebhookReceiver(secrets_from(token))


def secret_for(provider: str) -> str:
    return TOKEN if provider == "auth0" else SECRET


def test_every_event_is_covered() -> None:
    assert set(PAIRS) == set(EXPECTED)


@pytest.mark.parametrize(("provider", "event"), PAIRS, ids=str)
def test_round_trip(provider: str, event: str) -> None:
    now = utcnow()
    headers, body = build(provider, event, email=EMAIL, now=now, secret=secret_for(provider))
    assert headers["content-type"] == "application/json"
    rx = receiver(provider)
    [item] = rx.verify(headers, body, now=now)
    assert not item.ignored
    assert item.event_type == event
    work = rx.to_work(item.payload, event_id=item.event_id, received_at=RECEIVED)
    kinds, fetched = EXPECTED[provider, event]
    assert tuple(c.kind for c in work.changes) == kinds
    assert len(work.fetch) == fetched


@pytest.mark.parametrize("provider", list(EVENTS))
def test_one_email_is_one_user_across_events(provider: str) -> None:
    users = set()
    for event in EVENTS[provider]:
        headers, body = build(
            provider, event, email=EMAIL, now=utcnow(), secret=secret_for(provider)
        )
        rx = receiver(provider)
        [item] = rx.verify(headers, body, now=utcnow())
        work = rx.to_work(item.payload, event_id=item.event_id, received_at=RECEIVED)
        users |= {c.external_id for c in work.changes} | set(work.fetch)
    assert len(users) == 1


def test_event_ids_are_new_each_time_unless_given() -> None:
    ids = set()
    for _ in range(3):
        headers, _ = build("stack", "user.created", email=EMAIL, now=utcnow(), secret=SECRET)
        ids.add(headers["svix-id"])
    assert len(ids) == 3
    headers, _ = build(
        "authjs", "signIn", email=EMAIL, now=utcnow(), secret=SECRET, event_id="msg_fixed"
    )
    assert headers["webhook-id"] == "msg_fixed"
    _, log_body = build("auth0", "s", email=EMAIL, now=utcnow(), secret=TOKEN, event_id="9002")
    assert json.loads(log_body)[0]["log_id"] == "9002"


def test_signed_with_the_first_of_several_secrets() -> None:
    first, second = new_secret(), new_secret()
    headers, body = build(
        "stack", "user.updated", email=EMAIL, now=utcnow(), secret=f"{first} {second}"
    )
    assert receiver("stack", first).verify(headers, body, now=utcnow())
    with pytest.raises(WebhookVerificationError):
        receiver("stack", second).verify(headers, body, now=utcnow())


def test_signature_is_bound_to_the_time() -> None:
    then = utcnow() - timedelta(minutes=10)
    headers, body = build("authjs", "createUser", email=EMAIL, now=then, secret=SECRET)
    with pytest.raises(WebhookVerificationError, match="too old"):
        receiver("authjs").verify(headers, body, now=utcnow())


def test_auth0_sends_the_token_as_each_stream_does() -> None:
    log_headers, _ = build("auth0", "ss", email=EMAIL, now=utcnow(), secret=TOKEN)
    event_headers, _ = build("auth0", "user.created", email=EMAIL, now=utcnow(), secret=TOKEN)
    assert log_headers["authorization"] == TOKEN
    assert event_headers["authorization"] == f"Bearer {TOKEN}"
    configured = f"Bearer {TOKEN}"
    headers, body = build("auth0", "sdu", email=EMAIL, now=utcnow(), secret=configured)
    assert headers["authorization"] == configured
    assert receiver("auth0", token=configured).verify(headers, body, now=utcnow())


def test_simulated_oauth_tokens_are_not_stored() -> None:
    headers, body = build("authjs", "linkAccount", email=EMAIL, now=utcnow(), secret=SECRET)
    token = json.loads(body)["data"]["account"]["access_token"]
    [item] = receiver("authjs").verify(headers, body, now=utcnow())
    assert token not in json.dumps(item.payload)


@pytest.mark.parametrize(
    ("provider", "event", "named"),
    [
        ("okta", "user.created", "stack, auth0, authjs"),
        ("stack", "ss", "user.created, user.updated, user.deleted, team_membership.created"),
        ("auth0", "createUser", "ss, s, sdu, user.created"),
        ("authjs", "user.created", "createUser, updateUser, signIn, signOut, linkAccount"),
    ],
)
def test_unknown_provider_or_event_names_the_valid_ones(
    provider: str, event: str, named: str
) -> None:
    with pytest.raises(UnknownEventError) as caught:
        build(provider, event, email=EMAIL, now=utcnow(), secret=SECRET)
    assert named in str(caught.value)
    assert isinstance(caught.value, ConfigError)  # the CLI exits 2: bad usage


@pytest.mark.parametrize("provider", list(EVENTS))
def test_missing_secret_is_a_config_error(provider: str) -> None:
    with pytest.raises(ConfigError, match=f"providers.{provider}.webhook_"):
        build(provider, EVENTS[provider][0], email=EMAIL, now=utcnow(), secret=" ")


# -- post ----------------------------------------------------------------------------------


class Recorder(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        self.received.append((self.path, dict(self.headers.items()), self.rfile.read(length)))
        self.send_response(202)
        self.send_header("content-type", "text/plain")
        self.end_headers()
        self.wfile.write(b"stored")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def daemon() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    Recorder.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_post_delivers_headers_and_body_verbatim(daemon: str) -> None:
    now = utcnow()
    headers, body = build("stack", "user.created", email=EMAIL, now=now, secret=SECRET)
    delivery = post(endpoint(daemon + "/", "stack"), headers, body)
    assert (delivery.status, delivery.body) == (202, "stored")
    [(path, received_headers, received_body)] = Recorder.received
    assert path == "/webhooks/stack"
    assert received_body == body
    assert receiver("stack").verify(received_headers, received_body, now=now)


def test_post_to_nothing_is_a_delivery_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DeliveryError, match="ConnectionError"):
        post(f"http://127.0.0.1:{port}/webhooks/stack", {}, b"{}", timeout=2.0)
