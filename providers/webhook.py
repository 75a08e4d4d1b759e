"""The I/O-free part of receiving IdP webhooks: verify, decode into inbox items, plan work.

The daemon's HTTP layer checks content type and size, then calls a receiver::

    receiver.verify(headers, body, now=...)  ->  [InboxItem, ...]       (401 / 400 on error)
        stored in sync_inbox (provider, event_id unique), ignored items as ``ignored``
    receiver.to_work(payload, event_id=..., received_at=...)  ->  Work  (later, by the drainer)
        Work.changes go to the engine; Work.fetch are re-read from the IdP API first

A receiver verifies before it parses: nothing about an unauthenticated body is decoded, so a
stranger learns only "401". Error messages name a header or field, never its value, and never
include the body or a secret.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sync_worker.changes import UserChange, as_utc
from sync_worker.errors import WebhookPayloadError, WebhookVerificationError

__all__ = [
    "MAX_EVENT_ID",
    "TOLERANCE",
    "InboxItem",
    "SignedHeaders",
    "Signer",
    "WebhookReceiver",
    "Work",
    "WorkDecoder",
    "event_id_from",
    "load_json",
    "lower_headers",
    "payload_errors",
    "secrets_from",
    "typed_envelope",
    "verify_with_any",
]

#: How far a signed timestamp may be from our clock, either way (Svix / Standard Webhooks).
TOLERANCE = timedelta(minutes=5)
#: Longest event id stored; Svix ids are ~30 characters, Auth0 log ids 56.
MAX_EVENT_ID = 255
# One "v1,<base64>" entry of a signature header; anything else is dropped before the library
# sees it, because the library stops at the first malformed entry (a split that does not
# unpack, a base64 error) and so would reject a header that also holds a valid signature.
_V1_ENTRY = re.compile(r"v1,(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_MAX_TIMESTAMP_DIGITS = 12


@dataclass(frozen=True, slots=True, kw_only=True)
class InboxItem:
    """One verified event, as the inbox stores it.

    ``payload`` is JSON-able and is what ``to_work`` later reads back; receivers strip
    credentials (OAuth tokens, session tokens) from it. ``ignored`` marks a well-signed
    event type the worker does not use: store it as ``ignored`` (redeliveries are then still
    recognised), not as an error. ``occurred_at`` is set only when the event itself states a
    time (an Auth0 log's ``date``, a CloudEvent's ``time``); a signature timestamp is the
    time of the delivery attempt, not of the event, so it is not used.
    """

    event_id: str
    event_type: str
    payload: Mapping[str, Any]
    ignored: bool = False
    occurred_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    """What one stored event asks of the drainer.

    ``changes`` are ready for ``engine.apply``. ``fetch`` are external user ids of the same
    provider whose current state only the IdP API has (``Provider.fetch_user``); the drainer
    reads them outside any database transaction and applies what it gets (None: the user is
    gone). A drainer without API access for the provider cannot fetch: ``changes`` alone are
    still correct, only less complete.
    """

    changes: tuple[UserChange, ...] = ()
    fetch: tuple[str, ...] = ()


class WorkDecoder(Protocol):
    """Decoding stored payloads of one IdP into work (pure; needs no secret)."""

    provider: str

    def to_work(
        self, item_payload: Mapping[str, Any], *, event_id: str, received_at: datetime
    ) -> Work:
        """Turn a stored payload into work (pure).

        ``received_at`` is when the inbox stored it: the version of changes whose upstream
        states none (they then apply in the order received). Raises WebhookPayloadError for
        a payload that can never be processed (a poison row).
        """
        ...


class WebhookReceiver(WorkDecoder, Protocol):
    """Verification and decoding of one IdP's webhooks (pure; no I/O)."""

    provider: str

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: datetime) -> list[InboxItem]:
        """Authenticate a delivery and decode it into inbox items (one per event).

        ``headers`` in any letter case; ``body`` the raw bytes as received. ``now`` is the
        receiver's clock for the ±5 min timestamp window (pass the current time: the
        signature libraries check the system clock as well). Raises WebhookVerificationError
        (answer 401, store nothing) or WebhookPayloadError (a verified but malformed body or
        an unknown shape: 400). An empty list (an empty Auth0 batch) is a success.
        """
        ...


def secrets_from(value: str | None) -> tuple[str, ...]:
    """The values of a secret or token variable: several, space-separated, during rotation."""
    return tuple(dict.fromkeys((value or "").split()))


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names in lower case (HTTP names are case-insensitive; the libraries' dicts not)."""
    return {str(k).lower(): str(v) for k, v in headers.items()}


# -- Svix / Standard Webhooks signatures -----------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedHeaders:
    """The names of the three signature headers (``svix-*`` or ``webhook-*``)."""

    id: str
    timestamp: str
    signature: str

    def checked(self, headers: Mapping[str, str], *, now: datetime) -> dict[str, str]:
        """The three headers, checked against ``now``, for the library's ``verify``.

        The libraries check the timestamp again against the system clock, which only ever
        agrees with ``now`` in production; checking here first gives one clock the tests
        control and error messages that name the header.
        """
        for name in (self.id, self.timestamp, self.signature):
            if not headers.get(name):
                raise WebhookVerificationError(f"missing header {name}")
        clock = as_utc(now)
        assert clock is not None
        _check_timestamp(headers[self.timestamp], now=clock, header=self.timestamp)
        return {
            self.id: headers[self.id],
            self.timestamp: headers[self.timestamp],
            self.signature: _v1_entries(headers[self.signature], header=self.signature),
        }


def _check_timestamp(value: str, *, now: datetime, header: str) -> None:
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit()) or len(digits) > _MAX_TIMESTAMP_DIGITS:
        raise WebhookVerificationError(f"{header}: not a Unix timestamp in seconds")
    try:
        sent = datetime.fromtimestamp(int(digits), UTC)
    # Twelve digits reach past year 9999: ValueError, or OverflowError/OSError by platform.
    except (ValueError, OverflowError, OSError) as exc:
        raise WebhookVerificationError(
            f"{header}: too far in the future (more than 5 minutes)"
        ) from exc
    if sent < now - TOLERANCE:
        raise WebhookVerificationError(f"{header}: too old (more than 5 minutes)")
    if sent > now + TOLERANCE:
        raise WebhookVerificationError(f"{header}: too far in the future (more than 5 minutes)")


def _v1_entries(value: str, *, header: str) -> str:
    entries = [entry for entry in value.split() if _V1_ENTRY.fullmatch(entry)]
    if not entries:
        raise WebhookVerificationError(f"{header}: no v1 signature")
    return " ".join(entries)


#: A library's ``Webhook.sign(msg_id, timestamp, data)``: ``"v1,<base64 HMAC-SHA256>"`` of
#: ``"{msg_id}.{unix seconds}.{data}"`` (svix and standardwebhooks alike).
Signer = Callable[[str, datetime, str], str]


def verify_with_any(
    signers: Sequence[Signer],
    body: bytes,
    signed: Mapping[str, str],
    names: SignedHeaders,
    *,
    provider: str,
) -> None:
    """Pass if any configured secret's signature is among the delivery's (rotation).

    ``signed`` is what ``names.checked`` returned: headers present, timestamp inside the
    window, only well-formed ``v1,<base64>`` entries. The signature is computed by the
    library itself (its ``sign``); its ``verify`` is not called because it would redo all of
    that per secret (two header dict copies, the timestamp against the system clock) before
    the one thing left, which is done here as it does it: a constant-time comparison
    (``hmac.compare_digest``) with each entry. The libraries sign text: a body that is not
    UTF-8 matches no secret.
    """
    try:
        data = body.decode()
    except UnicodeDecodeError:
        data = None
    if data is not None:
        stamp = datetime.fromtimestamp(int(signed[names.timestamp]), UTC)
        given = [base64.b64decode(entry[3:]) for entry in signed[names.signature].split()]
        for sign in signers:
            try:
                expected = base64.b64decode(sign(signed[names.id], stamp, data)[3:])
            # Fail closed: whatever the library raises (an id that cannot be encoded) means
            # this secret did not sign the delivery.
            except Exception:  # noqa: S112
                continue
            for candidate in given:
                if hmac.compare_digest(expected, candidate):
                    return
    raise WebhookVerificationError(f"{provider}: no configured secret matches the signature")


def event_id_from(value: object, *, field: str) -> str:
    """A usable event id (the inbox's dedupe key), else WebhookPayloadError naming ``field``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_EVENT_ID:
        raise WebhookPayloadError(f"{field}: missing, not a string, or longer than {MAX_EVENT_ID}")
    return value


# -- bodies ----------------------------------------------------------------------------


def load_json(text: bytes | str, *, what: str = "body") -> Any:
    """Parse JSON the inbox can store on PostgreSQL and SQLite alike, else WebhookPayloadError.

    Rejected besides invalid JSON: NaN and Infinity (not JSON; PostgreSQL refuses them),
    NUL characters and lone surrogates in strings (``jsonb`` and UTF-8 refuse them). A body
    the database could not store would be answered 503 and redelivered for days.
    """
    try:
        plain = _plain_text(text)
        if plain is not None:  # the common case: one decoder, built once
            return _DECODER.decode(plain)
        value = json.loads(text, parse_constant=_reject_constant)
        _check_storable(value)
    except (ValueError, RecursionError) as exc:
        raise WebhookPayloadError(f"{what}: not JSON the inbox can store") from exc
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _plain_text(text: bytes | str) -> str | None:
    """The text of a document none of whose strings can hold a NUL or a lone surrogate:
    strict UTF-8 with no ``\\u`` escape anywhere (the only way JSON text spells either),
    else None. Spares most bodies the walk over every value (a fifth of a delivery's CPU)."""
    if isinstance(text, str):
        return None  # may hold lone surrogates already
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        return None  # json.loads also reads UTF-16 and UTF-32: the slow path checks those
    # A byte order mark: json.loads reads it as utf-8-sig, the decoder would refuse it.
    return decoded if "\\u" not in decoded and not decoded.startswith("\ufeff") else None


def _check_storable(value: Any) -> None:
    pending = [value]
    while pending:  # iterative: JSON may nest as deep as the parser allows
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ValueError("NUL in a string")
            item.encode()  # a lone surrogate raises UnicodeEncodeError (a ValueError)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def typed_envelope(payload: object, *, provider: str) -> tuple[str, Mapping[str, Any]]:
    """``(type, data)`` of a ``{"type": str, "data": object}`` body (Stack and Auth.js)."""
    if not isinstance(payload, dict):
        raise WebhookPayloadError(f"{provider}: body is not a JSON object")
    event_type, data = payload.get("type"), payload.get("data")
    if not isinstance(event_type, str) or not event_type:
        raise WebhookPayloadError(f"{provider}: field type missing or not a string")
    if not isinstance(data, dict):
        raise WebhookPayloadError(f"{provider}: field data missing or not an object")
    return event_type, data


@contextmanager
def payload_errors(provider: str, event_type: str) -> Iterator[None]:
    """Mapping errors of a stored payload as WebhookPayloadError (the drainer's poison row)."""
    try:
        yield
    # OverflowError, OSError: a timestamp beyond what datetime or the platform can hold.
    except (ValueError, TypeError, KeyError, OverflowError, OSError) as exc:
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise WebhookPayloadError(f"{provider} {event_type}: {reason}") from exc
