"""Stack Auth webhooks: Svix signatures made by the real ``svix`` package, then to_work tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from providers.stack_webhook import StackWebhookReceiver
from providers.webhook import secrets_from
from sync_worker.changes import ChangeKind, utcnow
from sync_worker.errors import ConfigError, WebhookPayloadError, WebhookVerificationError
from tests.webhook_cases import (
    cases,
    check_item,
    check_work,
    encode,
    load,
    new_secret,
    standard_headers,
    svix_headers,
)

SECRET = new_secret()
OTHER = new_secret()
MSG_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
RECEIVED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CREATED = load(cases("stack")[0].with_name("user_created.json"))["body"]


def receiver(*secrets: str) -> StackWebhookReceiver:
    return StackWebhookReceiver(secrets or (SECRET,))


def signed(body: bytes, *, secret: str = SECRET, when: datetime | None = None) -> dict[str, str]:
    return svix_headers(secret, MSG_ID, when or utcnow(), body)


def verify(headers: dict[str, str], body: bytes, **kwargs: Any) -> list[Any]:
    return receiver(**kwargs).verify(headers, body, now=utcnow())


# -- fixtures: verify then to_work ---------------------------------------------------


@pytest.mark.parametrize("path", cases("stack"), ids=lambda p: p.stem)
def test_fixture_verifies_and_maps(path: Path) -> None:
    case = load(path)
    body = encode(case["body"])
    [item] = receiver().verify(signed(body), body, now=utcnow())
    assert item.event_id == MSG_ID
    assert item.payload == case["body"]
    assert item.occurred_at is None  # Stack bodies state no time
    check_item(item, case["expected"])
    work = receiver().to_work(item.payload, event_id=item.event_id, received_at=RECEIVED)
    check_work(work, case["expected"], received_at=RECEIVED)
    assert all(change.event_id == MSG_ID for change in work.changes)


def test_user_upsert_keeps_the_tenant_and_applies_in_order_received() -> None:
    later = RECEIVED + timedelta(seconds=5)
    [change] = receiver().to_work(CREATED, event_id="a", received_at=later).changes
    assert change.kind is ChangeKind.UPSERT
    assert change.version == later  # Stack has no updated_at
    assert change.attributes is not None
    assert change.attributes.tenant_id is None
    assert "tenant_id" not in change.attributes.stated
    assert "team_ids" not in (change.raw or {})


# -- signatures ------------------------------------------------------------------------


def test_good_signature_accepted() -> None:
    body = encode(CREATED)
    assert [i.event_type for i in verify(signed(body), body)] == ["user.created"]


def test_wrong_secret_rejected() -> None:
    body = encode(CREATED)
    with pytest.raises(WebhookVerificationError, match="no configured secret"):
        verify(signed(body, secret=OTHER), body)


def test_tampered_body_rejected() -> None:
    body = encode(CREATED)
    tampered = body.replace(b"grace.hopper@example.com", b"mallory@example.com")
    with pytest.raises(WebhookVerificationError):
        verify(signed(body), tampered)


@pytest.mark.parametrize("header", ["svix-id", "svix-timestamp", "svix-signature"])
def test_missing_header_rejected_and_named(header: str) -> None:
    body = encode(CREATED)
    headers = signed(body)
    del headers[header]
    with pytest.raises(WebhookVerificationError, match=header) as caught:
        verify(headers, body)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("offset", [timedelta(minutes=-6), timedelta(minutes=6)])
def test_stale_and_future_timestamps_rejected(offset: timedelta) -> None:
    body = encode(CREATED)
    with pytest.raises(WebhookVerificationError, match="svix-timestamp"):
        verify(signed(body, when=utcnow() + offset), body)


@pytest.mark.parametrize("offset", [timedelta(minutes=-4), timedelta(minutes=4)])
def test_timestamps_within_five_minutes_accepted(offset: timedelta) -> None:
    body = encode(CREATED)
    assert verify(signed(body, when=utcnow() + offset), body)


@pytest.mark.parametrize(
    "value", ["", "soon", "1.7e9", "-5", "\uff11\uff12\uff13", "9" * 13, "9" * 12]
)
def test_unreadable_timestamp_rejected(value: str) -> None:
    body = encode(CREATED)
    headers = {**signed(body), "svix-timestamp": value}
    with pytest.raises(WebhookVerificationError):
        verify(headers, body)


def test_the_clock_is_the_now_argument() -> None:
    body = encode(CREATED)
    headers = signed(body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        receiver().verify(headers, body, now=utcnow() + timedelta(minutes=10))


def test_several_signatures_in_one_header() -> None:
    """Svix rotating its own key sends one entry per key; unknown versions are skipped."""
    body = encode(CREATED)
    headers = signed(body)
    good = headers["svix-signature"]
    wrong = signed(body, secret=OTHER)["svix-signature"]
    for value in (f"{wrong} {good}", f"{good} {wrong}", f"v1a,abc {wrong} {good}"):
        assert verify({**headers, "svix-signature": value}, body)


def test_malformed_signature_entries_do_not_hide_a_good_one() -> None:
    body = encode(CREATED)
    headers = signed(body)
    value = f"v2 v1,not-base64! v1,a,b  {headers['svix-signature']}"
    assert verify({**headers, "svix-signature": value}, body)


def test_only_wrong_signatures_rejected() -> None:
    body = encode(CREATED)
    headers = signed(body)
    for value in ("v1,", "v2,abcd", "garbage", signed(body, secret=OTHER)["svix-signature"]):
        with pytest.raises(WebhookVerificationError):
            verify({**headers, "svix-signature": value}, body)


def test_rotation_either_configured_secret_verifies() -> None:
    body = encode(CREATED)
    both = receiver(*secrets_from(f"{SECRET} {OTHER}"))
    for secret in (SECRET, OTHER):
        assert both.verify(signed(body, secret=secret), body, now=utcnow())
    with pytest.raises(WebhookVerificationError):
        both.verify(signed(body, secret=new_secret()), body, now=utcnow())


def test_header_names_in_any_case() -> None:
    body = encode(CREATED)
    headers = {k.title(): v for k, v in signed(body).items()}  # Svix-Id, Svix-Timestamp, ...
    assert verify(headers, body)


def test_white_labelled_webhook_headers_accepted() -> None:
    body = encode(CREATED)
    headers = standard_headers(SECRET, MSG_ID, utcnow(), body)
    [item] = verify(headers, body)
    assert item.event_id == MSG_ID


def test_body_that_is_not_utf8_is_not_verified() -> None:
    body = b"\xff\xfe" + encode(CREATED)
    with pytest.raises(WebhookVerificationError):
        verify(signed(encode(CREATED)), body)


def test_bad_secret_configuration() -> None:
    with pytest.raises(ConfigError, match="webhook_secret: missing"):
        StackWebhookReceiver(())
    with pytest.raises(ConfigError, match="webhook_secret") as caught:
        StackWebhookReceiver([SECRET, "whsec_!!!"])  # decodes to no key at all
    assert "!!!" not in str(caught.value)


# -- bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'"user.created"',
        b'{"data": {}}',
        b'{"type": "", "data": {}}',
        b'{"type": "user.created"}',
        b'{"type": "user.created", "data": []}',
        b'{"type": "user.created", "data": {"n": NaN}}',
        b'{"type": "user.created", "data": {"id": "a\\u0000b"}}',
        b'{"type": "user.created", "data": {"id": "\\ud800"}}',
    ],
)
def test_verified_but_malformed_body_is_a_payload_error(body: bytes) -> None:
    with pytest.raises(WebhookPayloadError) as caught:
        verify(signed(body), body)
    assert body.decode() not in str(caught.value)


def test_unknown_event_type_is_ignored() -> None:
    body = encode({"type": "project_permission.created", "data": {"id": "admin", "user_id": "u"}})
    [item] = verify(signed(body), body)
    assert item.ignored
    assert receiver().to_work(item.payload, event_id=MSG_ID, received_at=RECEIVED).changes == ()


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "user.created", "data": {"primary_email": "x@example.com"}},
        {"type": "user.updated", "data": {"id": "u", "oauth_providers": "github"}},
        {"type": "user.deleted", "data": {"teams": []}},
        {"type": "team_membership.created", "data": {"team_id": "t", "user_id": 7}},
        {"type": "user.created"},
    ],
)
def test_poison_payload_is_a_payload_error(payload: dict[str, Any]) -> None:
    with pytest.raises(WebhookPayloadError):
        receiver().to_work(payload, event_id=MSG_ID, received_at=RECEIVED)
