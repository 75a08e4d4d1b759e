"""The sender side of ``sync-worker simulate PROVIDER EVENT``: realistic, really signed events.

``build`` makes the headers and body an IdP would send, signed as that IdP signs: Stack
through Svix (``svix`` ``Webhook.sign``), an Auth.js app's events callback through Standard
Webhooks (``standardwebhooks`` ``Webhook.sign``), Auth0 with the static ``Authorization``
token (a Log Stream sends it as configured, an Event Stream as ``Bearer``). ``post`` delivers
them. The ids of the user come from the email, so ``user.created`` then ``user.updated`` for
one email concern one user; event ids are random unless given, so repeats are new events.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import string
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from providers.webhook import secrets_from
from sync_worker.changes import as_utc
from sync_worker.errors import ConfigError, SyncWorkerError

__all__ = [
    "EVENTS",
    "Delivery",
    "DeliveryError",
    "UnknownEventError",
    "build",
    "endpoint",
    "post",
]

#: The events ``build`` knows, per provider (for the CLI's help and choices).
EVENTS: Mapping[str, tuple[str, ...]] = {
    "stack": ("user.created", "user.updated", "user.deleted", "team_membership.created"),
    "auth0": ("ss", "s", "sdu", "user.created", "user.updated", "user.deleted"),
    "authjs": ("createUser", "updateUser", "signIn", "signOut", "linkAccount"),
}
_ID_ALPHABET = string.ascii_letters + string.digits
_JSON = {"content-type": "application/json"}


class UnknownEventError(ConfigError, ValueError):
    """Bad usage: a provider or event ``build`` does not know (exit 2, like a config error)."""


class DeliveryError(SyncWorkerError):
    """The daemon could not be reached."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """The daemon's answer to one simulated webhook."""

    status: int
    body: str


@dataclass(frozen=True, slots=True, kw_only=True)
class _Event:
    name: str
    email: str
    now: datetime
    secret: str
    event_id: str | None


def build(
    provider: str,
    event: str,
    *,
    email: str,
    now: datetime,
    secret: str,
    event_id: str | None = None,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` from ``provider``, signed with ``secret``.

    ``secret`` is the endpoint's configured value (``STACK_WEBHOOK_SECRET``,
    ``AUTHJS_WEBHOOK_SECRET``, ``AUTH0_WEBHOOK_TOKEN``); of several, the first signs.
    Raises UnknownEventError naming the valid providers or events.
    """
    builder = _BUILDERS.get(provider)
    if builder is None:
        raise UnknownEventError(f"simulate: unknown provider {provider!r}; use one of {_names()}")
    if event not in EVENTS[provider]:
        valid = ", ".join(EVENTS[provider])
        raise UnknownEventError(f"simulate: unknown {provider} event {event!r}; use one of {valid}")
    when = as_utc(now)
    assert when is not None
    return builder(_Event(name=event, email=email, now=when, secret=secret, event_id=event_id))


def endpoint(base_url: str, provider: str) -> str:
    """The daemon's webhook URL for ``provider`` (``http://127.0.0.1:8080`` + path)."""
    return f"{base_url.rstrip('/')}/webhooks/{provider}"


def post(url: str, headers: Mapping[str, str], body: bytes, *, timeout: float = 10.0) -> Delivery:
    """POST one delivery; DeliveryError when the daemon cannot be reached."""
    import requests  # here: every CLI start imports this module, for EVENTS

    try:
        response = requests.post(url, data=body, headers=dict(headers), timeout=timeout)
    except requests.RequestException as exc:
        raise DeliveryError(f"simulate: POST {url} failed ({type(exc).__name__})") from exc
    return Delivery(status=response.status_code, body=response.text)


def _names() -> str:
    return ", ".join(EVENTS)


# -- Stack (Svix) ----------------------------------------------------------------------


def _stack(event: _Event) -> tuple[dict[str, str], bytes]:
    user_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"stack:{event.email}"))
    team_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "stack:team:simulated"))
    if event.name == "user.deleted":
        data: dict[str, Any] = {"id": user_id, "teams": [{"id": team_id}]}
    elif event.name == "team_membership.created":
        data = {"team_id": team_id, "user_id": user_id}
    else:
        data = _stack_user(event, user_id)
    body = _body({"type": event.name, "data": data})
    return _svix_headers(event, body), body


def _stack_user(event: _Event, user_id: str) -> dict[str, Any]:
    signed_up = event.now - timedelta(days=0 if event.name == "user.created" else 30)
    return {
        "id": user_id,
        "primary_email": event.email,
        "primary_email_verified": event.name == "user.updated",
        "primary_email_auth_enabled": True,
        "display_name": _display_name(event.email),
        "selected_team": None,
        "selected_team_id": None,
        "profile_image_url": None,
        "signed_up_at_millis": _millis(signed_up),
        "last_active_at_millis": _millis(event.now),
        "has_password": True,
        "otp_auth_enabled": False,
        "passkey_auth_enabled": False,
        "client_metadata": {"timezone": "Europe/Paris"},
        "client_read_only_metadata": None,
        "server_metadata": None,
        "is_anonymous": False,
        "is_restricted": False,
        "restricted_reason": None,
        "restricted_by_admin": False,
        "restricted_by_admin_reason": None,
        "restricted_by_admin_private_details": None,
        "country_code": "FR",
        "oauth_providers": [],
        "auth_with_email": True,
        "requires_totp_mfa": False,
    }


def _svix_headers(event: _Event, body: bytes) -> dict[str, str]:
    # Imported here: ``svix`` loads its whole API client (2.2 s measured).
    from svix.webhooks import Webhook as SvixWebhook

    msg_id = event.event_id or f"msg_{_random_id(27)}"
    signature = SvixWebhook(_first(event.secret, "stack")).sign(msg_id, event.now, body.decode())
    return {
        **_JSON,
        "svix-id": msg_id,
        "svix-timestamp": str(int(event.now.timestamp())),
        "svix-signature": signature,
    }


# -- Auth.js (Standard Webhooks) -------------------------------------------------------


def _authjs(event: _Event) -> tuple[dict[str, str], bytes]:
    digest = _digest(event.email)
    user_id = int(digest[:8], 16) % 1_000_000 + 1  # a SERIAL id, as @auth/pg-adapter has
    user = {
        "id": user_id,
        "name": _display_name(event.email),
        "email": event.email,
        "emailVerified": _iso(event.now) if event.name == "updateUser" else None,
        "image": f"https://avatars.githubusercontent.com/u/{int(digest[8:14], 16)}?v=4",
    }
    account = {
        "provider": "github",
        "type": "oauth",
        "providerAccountId": str(int(digest[8:14], 16)),
        "access_token": f"gho_{_random_id(36)}",
        "token_type": "bearer",
        "scope": "read:user,user:email",
        "userId": user_id,
    }
    profile = {"login": _local_part(event.email), "email": event.email}
    messages: dict[str, dict[str, Any]] = {
        "createUser": {"user": user},
        "updateUser": {"user": user},
        "linkAccount": {"user": user, "account": account, "profile": profile},
        "signIn": {"user": user, "account": account, "profile": profile, "isNewUser": False},
        "signOut": {"session": _authjs_session(event, user_id)},
    }
    body = _body({"type": event.name, "data": messages[event.name]})
    return _standard_headers(event, body), body


def _authjs_session(event: _Event, user_id: int) -> dict[str, Any]:
    """What a database-strategy adapter's deleteSession returns (Prisma's does)."""
    expires = event.now + timedelta(days=30)
    return {"sessionToken": str(uuid.uuid4()), "userId": user_id, "expires": _iso(expires)}


def _standard_headers(event: _Event, body: bytes) -> dict[str, str]:
    msg_id = event.event_id or f"msg_{_random_id(27)}"
    from standardwebhooks.webhooks import Webhook as StandardWebhook

    webhook = StandardWebhook(_first(event.secret, "authjs"))
    return {
        **_JSON,
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(event.now.timestamp())),
        "webhook-signature": webhook.sign(msg_id, event.now, body.decode()),
    }


# -- Auth0 (Log Streams and Event Streams) ---------------------------------------------


def _auth0(event: _Event) -> tuple[dict[str, str], bytes]:
    from providers.auth0_webhook import authorization_values, bearer_header

    tokens = authorization_values(secrets_from(event.secret))
    if not tokens:
        raise ConfigError("providers.auth0.webhook_token: missing (simulate sends it)")
    user = _auth0_user(event)
    if event.name.startswith("user."):
        body = _body(_cloud_event(event, user))
        return {**_JSON, "authorization": bearer_header(tokens[0])}, body
    log_id = event.event_id or _log_id(event.now)
    body = _body([{"log_id": log_id, "data": _log_record(event, user, log_id)}])
    return {**_JSON, "authorization": tokens[0]}, body  # a Log Stream sends it as configured


def _auth0_user(event: _Event) -> dict[str, Any]:
    local_id = _digest(event.email)[:24]
    created = event.now - timedelta(days=0 if event.name in ("ss", "user.created") else 30)
    return {
        "user_id": f"auth0|{local_id}",
        "email": event.email,
        "email_verified": event.name == "user.updated",
        "name": _display_name(event.email),
        "nickname": _local_part(event.email),
        "picture": f"https://s.gravatar.com/avatar/{_digest(event.email)[:32]}?s=480&d=mp",
        "identities": [
            {
                "provider": "auth0",
                "connection": "Username-Password-Authentication",
                "user_id": local_id,
                "isSocial": False,
            }
        ],
        "app_metadata": {},
        "user_metadata": {"timezone": "Europe/Paris"},
        "created_at": _iso(created),
        "updated_at": _iso(event.now),
    }


def _cloud_event(event: _Event, user: dict[str, Any]) -> dict[str, Any]:
    obj = {**user, "deleted_at": _iso(event.now)} if event.name == "user.deleted" else user
    return {
        "specversion": "1.0",
        "type": event.name,
        "source": "urn:auth0:example.us.auth0.com",
        "id": event.event_id or f"evt_{_random_id(22)}",
        "time": _iso(event.now),
        "data": {"object": obj},
        "a0tenant": "example",
        "a0stream": f"est_{_random_id(22)}",
    }


_LOG_DESCRIPTIONS = {"ss": "", "s": "Successful login", "sdu": "User was deleted"}


def _log_record(event: _Event, user: Mapping[str, Any], log_id: str) -> dict[str, Any]:
    return {
        "date": _iso(event.now),
        "type": event.name,
        "description": _LOG_DESCRIPTIONS[event.name],
        "connection": "Username-Password-Authentication",
        "connection_id": "con_Simulated0000000",
        "client_id": "SimulatedClientId0000000000000000",
        "client_name": "sync-worker simulate",
        "ip": "203.0.113.7",
        "user_agent": "Chrome 126.0.0 / Mac OS X 10.15.7",
        "details": {"prompts": [], "initiatedAt": _millis(event.now)},
        "hostname": "example.us.auth0.com",
        "user_id": user["user_id"],
        "user_name": event.email,
        "strategy": "auth0",
        "strategy_type": "database",
        "log_id": log_id,
        "tenant_name": "example",
    }


def _log_id(now: datetime) -> str:
    """A 56-digit id shaped like Auth0's, increasing with time."""
    return f"9002{now:%Y%m%d%H%M%S}" + "".join(secrets.choice(string.digits) for _ in range(38))


# -- helpers ---------------------------------------------------------------------------


def _first(secret: str, provider: str) -> str:
    values = secrets_from(secret)
    if not values:
        raise ConfigError(f"providers.{provider}.webhook_secret: missing (simulate signs with it)")
    return values[0]


def _body(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _display_name(email: str) -> str:
    local = _local_part(email).replace("_", ".").replace("-", ".")
    return " ".join(part.capitalize() for part in local.split(".") if part) or email


def _local_part(email: str) -> str:
    return email.partition("@")[0]


def _digest(text: str) -> str:
    return hashlib.sha256(text.strip().lower().encode()).hexdigest()


def _random_id(length: int) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _millis(when: datetime) -> int:
    return int(when.timestamp() * 1000)


_BUILDERS: Mapping[str, Callable[[_Event], tuple[dict[str, str], bytes]]] = {
    "stack": _stack,
    "auth0": _auth0,
    "authjs": _authjs,
}
