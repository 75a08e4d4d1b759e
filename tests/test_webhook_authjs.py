"""Auth.js webhooks: Standard Webhooks signatures by the real ``standardwebhooks`` package."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from providers.authjs import session_id
from providers.authjs_webhook import AuthjsWebhookReceiver
from providers.webhook import InboxItem, secrets_from
from sync_worker.changes import ChangeKind, utcnow
from sync_worker.errors import ConfigError, WebhookPayloadError, WebhookVerificationError
from tests.webhook_cases import (
    DATA,
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
FIXTURES = DATA / "authjs" / "webhooks"
SIGN_IN = load(FIXTURES / "sign_in_oauth.json")["body"]


def receiver(*secrets: str, max_age: timedelta = timedelta(days=30)) -> AuthjsWebhookReceiver:
    return AuthjsWebhookReceiver(secrets or (SECRET,), session_max_age=max_age)


def signed(body: bytes, *, secret: str = SECRET, when: datetime | None = None) -> dict[str, str]:
    return standard_headers(secret, MSG_ID, when or utcnow(), body)


def verify(headers: dict[str, str], body: bytes) -> list[InboxItem]:
    return receiver().verify(headers, body, now=utcnow())


def work_of(body: dict[str, Any], **kwargs: Any) -> Any:
    raw = encode(body)
    [item] = receiver(**kwargs).verify(signed(raw), raw, now=utcnow())
    return receiver(**kwargs).to_work(item.payload, event_id=item.event_id, received_at=RECEIVED)


# -- fixtures: verify then to_work ---------------------------------------------------


@pytest.mark.parametrize("path", cases("authjs"), ids=lambda p: p.stem)
def test_fixture_verifies_and_maps(path: Path) -> None:
    case = load(path)
    body = encode(case["body"])
    [item] = verify(signed(body), body)
    assert item.event_id == MSG_ID
    assert item.occurred_at is None
    check_item(item, case["expected"])
    work = receiver().to_work(item.payload, event_id=item.event_id, received_at=RECEIVED)
    check_work(work, case["expected"], received_at=RECEIVED)
    assert all(change.event_id == MSG_ID for change in work.changes)


def test_stored_session_keeps_only_its_sha256_id() -> None:
    case = load(FIXTURES / "sign_out_database_session.json")
    body = encode(case["body"])
    [item] = verify(signed(body), body)
    token = case["body"]["data"]["session"]["sessionToken"]
    assert item.payload["data"]["session"] == {
        "sessionId": session_id(token),
        "userId": "clx8q2v9k0000a8n3h2b6c1de",
        "expires": "2026-03-31T11:30:00.000Z",
    }


def test_stored_account_keeps_what_maps_to_a_linked_identity() -> None:
    body = encode(load(FIXTURES / "link_account_github.json")["body"])
    [item] = verify(signed(body), body)
    account = item.payload["data"]["account"]
    assert account["provider"] == "github"
    assert account["providerAccountId"] == "1024025"
    assert not {"access_token", "refresh_token", "id_token"} & set(account)
    assert "profile" not in item.payload["data"]


def test_session_revocation_is_dated_by_the_configured_max_age() -> None:
    body = load(FIXTURES / "sign_out_database_session.json")["body"]
    [change] = work_of(body, max_age=timedelta(days=60)).changes
    assert change.kind is ChangeKind.LOGIN
    assert change.session.revoked_at == RECEIVED
    assert change.session.created_at == datetime(2026, 1, 30, 11, 30, tzinfo=UTC)
    # A maxAge shorter than the session's remaining life: never dated after receipt.
    [change] = work_of(body, max_age=timedelta(days=7)).changes
    assert change.session.created_at == RECEIVED


def test_sign_in_is_a_login_at_the_time_received() -> None:
    [change] = work_of(SIGN_IN).changes
    assert change.kind is ChangeKind.LOGIN
    assert change.version == RECEIVED  # the engine's last_login_at
    assert change.session is None  # no session row: it would never expire nor be revoked


def test_user_events_do_not_state_linked_accounts() -> None:
    """An event tells of one account at most: the stored links are kept (not stated)."""
    body = load(FIXTURES / "update_user_magic_link.json")["body"]
    work = work_of(body)
    assert work.changes[0].linked == ()
    assert work.changes[0].linked_stated is False
    assert work.fetch == ()


# -- signatures ------------------------------------------------------------------------


def test_good_signature_accepted() -> None:
    body = encode(SIGN_IN)
    assert [i.event_type for i in verify(signed(body), body)] == ["signIn"]


def test_wrong_secret_rejected() -> None:
    body = encode(SIGN_IN)
    with pytest.raises(WebhookVerificationError, match="no configured secret"):
        verify(signed(body, secret=OTHER), body)


def test_tampered_body_rejected() -> None:
    body = encode(SIGN_IN)
    tampered = body.replace(b'"id":42', b'"id":43', 1)
    assert tampered != body
    with pytest.raises(WebhookVerificationError):
        verify(signed(body), tampered)


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_rejected_and_named(header: str) -> None:
    body = encode(SIGN_IN)
    headers = signed(body)
    del headers[header]
    with pytest.raises(WebhookVerificationError, match=header):
        verify(headers, body)


def test_svix_header_names_are_not_standard_webhooks() -> None:
    body = encode(SIGN_IN)
    with pytest.raises(WebhookVerificationError, match="missing header webhook-id"):
        verify(svix_headers(SECRET, MSG_ID, utcnow(), body), body)


@pytest.mark.parametrize("offset", [timedelta(minutes=-6), timedelta(minutes=6)])
def test_stale_and_future_timestamps_rejected(offset: timedelta) -> None:
    body = encode(SIGN_IN)
    with pytest.raises(WebhookVerificationError, match="webhook-timestamp"):
        verify(signed(body, when=utcnow() + offset), body)


def test_several_signatures_in_one_header() -> None:
    body = encode(SIGN_IN)
    headers = signed(body)
    wrong = signed(body, secret=OTHER)["webhook-signature"]
    value = f"{wrong} v1a,c2lnbmF0dXJl {headers['webhook-signature']}"
    assert verify({**headers, "webhook-signature": value}, body)


def test_rotation_either_configured_secret_verifies() -> None:
    body = encode(SIGN_IN)
    both = receiver(*secrets_from(f" {OTHER}   {SECRET} "))
    for secret in (SECRET, OTHER):
        assert both.verify(signed(body, secret=secret), body, now=utcnow())


def test_header_names_in_any_case() -> None:
    body = encode(SIGN_IN)
    headers = {k.upper(): v for k, v in signed(body).items()}
    assert verify(headers, body)


def test_missing_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"providers\.authjs\.webhook_secret"):
        AuthjsWebhookReceiver(secrets_from(""))


# -- bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"null", b"[1, 2]", b'{"type": 1, "data": {}}', b'{"type": "signIn", "data": "x"}'],
)
def test_verified_but_malformed_body_is_a_payload_error(body: bytes) -> None:
    with pytest.raises(WebhookPayloadError):
        verify(signed(body), body)


def test_unknown_event_type_is_ignored_and_stored_without_data() -> None:
    body = encode({"type": "createVerificationToken", "data": {"token": "secret-token-value"}})
    [item] = verify(signed(body), body)
    assert item.ignored
    assert item.payload == {"type": "createVerificationToken", "data": {}}


@pytest.mark.parametrize(
    ("data", "changes"),
    [
        ({"session": {"userId": 1, "expires": "2026-03-31T00:00:00Z"}}, 0),  # no token / id
        ({"session": None}, 0),
        ({"token": {"sub": "42"}}, 0),  # no jti: nothing to name the session by
        ({"token": {"jti": "j"}}, 0),  # no sub: no user
        ({"token": {"sub": "42", "jti": "j"}}, 1),
    ],
)
def test_sign_out_revokes_only_a_named_session(data: dict[str, Any], changes: int) -> None:
    assert len(work_of({"type": "signOut", "data": data}).changes) == changes


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "createUser", "data": {}},
        {"type": "createUser", "data": {"user": {"id": True}}},
        {"type": "updateUser", "data": {"user": {"id": 1, "emailVerified": "yesterday"}}},
        {"type": "linkAccount", "data": {"user": {"id": 1}}},
        {"type": "linkAccount", "data": {"user": {"id": 1}, "account": {"provider": "github"}}},
        {"type": "signIn", "data": {"user": {"name": "no id"}}},
        {"type": "signOut", "data": {"token": {"sub": "1", "jti": "j", "iat": "noon"}}},
        {"type": "signOut", "data": {"token": {"sub": "1", "jti": "j", "exp": 1e300}}},
        {"type": "signOut", "data": {"session": {"sessionId": "s", "userId": 1, "expires": "?"}}},
        {"data": {}},
    ],
)
def test_poison_payload_is_a_payload_error(payload: dict[str, Any]) -> None:
    with pytest.raises(WebhookPayloadError):
        receiver().to_work(payload, event_id=MSG_ID, received_at=RECEIVED)
