"""Auth0 push paths: Log Streams custom webhook (three body shapes) and Event Streams."""

from __future__ import annotations

import hmac
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from providers import auth0_webhook
from providers.auth0_webhook import Auth0WebhookReceiver, authorization_values
from providers.webhook import InboxItem, secrets_from
from sync_worker.changes import ChangeKind, utcnow
from sync_worker.errors import ConfigError, WebhookPayloadError, WebhookVerificationError
from tests.webhook_cases import DATA, check_item, check_work, encode, load

TOKEN = "d5ac1e0b7f2a4c9e8b3f6a1d2c7e9f04"
OTHER = "0f9e8d7c6b5a49382716050403020100"
RECEIVED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FIXTURES = DATA / "auth0" / "webhooks"
BATCH = load(FIXTURES / "log_stream_batch.json")
RECORDS: list[dict[str, Any]] = BATCH["records"]
EVENTS = sorted(FIXTURES.glob("event_*.json"))


def receiver(*tokens: str) -> Auth0WebhookReceiver:
    return Auth0WebhookReceiver(tokens or (TOKEN,))


def verify(
    body: bytes, authorization: str | None = TOKEN, tokens: tuple[str, ...] = (TOKEN,)
) -> list[InboxItem]:
    headers = {} if authorization is None else {"Authorization": authorization}
    return receiver(*tokens).verify(headers, body, now=utcnow())


def json_lines(records: list[dict[str, Any]]) -> bytes:
    return b"\n".join(encode(r) for r in records) + b"\n"


# -- Log Streams -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [encode(RECORDS), json_lines(RECORDS), json.dumps(RECORDS, indent=2).encode()],
    ids=["json-array", "json-lines", "pretty-array"],
)
def test_log_batch_every_record_is_an_item(body: bytes) -> None:
    items = verify(body)
    assert [i.event_id for i in items] == [r["log_id"] for r in RECORDS]
    for item in items:
        expected = BATCH["expected"][item.event_id]
        check_item(item, expected)
        work = receiver().to_work(item.payload, event_id=item.event_id, received_at=RECEIVED)
        check_work(work, expected, received_at=RECEIVED)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r["data"]["type"])
def test_log_single_object_body(record: dict[str, Any]) -> None:
    [item] = verify(encode(record))
    assert item.event_id == record["log_id"]
    assert item.payload == {"log_id": record["log_id"], "data": record["data"]}


def test_log_record_without_its_own_log_id_uses_the_envelope() -> None:
    record = {**RECORDS[1], "data": {k: v for k, v in RECORDS[1]["data"].items() if k != "log_id"}}
    [item] = verify(encode(record))
    [login] = receiver().to_work(item.payload, event_id=item.event_id, received_at=RECEIVED).changes
    assert login.kind is ChangeKind.LOGIN
    assert login.session is not None
    assert login.session.external_session_id == record["data"]["details"]["session_id"]
    assert login.event_id == record["log_id"]


def test_thousand_item_log_body() -> None:
    records = [
        {"log_id": f"9002026030112{n:043d}", "data": {**RECORDS[n % len(RECORDS)]["data"]}}
        for n in range(1000)
    ]
    for body in (encode(records), json_lines(records)):
        items = verify(body)
        assert len(items) == 1000
        assert len({i.event_id for i in items}) == 1000


def test_a_log_repeated_within_a_batch_is_stored_once() -> None:
    items = verify(encode([RECORDS[0], RECORDS[1], RECORDS[0]]))
    assert [i.event_id for i in items] == [RECORDS[0]["log_id"], RECORDS[1]["log_id"]]


def test_empty_batch_is_a_success() -> None:
    assert verify(b"[]") == []


# -- Event Streams -----------------------------------------------------------------------


@pytest.mark.parametrize("path", EVENTS, ids=lambda p: p.stem)
def test_event_stream_fixture(path: Path) -> None:
    case = load(path)
    [item] = verify(encode(case["body"]), f"Bearer {TOKEN}")
    check_item(item, case["expected"])
    work = receiver().to_work(item.payload, event_id=item.event_id, received_at=RECEIVED)
    check_work(work, case["expected"], received_at=RECEIVED)
    assert all(change.event_id == item.event_id for change in work.changes)


def test_event_and_log_records_in_one_body() -> None:
    event = load(EVENTS[0])["body"]
    items = verify(json_lines([RECORDS[0], event]))
    assert [i.event_id for i in items] == [RECORDS[0]["log_id"], event["id"]]


def test_event_user_identities_lose_idp_tokens_only() -> None:
    body = load(FIXTURES / "event_user_created.json")["body"]
    [item] = verify(encode(body))
    [identity] = item.payload["data"]["object"]["identities"]
    assert identity == {
        "provider": "google-oauth2",
        "connection": "google-oauth2",
        "user_id": "117304918822650193377",
        "isSocial": True,
    }


def test_deleted_event_without_time_falls_back_to_receipt() -> None:
    payload = {"specversion": "1.0", "type": "user.deleted", "id": "evt_x", "data": {}}
    payload["data"] = {"object": {"user_id": "auth0|gone"}}
    [change] = receiver().to_work(payload, event_id="evt_x", received_at=RECEIVED).changes
    assert (change.kind, change.version) == (ChangeKind.DELETE, RECEIVED)


# -- the token ---------------------------------------------------------------------------


@pytest.mark.parametrize("header", [TOKEN, f"Bearer {TOKEN}", f"bearer {TOKEN}", f" {TOKEN} "])
def test_token_accepted_as_is_or_as_bearer(header: str) -> None:
    assert verify(encode(RECORDS[:1]), header)


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", f"Bearer {OTHER}", TOKEN[:-1], TOKEN + "0", f"Basic {TOKEN}", "tøken"],
)
def test_missing_or_wrong_token_rejected(header: str | None) -> None:
    with pytest.raises(WebhookVerificationError, match="Authorization") as caught:
        verify(encode(RECORDS[:1]), header)
    assert TOKEN not in str(caught.value)


def test_rotation_either_configured_token_verifies() -> None:
    tokens = secrets_from(f"{TOKEN} {OTHER}")
    for token in (TOKEN, OTHER):
        assert verify(encode(RECORDS[:1]), token, tokens=tokens)


def verify_with(tokens: tuple[str, ...], header: str) -> list[InboxItem]:
    return Auth0WebhookReceiver(tokens).verify(
        {"authorization": header}, encode(RECORDS[:1]), now=utcnow()
    )


def test_a_configured_value_with_a_scheme_matches_whole() -> None:
    """``AUTH0_WEBHOOK_TOKEN="Basic dXNlcjpwYXNz"`` is split on spaces, then joined again."""
    tokens = secrets_from(f"Basic dXNlcjpwYXNz Bearer {OTHER}")
    assert authorization_values(tokens) == ("Basic dXNlcjpwYXNz", f"Bearer {OTHER}")
    assert verify_with(tokens, "Basic dXNlcjpwYXNz")
    assert verify_with(tokens, f"Bearer {OTHER}")
    for header in ("Basic", "Bearer", "dXNlcjpwYXNz", "Bearer dXNlcjpwYXNz"):
        with pytest.raises(WebhookVerificationError):
            verify_with(tokens, header)


@pytest.mark.parametrize("value", ["", "Bearer", f"{TOKEN} bearer"])
def test_unusable_token_configuration(value: str) -> None:
    with pytest.raises(ConfigError, match="webhook_token"):
        Auth0WebhookReceiver(secrets_from(value))


class CountingDigest:
    """``hmac`` with ``compare_digest`` counted: the comparison must not stop at a match."""

    def __init__(self) -> None:
        self.calls = 0

    def compare_digest(self, a: bytes, b: bytes) -> bool:
        self.calls += 1
        assert len(a) == len(b) == 32  # digests: the token's length is not compared either
        return hmac.compare_digest(a, b)


@pytest.mark.parametrize("header", [TOKEN, OTHER, "wrong", ""])
def test_token_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    counting = CountingDigest()
    monkeypatch.setattr(auth0_webhook, "hmac", counting)
    rx = receiver(TOKEN, OTHER)
    try:
        rx.verify({"authorization": header}, encode(RECORDS[:1]), now=utcnow())
    except WebhookVerificationError:
        assert header not in (TOKEN, OTHER)
    assert counting.calls == 4  # two tokens, each as-is and as Bearer, whatever matched


# -- bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"  \n ", "empty"),
        (b"\xff\xfe[]", "UTF-8"),
        (b"{not json", "line 1"),
        (encode(RECORDS[0]) + b"\n{broken\n", "line 2"),
        (b"42", "item 0"),
        (b'[{"log_id": "1", "data": {}}, 7]', "item 1"),
        (b'[{"id": "x", "data": {}}]', "neither"),
        (b'[{"log_id": "1"}]', "data"),
        (b'[{"log_id": "", "data": {}}]', "log_id"),
        (b'[{"log_id": null, "data": {}}]', "log_id"),
        (b'{"specversion": "1.0", "type": "user.created", "data": {}}', "id"),
        (b'{"specversion": "1.0", "id": "evt_1", "type": "user.created", "data": 3}', "data"),
        (b'[{"log_id": "1", "data": {"n": Infinity}}]', "line 1"),
    ],
)
def test_malformed_body_is_a_payload_error(body: bytes, reason: str) -> None:
    with pytest.raises(WebhookPayloadError, match=reason):
        verify(body)


def test_the_token_is_checked_before_the_body_is_read() -> None:
    with pytest.raises(WebhookVerificationError):
        verify(b"{not json", "wrong")


def test_unknown_types_and_codes_are_ignored() -> None:
    body = encode(
        [
            {"log_id": "1", "data": {"type": "gd_auth_succeed", "user_id": "auth0|a"}},
            {"log_id": "2", "data": {"user_id": "auth0|a"}},
            {"specversion": "1.0", "id": "evt_2", "type": "group.created", "data": {}},
        ]
    )
    items = verify(body)
    assert [(i.event_type, i.ignored) for i in items] == [
        ("gd_auth_succeed", True),
        ("unknown", True),
        ("group.created", True),
    ]
    for item in items:
        work = receiver().to_work(item.payload, event_id=item.event_id, received_at=RECEIVED)
        assert (work.changes, work.fetch) == ((), ())


@pytest.mark.parametrize(
    "payload",
    [
        {"log_id": "1", "data": "x"},
        {"log_id": "", "data": {"type": "sdu", "user_id": "auth0|a"}},
        {"log_id": "1", "data": {"type": "s", "user_id": "auth0|a", "date": "noon"}},
        {"specversion": "1.0", "type": "user.created", "data": {"object": {"email": "x@y"}}},
        {"specversion": "1.0", "type": "user.updated", "data": {}},
        {"specversion": "1.0", "type": "user.deleted", "data": {"object": {"user_id": 5}}},
        {"specversion": "1.0", "type": "user.deleted", "time": "x", "data": {"object": {}}},
    ],
)
def test_poison_payload_is_a_payload_error(payload: dict[str, Any]) -> None:
    with pytest.raises(WebhookPayloadError):
        receiver().to_work(payload, event_id="e", received_at=RECEIVED)
