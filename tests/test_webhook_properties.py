"""Properties of every receiver: nothing verifies without the secret, and whatever arrives,
signed or not, ends in an inbox item or one of the two webhook errors, never anything else."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.auth0_webhook import Auth0WebhookReceiver
from providers.authjs_webhook import EVENT_TYPES as AUTHJS_TYPES
from providers.authjs_webhook import AuthjsWebhookReceiver
from providers.stack_webhook import EVENT_TYPES as STACK_TYPES
from providers.stack_webhook import StackWebhookReceiver
from providers.webhook import InboxItem, WebhookReceiver, Work
from sync_worker.changes import utcnow
from sync_worker.errors import WebhookPayloadError, WebhookVerificationError
from tests.webhook_cases import encode, new_secret, standard_headers, svix_headers

SECRET = new_secret()
TOKEN = "property-token-5f0c2b9e7a1d4c83"
RECEIVED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RECEIVERS: dict[str, WebhookReceiver] = {
    "stack": StackWebhookReceiver([SECRET]),
    "authjs": AuthjsWebhookReceiver([SECRET]),
    "auth0": Auth0WebhookReceiver([TOKEN]),
}
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ------------------------------------------------------------------------

# Field names the receivers read, so that generated payloads reach past the first check.
FIELD_NAMES = (
    "id", "user", "account", "session", "token", "user_id", "team_id", "teams", "type", "data",
    "object", "previous_object", "log_id", "date", "provider", "providerAccountId",
    "sessionToken", "sessionId", "userId", "expires", "sub", "jti", "iat", "exp",
    "emailVerified", "email", "primary_email", "oauth_providers", "identities", "updated_at",
    "time", "details", "request", "response", "body", "path", "method", "specversion",
    "isNewUser",
)  # fmt: skip
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=4)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["2026-03-01T12:00:00Z", "/api/v2/users/auth0%7Ca", "delete", "s", "sdu"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)
OBJECTS = st.dictionaries(KEYS, JSON, max_size=6)
TYPES = st.sampled_from(sorted(STACK_TYPES | AUTHJS_TYPES)) | st.text(max_size=10)
LOG_CODES = st.sampled_from(["s", "ss", "sdu", "sapi", "sv", "scu", "f", "sui"]) | st.text()


def near_valid_headers(now: datetime) -> st.SearchStrategy[dict[str, str]]:
    """Signature headers that look right (a current timestamp, a v1 entry) but are forged."""
    forged = st.binary(min_size=32, max_size=32).map(
        lambda raw: "v1," + base64.b64encode(raw).decode()
    )
    stamp = st.integers(-200, 200).map(lambda d: str(int(now.timestamp()) + d)) | st.text()
    prefix = st.sampled_from(["svix", "webhook", "Svix", "WEBHOOK"])
    return st.builds(
        lambda p, i, t, s: {f"{p}-id": i, f"{p}-timestamp": t, f"{p}-signature": s},
        prefix,
        st.text(min_size=1),
        stamp,
        forged | st.text(),
    )


ANY_HEADERS = st.dictionaries(st.text(max_size=20), st.text(max_size=60), max_size=5)
BODIES = st.binary(max_size=300) | JSON.map(encode)


def outcome(receiver: WebhookReceiver, headers: dict[str, str], body: bytes) -> list[InboxItem]:
    return receiver.verify(headers, body, now=utcnow())


# -- without the secret --------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["stack", "authjs"])
@PROPERTY
@given(data=st.data(), body=BODIES)
def test_forged_signatures_never_verify(provider: str, data: st.DataObject, body: bytes) -> None:
    headers = data.draw(near_valid_headers(utcnow()) | ANY_HEADERS)
    with pytest.raises(WebhookVerificationError):
        outcome(RECEIVERS[provider], headers, body)


@PROPERTY
@given(
    authorization=st.text() | st.text().map(lambda t: f"Bearer {t}"),
    extra=ANY_HEADERS,
    body=BODIES,
)
def test_auth0_without_the_token_never_verifies(
    authorization: str, extra: dict[str, str], body: bytes
) -> None:
    headers = {**extra, "Authorization": authorization}
    with pytest.raises(WebhookVerificationError):
        outcome(RECEIVERS["auth0"], headers, body)


@pytest.mark.parametrize("provider", ["stack", "authjs"])
@PROPERTY
@given(body=BODIES)
def test_another_secret_never_verifies(provider: str, body: bytes) -> None:
    sign = svix_headers if provider == "stack" else standard_headers
    try:
        headers = sign(new_secret(), "msg_1", utcnow(), body)
    except UnicodeDecodeError:
        return  # a sender signs text: no signature exists for bytes that are not UTF-8
    with pytest.raises(WebhookVerificationError):
        outcome(RECEIVERS[provider], headers, body)


# -- with the secret: an item or a payload error -------------------------------------------


def envelopes() -> st.SearchStrategy[bytes]:
    return st.builds(lambda t, d: encode({"type": t, "data": d}), TYPES, OBJECTS | JSON)


@pytest.mark.parametrize("provider", ["stack", "authjs"])
@PROPERTY
@given(body=st.text(max_size=200).map(str.encode) | envelopes())
def test_signed_bodies_give_items_or_payload_errors(provider: str, body: bytes) -> None:
    sign = svix_headers if provider == "stack" else standard_headers
    headers = sign(SECRET, "msg_1", utcnow(), body)
    receiver = RECEIVERS[provider]
    try:
        items = outcome(receiver, headers, body)
    except WebhookPayloadError:
        return
    [item] = items
    work_or_poison(receiver, item.payload)


LOG_RECORDS = st.builds(
    lambda i, c, d: {"log_id": i, "data": {**d, "type": c}},
    st.text(min_size=1, max_size=20) | st.integers(0),
    LOG_CODES,
    OBJECTS,
)
CLOUD_EVENTS = st.builds(
    lambda i, t, d: {"specversion": "1.0", "id": i, "type": t, "data": d},
    st.text(min_size=1, max_size=20),
    st.sampled_from(["user.created", "user.updated", "user.deleted"]) | st.text(max_size=8),
    OBJECTS | st.builds(lambda o: {"object": o}, OBJECTS),
)


@PROPERTY
@given(
    records=st.lists(LOG_RECORDS | CLOUD_EVENTS | OBJECTS, max_size=4),
    shape=st.sampled_from(["array", "lines", "object"]),
    noise=st.binary(max_size=20),
)
def test_auth0_bodies_with_the_token_give_items_or_payload_errors(
    records: list[dict[str, Any]], shape: str, noise: bytes
) -> None:
    if shape == "array":
        body = encode(records)
    elif shape == "lines":
        body = b"\n".join(encode(r) for r in records) + noise
    else:
        body = encode(records[0]) if records else noise
    receiver = RECEIVERS["auth0"]
    try:
        items = outcome(receiver, {"authorization": f"Bearer {TOKEN}"}, body)
    except WebhookPayloadError:
        return
    for item in items:
        work_or_poison(receiver, item.payload)


# -- to_work on any stored payload ---------------------------------------------------------


def work_or_poison(receiver: WebhookReceiver, payload: Any) -> None:
    try:
        work = receiver.to_work(payload, event_id="evt_1", received_at=RECEIVED)
    except WebhookPayloadError:
        return
    assert isinstance(work, Work)


@pytest.mark.parametrize("provider", ["stack", "authjs"])
@PROPERTY
@given(event_type=TYPES, data=OBJECTS)
def test_to_work_gives_work_or_a_payload_error(
    provider: str, event_type: str, data: dict[str, Any]
) -> None:
    work_or_poison(RECEIVERS[provider], {"type": event_type, "data": data})


@PROPERTY
@given(payload=LOG_RECORDS | CLOUD_EVENTS | OBJECTS)
def test_auth0_to_work_gives_work_or_a_payload_error(payload: dict[str, Any]) -> None:
    work_or_poison(RECEIVERS["auth0"], payload)
