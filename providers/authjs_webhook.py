"""Auth.js webhooks: Standard Webhooks-signed POSTs that the app's ``events`` callbacks send.

Body: ``{"type": "<event name>", "data": <the message Auth.js passes to that event>}``
(docs/architecture.md, Providers; docs/idp/authjs.md §3), the user's adapter id in ``data.user.id``.
Verification is with the ``standardwebhooks`` package's signature (its ``sign``, compared in
constant time: ``webhook.verify_with_any``; ``webhook-id``, ``webhook-timestamp`` ±5 min,
``webhook-signature``), tried with every configured ``whsec_`` secret. The event id
is ``webhook-id``. Bodies carry no time: a change's version is when the inbox received it.

    createUser, updateUser  upsert of the AdapterUser in ``data.user`` (a whole user: core
                            passes what the adapter returned). Linked accounts are not in
                            these events, yet the engine reads ``linked=()`` as "has none"
                            and would unlink the user's accounts until the next pull: see
                            LIMITATION below.
    linkAccount             upsert of ``data.user`` linked to ``data.account``, and a fetch
                            of the user: the event names only the new account, the app's
                            database has them all.
    signIn                  a login at the time received, naming no session (the message
                            holds no session token): ``last_login_at`` moves, no session row
                            is written (the pull brings the database session; a JWT session
                            is known by its ``jti`` at signOut).
    signOut                 with ``data.session`` (database strategy: the deleted row, which
                            some adapters return and @auth/pg-adapter does not) the session
                            is revoked under the id the pull uses (SHA-256 of its token);
                            with ``data.token`` (JWT strategy) the session ``jwt:<jti>`` is
                            revoked; with neither there is nothing to do.
    anything else           ignored (``session`` fires on every session read).

LIMITATION: until the engine can be told "linked accounts not stated", createUser and
updateUser changes carry ``linked=()``. For a user with OAuth accounts (an existing user
signing in by magic link fires updateUser), applying one soft-deletes those linked
identities; the next Auth.js pull restores them.

The inbox never holds credentials: ``verify`` stores the user's AdapterUser fields only,
the account without its OAuth tokens, the session with its token replaced by its SHA-256
id (``sessionId``), the JWT's ``sub``/``jti``/``iat``/``exp`` claims only, and no OAuth
``profile``. Ignored types are stored without their data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from standardwebhooks.webhooks import Webhook as StandardWebhook

from providers.authjs import DEFAULT_SESSION_MAX_AGE, PROVIDER, external_id, session_id, to_change
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
from sync_worker.changes import ChangeKind, SessionInfo, UserChange, as_utc, parse_timestamp
from sync_worker.errors import ConfigError

__all__ = ["EVENT_TYPES", "HEADERS", "AuthjsWebhookReceiver"]

HEADERS = SignedHeaders("webhook-id", "webhook-timestamp", "webhook-signature")
_USER_FIELDS = ("id", "name", "email", "emailVerified", "image", "createdAt")
_ACCOUNT_SECRETS = frozenset(
    {"access_token", "refresh_token", "id_token", "oauth_token", "oauth_token_secret"}
)
_JWT_CLAIMS = ("sub", "jti", "iat", "exp")
EVENT_TYPES = frozenset({"createUser", "updateUser", "linkAccount", "signIn", "signOut"})


class AuthjsDecoder:
    """Stored payloads into work for the drainer (pure; needs no secret)."""

    provider: str = PROVIDER

    def __init__(self, *, session_max_age: timedelta = DEFAULT_SESSION_MAX_AGE) -> None:
        """``session_max_age``: the app's Auth.js ``session.maxAge`` (dates a revoked session)."""
        self._max_age = session_max_age

    def to_work(
        self, item_payload: Mapping[str, Any], *, event_id: str, received_at: datetime
    ) -> Work:
        event_type, data = typed_envelope(item_payload, provider=PROVIDER)
        if event_type not in EVENT_TYPES:
            return Work()
        received = as_utc(received_at)
        assert received is not None
        with payload_errors(PROVIDER, event_type):
            if event_type == "signIn":
                return Work(changes=(_sign_in(data, event_id, received),))
            if event_type == "signOut":
                return _sign_out(data, event_id, received, self._max_age)
            return _user_work(event_type, data, event_id, received)


class AuthjsWebhookReceiver(AuthjsDecoder):
    """``POST /webhooks/authjs`` (see the module docstring)."""

    provider: str = PROVIDER

    def __init__(
        self, secrets: Iterable[str], *, session_max_age: timedelta = DEFAULT_SESSION_MAX_AGE
    ) -> None:
        """``secrets``: the ``whsec_...`` values of ``AUTHJS_WEBHOOK_SECRET`` (any verifies);
        ``session_max_age``: the app's Auth.js ``session.maxAge`` (dates a revoked session)."""
        super().__init__(session_max_age=session_max_age)
        self._signers = tuple(_signer(secret) for secret in secrets)
        if not self._signers:
            raise ConfigError("providers.authjs.webhook_secret: missing")

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: datetime) -> list[InboxItem]:
        signed = HEADERS.checked(lower_headers(headers), now=now)
        verify_with_any(self._signers, body, signed, HEADERS, provider=PROVIDER)
        event_type, data = typed_envelope(load_json(body), provider=PROVIDER)
        ignored = event_type not in EVENT_TYPES
        item = InboxItem(
            event_id=event_id_from(signed[HEADERS.id], field=HEADERS.id),
            event_type=event_type,
            payload={"type": event_type, "data": {} if ignored else _stored(data)},
            ignored=ignored,
        )
        return [item]


if TYPE_CHECKING:
    _conforms: type[WebhookReceiver] = AuthjsWebhookReceiver


# -- what is stored --------------------------------------------------------------------


def _stored(data: Mapping[str, Any]) -> dict[str, Any]:
    """The event's message without credentials or fields the worker does not read."""
    kept = {k: v for k, v in data.items() if k not in ("profile", "user", "account")}
    if isinstance(user := data.get("user"), dict):
        kept["user"] = {k: user[k] for k in _USER_FIELDS if k in user}
    if isinstance(account := data.get("account"), dict):
        kept["account"] = {k: v for k, v in account.items() if k not in _ACCOUNT_SECRETS}
    if isinstance(session := data.get("session"), dict):
        kept["session"] = _session_without_token(session)
    if isinstance(token := data.get("token"), dict):
        kept["token"] = {k: token[k] for k in _JWT_CLAIMS if k in token}
    return kept


def _session_without_token(session: Mapping[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in session.items() if k != "sessionToken"}
    token = session.get("sessionToken")
    if isinstance(token, str) and token:
        kept["sessionId"] = session_id(token)
    return kept


# -- to work ---------------------------------------------------------------------------


def _user_work(event_type: str, data: Mapping[str, Any], event_id: str, at: datetime) -> Work:
    user = _object(data, "user")
    accounts = [_object(data, "account")] if event_type == "linkAccount" else []
    # An event tells of one account at most, never all of them: the stored links are kept
    # (the next pull, or the drainer's re-read of the user, brings the full set).
    change = replace(
        to_change(user, accounts, observed_at=at), event_id=event_id, linked_stated=False
    )
    fetch = (change.external_id,) if accounts else ()
    return Work(changes=(change,), fetch=fetch)


def _sign_in(data: Mapping[str, Any], event_id: str, at: datetime) -> UserChange:
    # No session of its own: a row per sign-in would never expire nor be revoked.
    return UserChange(
        provider=PROVIDER,
        external_id=external_id(_object(data, "user").get("id")),
        kind=ChangeKind.LOGIN,
        version=at,
        event_id=event_id,
    )


def _sign_out(data: Mapping[str, Any], event_id: str, at: datetime, max_age: timedelta) -> Work:
    if isinstance(data.get("session"), dict):
        user_id, session = _database_session(data["session"], at, max_age)
    elif isinstance(data.get("token"), dict):
        user_id, session = _jwt_session(data["token"], at)
    else:
        return Work()  # @auth/pg-adapter's deleteSession returns nothing: no session named
    if user_id is None or session is None:
        return Work()
    change = UserChange(
        provider=PROVIDER,
        external_id=user_id,
        kind=ChangeKind.LOGIN,
        version=at,
        session=session,
        event_id=event_id,
    )
    return Work(changes=(change,))


def _database_session(
    session: Mapping[str, Any], at: datetime, max_age: timedelta
) -> tuple[str | None, SessionInfo | None]:
    sid = session.get("sessionId")
    token = session.get("sessionToken")  # a payload stored before tokens were stripped
    if not (isinstance(sid, str) and sid) and isinstance(token, str) and token:
        sid = session_id(token)
    if not isinstance(sid, str) or not sid or session.get("userId") in (None, ""):
        return None, None
    expires = parse_timestamp(session.get("expires"))
    # As the pull dates a session: Auth.js last wrote the row at expires - maxAge.
    written = min(expires - max_age, at) if expires is not None else None
    info = SessionInfo(
        external_session_id=sid,
        created_at=written,
        last_seen_at=written,
        expires_at=expires,
        revoked_at=at,
    )
    return external_id(session["userId"]), info


def _jwt_session(token: Mapping[str, Any], at: datetime) -> tuple[str | None, SessionInfo | None]:
    jti, sub = token.get("jti"), token.get("sub")
    if not isinstance(jti, str) or not jti or sub in (None, ""):
        return None, None
    issued = _epoch_seconds("token.iat", token.get("iat"))
    info = SessionInfo(
        external_session_id=f"jwt:{jti}",
        created_at=issued,
        last_seen_at=issued,
        expires_at=_epoch_seconds("token.exp", token.get("exp")),
        revoked_at=at,
    )
    return external_id(sub), info


def _epoch_seconds(field: str, value: object) -> datetime | None:
    """A JWT NumericDate (seconds, unlike the milliseconds ``parse_timestamp`` reads)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field}: not a number of seconds")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"{field}: out of range") from exc


def _object(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"data.{key}: missing or not an object")
    return value


def _signer(secret: str) -> Signer:
    try:
        webhook = StandardWebhook(secret)
    except Exception as exc:  # binascii.Error, EmptyWebhookSecretError: never show the value
        raise ConfigError(
            "providers.authjs.webhook_secret: not a Standard Webhooks secret (whsec_<base64>)"
        ) from exc
    return webhook.sign
