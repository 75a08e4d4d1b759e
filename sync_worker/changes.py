"""Normalized user changes: the one shape every provider and webhook produces.

Providers map raw upstream records to these value objects with pure functions; the engine
applies them. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class ChangeKind(StrEnum):
    UPSERT = "upsert"
    DELETE = "delete"
    LOGIN = "login"


class Source(StrEnum):
    WEBHOOK = "webhook"
    PULL = "pull"
    BACKFILL = "backfill"
    CLI = "cli"


class Action(StrEnum):
    """What applying one change did. Those in ``AUDITED`` are written to ``sync_audit``."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    RESTORED = "restored"
    LINKED = "linked"
    LOGIN = "login"
    STALE_SKIPPED = "stale_skipped"
    FAILED = "failed"
    UNCHANGED = "unchanged"
    SESSION_UPDATED = "session_updated"
    UNKNOWN = "unknown"  # a deletion of an identity never seen, without a version


AUDITED = frozenset(
    {
        Action.CREATED, Action.UPDATED, Action.DELETED, Action.RESTORED,
        Action.LINKED, Action.LOGIN, Action.STALE_SKIPPED, Action.FAILED,
    }
)  # fmt: skip

#: IdP-owned user columns a provider may state; each follows the provider when stated.
IDP_FIELDS = (
    "email", "email_verified", "name", "given_name", "family_name",
    "phone", "avatar_url", "blocked", "last_login_at",
)  # fmt: skip
#: User columns the app may fill itself (from app_metadata, teams...): a provider states
#: them only when it knows them, so by default they are not stated.
OPTIONAL_FIELDS = ("role", "tenant_id")


@dataclass(frozen=True, slots=True, kw_only=True)
class UserAttributes:
    """IdP-owned fields of a user, as the provider states them.

    ``stated`` names the fields the provider states for this record: for those, None (or
    False) is the provider's word and clears the stored value. A field it does not state
    keeps the stored value unless the record carries one (Auth.js has no ``last_login_at``
    column, so a pass must not erase the login a session recorded). By default the nine
    ``IDP_FIELDS`` are stated and ``role`` / ``tenant_id`` are not. ``profile`` holds
    app-owned profile fields (timezone, locale, ...) that a mapping derived from upstream
    data; they are used on create only unless config lists them in ``profile.overwrite``.
    """

    email: str | None = None
    email_verified: bool = False
    name: str | None = None
    given_name: str | None = None
    family_name: str | None = None
    phone: str | None = None
    avatar_url: str | None = None
    role: str | None = None
    tenant_id: str | None = None
    blocked: bool = False
    last_login_at: datetime | None = None
    created_at: datetime | None = None
    profile: Mapping[str, Any] = field(default_factory=dict)
    stated: frozenset[str] = frozenset(IDP_FIELDS)

    def states(self, name: str) -> bool:
        """Whether this record says something about ``name`` (a value, or a stated None)."""
        return name in self.stated or bool(getattr(self, name))


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkedIdentity:
    """A secondary account the upstream user holds (an OAuth account under Auth.js, say)."""

    provider: str
    external_id: str
    email: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """One upstream session or login."""

    external_session_id: str
    created_at: datetime | None = None
    last_seen_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    ip: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UserChange:
    """One change to one upstream identity.

    ``version`` is the upstream ``updated_at`` (or, for providers without one, the time the
    record was observed); an older version never overwrites a newer one. ``linked`` lists
    every secondary identity the user holds upstream, unless ``linked_stated`` is False
    (a webhook about the user alone): the stored ones are then kept. ``raw`` is the
    upstream record as received, kept for operators; keys in ``hash_exclude`` are left out of
    the content hash because they change without the user changing (Stack's
    ``last_active_at_millis``).
    """

    provider: str
    external_id: str
    kind: ChangeKind
    version: datetime | None = None
    attributes: UserAttributes | None = None
    linked: tuple[LinkedIdentity, ...] = ()
    linked_stated: bool = True
    session: SessionInfo | None = None
    raw: Mapping[str, Any] | None = None
    hash_exclude: frozenset[str] = frozenset()
    event_id: str | None = None

    def content_hash(self) -> str:
        """A stable digest of everything this change would write for the user."""
        raw = {k: v for k, v in (self.raw or {}).items() if k not in self.hash_exclude}
        body = {
            "attributes": _attributes_doc(self.attributes),
            "linked": sorted((i.provider, i.external_id, i.email or "") for i in self.linked),
            "raw": raw,
        }
        encoded = json.dumps(body, sort_keys=True, default=_json_default, separators=(",", ":"))
        return hashlib.sha256(encoded.encode()).hexdigest()


_ATTRIBUTE_FIELDS = tuple(f.name for f in fields(UserAttributes) if f.name != "stated")
_FLAT = (str, int, float, bool, type(None))


def _attributes_doc(attrs: UserAttributes | None) -> dict[str, Any] | None:
    """``asdict(attrs)`` without its deep copy, which was most of the hash's cost.

    For scalar values the copy encodes identically. A profile holding anything else (asdict
    would turn a nested dataclass into a dict) still goes through ``asdict``; the digests are
    pinned in tests/test_content_hash.py.
    """
    if attrs is None:
        return None
    profile = attrs.profile
    flat = type(profile) is dict and all(type(v) in _FLAT for v in profile.values())
    if not flat or type(attrs) is not UserAttributes:
        doc = asdict(attrs)
        del doc["stated"]
    else:
        doc = {name: getattr(attrs, name) for name in _ATTRIBUTE_FIELDS}
    # Only the optional fields' statement varies from record to record (Stack states the
    # tenant when it read the memberships); which IdP fields a provider states is fixed by
    # its mapper. Hashing just that part keeps every digest stored before it existed.
    optional = attrs.stated.intersection(OPTIONAL_FIELDS)
    if optional:
        doc["stated"] = sorted(optional)
    return doc


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, frozenset | set):
        return json.dumps(sorted(map(str, value)))
    return str(value)


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """Normalize a datetime to aware UTC (naive values are taken to be UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_timestamp(value: object) -> datetime | None:
    """Parse an ISO 8601 string, epoch milliseconds or a datetime into aware UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, str):  # the common case first: three per record of a pull
        parsed = datetime.fromisoformat(value)  # Python 3.11+ reads a "Z" suffix itself
        return parsed if parsed.tzinfo is UTC else as_utc(parsed)
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000, UTC)
    raise ValueError(f"not a timestamp: {value!r}")
