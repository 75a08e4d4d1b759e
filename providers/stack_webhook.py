"""Stack Auth webhooks: Svix-signed ``{"type", "data"}`` bodies (docs/idp/stack.md §3).

Verification is over the raw body with the ``svix`` package's signature (its ``sign``,
compared in constant time with each entry: ``webhook.verify_with_any``): ``svix-id``,
``svix-timestamp`` (±5 min) and ``svix-signature`` (several ``v1,`` entries during Svix's
own rotation), tried with every configured secret (ours). White-labelled Svix sends
``webhook-*`` instead; both are read. The body is parsed with ``json`` only after
verification. The event id is ``svix-id``, the same on every redelivery.

Stack bodies carry no time and Stack users no ``updated_at``, so every change's version is
the time the inbox received the event: they apply in the order received.

    user.created, user.updated   upsert of the server user object; memberships are not in
                                 it, so the stored tenant is kept (not stated)
    user.deleted                 delete
    team_membership.created,     fetch the user (re-read with their memberships: the
    team_membership.deleted      tenant may change)
    anything else                ignored: team.* bodies name no users (a team's deletion
                                 leaves its members' tenant to the scheduled reconcile),
                                 permissions do not map to a field

Stack's webhooks have gaps (no event for email verification, OAuth linking, the creator's
membership of a new team; §3), so the reconcile job stays necessary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from providers.stack import PROVIDER, to_change
from providers.webhook import (
    InboxItem,
    SignedHeaders,
    Signer,
    WebhookReceiver,
    Work,
    event_id_from,
    load_json,
    lower_headers,
    payload_errors,
    typed_envelope,
    verify_with_any,
)
from sync_worker.changes import ChangeKind, UserChange, as_utc
from sync_worker.errors import ConfigError

__all__ = ["EVENT_TYPES", "SVIX_HEADERS", "WEBHOOK_HEADERS", "StackWebhookReceiver"]

SVIX_HEADERS = SignedHeaders("svix-id", "svix-timestamp", "svix-signature")
WEBHOOK_HEADERS = SignedHeaders("webhook-id", "webhook-timestamp", "webhook-signature")

_Handler = Callable[[Mapping[str, Any], str, datetime], Work]


def _upsert(data: Mapping[str, Any], event_id: str, received_at: datetime) -> Work:
    change = to_change(data, observed_at=received_at)  # no team_ids: the tenant is kept
    return Work(changes=(replace(change, event_id=event_id),))


def _delete(data: Mapping[str, Any], event_id: str, received_at: datetime) -> Work:
    change = UserChange(
        provider=PROVIDER,
        external_id=_text_field(data, "id"),
        kind=ChangeKind.DELETE,
        version=received_at,
        event_id=event_id,
    )
    return Work(changes=(change,))


def _membership(data: Mapping[str, Any], event_id: str, received_at: datetime) -> Work:
    return Work(fetch=(_text_field(data, "user_id"),))


_HANDLERS: Mapping[str, _Handler] = {
    "user.created": _upsert,
    "user.updated": _upsert,
    "user.deleted": _delete,
    "team_membership.created": _membership,
    "team_membership.deleted": _membership,
}
#: The event types the worker uses; any other well-signed type is stored as ignored.
EVENT_TYPES = frozenset(_HANDLERS)


class StackDecoder:
    """Stored payloads into work for the drainer (pure; needs no secret)."""

    provider: str = PROVIDER

    def to_work(
        self, item_payload: Mapping[str, Any], *, event_id: str, received_at: datetime
    ) -> Work:
        event_type, data = typed_envelope(item_payload, provider=PROVIDER)
        handler = _HANDLERS.get(event_type)
        if handler is None:
            return Work()
        received = as_utc(received_at)
        assert received is not None
        with payload_errors(PROVIDER, event_type):
            return handler(data, event_id, received)


class StackWebhookReceiver(StackDecoder):
    """``POST /webhooks/stack`` (see the module docstring)."""

    provider: str = PROVIDER

    def __init__(self, secrets: Iterable[str]) -> None:
        """``secrets``: the ``whsec_...`` values of ``STACK_WEBHOOK_SECRET`` (any verifies)."""
        self._signers = tuple(_signer(secret) for secret in secrets)
        if not self._signers:
            raise ConfigError("providers.stack.webhook_secret: missing")

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: datetime) -> list[InboxItem]:
        lowered = lower_headers(headers)
        names = SVIX_HEADERS if any(k.startswith("svix-") for k in lowered) else WEBHOOK_HEADERS
        signed = names.checked(lowered, now=now)
        verify_with_any(self._signers, body, signed, names, provider=PROVIDER)
        payload = load_json(body)
        event_type, _ = typed_envelope(payload, provider=PROVIDER)
        item = InboxItem(
            event_id=event_id_from(signed[names.id], field=names.id),
            event_type=event_type,
            payload=payload,
            ignored=event_type not in EVENT_TYPES,
        )
        return [item]


if TYPE_CHECKING:
    _conforms: type[WebhookReceiver] = StackWebhookReceiver


def _signer(secret: str) -> Signer:
    # Imported here: ``svix`` loads its whole API client (2.2 s measured), which only a
    # process that receives Stack webhooks should pay for.
    from svix.webhooks import Webhook as SvixWebhook

    try:
        return SvixWebhook(secret).sign
    except Exception as exc:  # binascii.Error, EmptyWebhookSecretError: never show the value
        raise ConfigError(
            "providers.stack.webhook_secret: not a Svix signing secret (whsec_<base64>)"
        ) from exc


def _text_field(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"data.{key}: missing or not a string")
    return value
