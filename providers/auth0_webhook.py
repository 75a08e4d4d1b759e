"""Auth0 push paths, both on ``POST /webhooks/auth0`` (docs/idp/auth0.md §5).

**Log Streams, custom webhook.** Auth0 sends the configured Authorization token as-is and
no signature. The body is a JSON array, JSON lines or a single object of ``{"log_id",
"data": <log event>}`` records, depending on the stream's content format. Each record is one
inbox item, its event id the ``log_id``. Nothing in a delivery is signed or dated by the
sender, so a captured body can be replayed by anyone holding the token: a replay is
recognised only by its ``log_id`` (the inbox keeps done rows for days), and an old log
re-sent after that would be applied again. Streams are at-least-once and unordered.
Work reuses the adapter's log planning (``providers.auth0.plan_logs``): lifecycle codes
(``ss``, ``sce``, ``scu``, ``sv``, ``sapi`` on ``/api/v2/users``...) fetch the user, ``sdu``
and a ``sapi`` DELETE delete, ``s`` is a login; every other code is stored as ignored
(including ``sui``, a bulk import, which names no user: the next full sync catches it).

**Event Streams** (CloudEvents, ``Authorization: Bearer <token>``): ``user.created``,
``user.updated`` upsert the user in ``data.object`` (its ``updated_at`` is the version),
``user.deleted`` deletes (the event ``time`` is the version); the event id is the CloudEvent
``id``. Other types (organizations...) are ignored. Older docs spell the type
``com.auth0.user.created`` and the version key ``spec_version``; both are read.

The two are told apart per record: a ``log_id`` makes a log record, a ``specversion`` a
CloudEvent. ``AUTH0_WEBHOOK_TOKEN`` may hold several tokens (rotation); a header matches a
token ``T`` when it is ``T`` or ``Bearer T``, compared in constant time with every token. A
configured value that itself starts with a scheme (``Bearer T``, ``Basic T``) must match
whole. Upstream IdP tokens in a user's ``identities`` are dropped before storing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from providers.auth0 import PROVIDER, delete_change, login_change, plan_logs, to_change
from providers.webhook import (
    InboxItem,
    WebhookReceiver,
    Work,
    event_id_from,
    load_json,
    lower_headers,
    payload_errors,
)
from sync_worker.changes import ChangeKind, UserChange, as_utc, parse_timestamp
from sync_worker.errors import ConfigError, WebhookPayloadError, WebhookVerificationError

__all__ = [
    "EVENT_TYPES",
    "Auth0WebhookReceiver",
    "authorization_values",
    "bearer_header",
]

#: The Event Streams types the worker uses; other well-authenticated types are ignored.
EVENT_TYPES = frozenset({"user.created", "user.updated", "user.deleted"})
_SCHEMES = {"bearer": "Bearer", "basic": "Basic"}
_TYPE_PREFIX = "com.auth0."
_IDP_SECRETS = frozenset({"access_token", "refresh_token", "access_token_secret"})


class Auth0Decoder:
    """Stored payloads into work for the drainer (pure; needs no secret)."""

    provider: str = PROVIDER

    def to_work(
        self, item_payload: Mapping[str, Any], *, event_id: str, received_at: datetime
    ) -> Work:
        received = as_utc(received_at)
        assert received is not None
        if "log_id" in item_payload:
            with payload_errors(PROVIDER, "log"):
                return _log_work(item_payload)
        event_type = _cloud_type(item_payload.get("type"))
        if event_type not in EVENT_TYPES:
            return Work()
        with payload_errors(PROVIDER, event_type):
            return _event_work(event_type, item_payload, event_id, received)


class Auth0WebhookReceiver(Auth0Decoder):
    """``POST /webhooks/auth0`` (see the module docstring)."""

    provider: str = PROVIDER

    def __init__(self, tokens: Iterable[str]) -> None:
        """``tokens``: the values of ``AUTH0_WEBHOOK_TOKEN`` (``secrets_from`` of it)."""
        values = authorization_values(tokens)
        if not values:
            raise ConfigError("providers.auth0.webhook_token: missing")
        self._accepted = tuple(_digest(form) for value in values for form in _forms(value))

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: datetime) -> list[InboxItem]:
        """Check the token, then decode every record (``now`` is unused: nothing is dated)."""
        if not self._authorized(lower_headers(headers).get("authorization")):
            raise WebhookVerificationError("auth0: Authorization header missing or not accepted")
        items: dict[str, InboxItem] = {}
        for index, record in enumerate(_records(body)):
            item = _inbox_item(record, index)
            items.setdefault(item.event_id, item)  # a batch may repeat a log: store it once
        return list(items.values())

    def _authorized(self, header: str | None) -> bool:
        given = _digest(_canonical(header or ""))
        matched = False
        for accepted in self._accepted:  # no early exit: every token costs the same time
            matched |= hmac.compare_digest(given, accepted)
        return matched


if TYPE_CHECKING:
    _conforms: type[WebhookReceiver] = Auth0WebhookReceiver


# -- tokens ----------------------------------------------------------------------------


def authorization_values(tokens: Iterable[str]) -> tuple[str, ...]:
    """The configured tokens, a scheme word joined to the token after it.

    The variable is split on spaces (rotation), which also splits a value such as
    ``Bearer abc``; left split, ``Bearer`` alone would become a token anyone could send.
    """
    values: list[str] = []
    scheme: str | None = None
    for word in tokens:
        canonical = _SCHEMES.get(word.lower())
        if canonical is not None and scheme is None:
            scheme = canonical
            continue
        values.append(f"{scheme} {word}" if scheme else word)
        scheme = None
    if scheme is not None:
        raise ConfigError("providers.auth0.webhook_token: a scheme word without a token after it")
    return tuple(dict.fromkeys(values))


def bearer_header(value: str) -> str:
    """The ``Authorization`` header Event Streams send for a configured token."""
    return value if _has_scheme(value) else f"Bearer {value}"


def _forms(value: str) -> tuple[str, ...]:
    return (value,) if _has_scheme(value) else (value, f"Bearer {value}")


def _has_scheme(value: str) -> bool:
    first, _, rest = value.partition(" ")
    return first.lower() in _SCHEMES and bool(rest)


def _canonical(header: str) -> str:
    """The header with its scheme word spelled as configured (schemes ignore case)."""
    value = header.strip()
    first, _, rest = value.partition(" ")
    canonical = _SCHEMES.get(first.lower())
    return f"{canonical} {rest.strip()}" if canonical and rest.strip() else value


def _digest(value: str) -> bytes:
    """SHA-256 of a token: equal lengths, so the comparison does not leak the token's length
    either (``surrogatepass``: a header value need not be valid text)."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


# -- bodies ----------------------------------------------------------------------------


def _records(body: bytes) -> list[Mapping[str, Any]]:
    """The records of a JSON array, a single JSON object or JSON lines."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebhookPayloadError("auth0: body is not UTF-8") from exc
    if not text.strip():
        raise WebhookPayloadError("auth0: empty body")
    try:
        parsed = load_json(text)
    except WebhookPayloadError:
        parsed = _json_lines(text)
    records = parsed if isinstance(parsed, list) else [parsed]
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise WebhookPayloadError(f"auth0: item {index} is not an object")
    return records


def _json_lines(text: str) -> list[Any]:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    return [load_json(line, what=f"auth0: body line {n}") for n, line in lines]


def _inbox_item(record: Mapping[str, Any], index: int) -> InboxItem:
    if "log_id" in record:
        return _log_item(record, index)
    if "specversion" in record or "spec_version" in record:
        return _event_item(record, index)
    raise WebhookPayloadError(f"auth0: item {index} is neither a log record nor a CloudEvent")


def _log_item(record: Mapping[str, Any], index: int) -> InboxItem:
    log_id = event_id_from(record.get("log_id"), field=f"item {index} log_id")
    data = _data(record, index)
    code = data.get("type")
    if code is not None and not isinstance(code, str):  # the pull ignores it; a body is refused
        raise WebhookPayloadError(f"auth0: item {index} data.type: not a string")
    with payload_errors(PROVIDER, f"item {index}"):
        plan = plan_logs([{**data, "log_id": log_id}])
    return InboxItem(
        event_id=log_id,
        event_type=code if isinstance(code, str) and code else "unknown",
        payload={"log_id": log_id, "data": data},
        ignored=not (plan.fetch or plan.delete or plan.logins),
        occurred_at=_lenient_time(data.get("date")),
    )


def _event_item(record: Mapping[str, Any], index: int) -> InboxItem:
    event_id = event_id_from(record.get("id"), field=f"item {index} id")
    event_type = _cloud_type(record.get("type"))
    _data(record, index)
    return InboxItem(
        event_id=event_id,
        event_type=event_type,
        payload=_without_idp_secrets(record),
        ignored=event_type not in EVENT_TYPES,
        occurred_at=_lenient_time(record.get("time")),
    )


def _data(record: Mapping[str, Any], index: int) -> Mapping[str, Any]:
    data = record.get("data")
    if not isinstance(data, dict):
        raise WebhookPayloadError(f"auth0: item {index} data missing or not an object")
    return data


def _cloud_type(value: object) -> str:
    if not isinstance(value, str) or not value:
        return "unknown"
    return value.removeprefix(_TYPE_PREFIX)


def _lenient_time(value: object) -> datetime | None:
    """The event's own time when readable; a bad one fails later, in ``to_work``."""
    try:
        return parse_timestamp(value)
    except (ValueError, TypeError, OverflowError, OSError):
        return None


def _without_idp_secrets(record: Mapping[str, Any]) -> Mapping[str, Any]:
    data = record["data"]
    users = {k: _user_without_secrets(data[k]) for k in ("object", "previous_object") if k in data}
    return {**record, "data": {**data, **users}} if users else record


def _user_without_secrets(user: object) -> object:
    if not isinstance(user, dict) or not isinstance(user.get("identities"), list):
        return user
    identities = [
        {k: v for k, v in i.items() if k not in _IDP_SECRETS} if isinstance(i, dict) else i
        for i in user["identities"]
    ]
    return {**user, "identities": identities}


# -- to work ---------------------------------------------------------------------------


def _log_work(payload: Mapping[str, Any]) -> Work:
    data = payload.get("data")
    if not isinstance(data, dict):
        raise ValueError("data: missing or not an object")
    log_id = event_id_from(payload.get("log_id"), field="log_id")
    plan = plan_logs([{**data, "log_id": log_id}])
    logins = [login_change(event) for event in plan.logins]
    deletes = [delete_change(user_id, event) for user_id, event in plan.delete.items()]
    return Work(changes=(*logins, *deletes), fetch=tuple(plan.fetch))


def _event_work(
    event_type: str, payload: Mapping[str, Any], event_id: str, received: datetime
) -> Work:
    data = payload.get("data")
    user = data.get("object") if isinstance(data, dict) else None
    if not isinstance(user, dict):
        raise ValueError("data.object: missing or not an object")
    when = parse_timestamp(payload.get("time"))
    if event_type == "user.deleted":
        return Work(changes=(_deletion(user, event_id, when or received),))
    change = to_change(user)
    # updated_at orders updates; an object without one falls back to the event's time.
    version = change.version or when or received
    return Work(changes=(replace(change, version=version, event_id=event_id),))


def _deletion(user: Mapping[str, Any], event_id: str, when: datetime) -> UserChange:
    user_id = user.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("data.object.user_id: missing or not a string")
    return UserChange(
        provider=PROVIDER,
        external_id=user_id,
        kind=ChangeKind.DELETE,
        version=when,
        event_id=event_id,
    )
