"""The rows of the worker's tables as the store reads and writes them: typed, no I/O.

The engine's planner takes a ``Snapshot`` (the current rows a batch touches, loaded by
``db.snapshot``) and returns ``Writes`` (every row to insert or update, executed by
``db.writes``). Rows are TypedDicts, plain dicts at run time: a batch makes tens of
thousands of them, and dicts are what the driver takes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, NotRequired, TypedDict, TypeVar

Key = tuple[str, str]  # (provider, external id) of an identity or a session


class UserRow(TypedDict):
    id: uuid.UUID
    email: str | None
    email_verified: bool
    name: str | None
    given_name: str | None
    family_name: str | None
    phone: str | None
    avatar_url: str | None
    role: str
    tenant_id: str | None
    blocked: bool
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class ProfileRow(TypedDict):
    id: uuid.UUID
    user_id: uuid.UUID
    display_name: str | None
    avatar_url: str | None
    timezone: str
    currency: str
    locale: str
    settings: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime


class IdentityRow(TypedDict):
    provider: str
    external_id: str
    user_id: uuid.UUID
    email: str | None
    upstream_updated_at: datetime | None
    content_hash: str | None
    raw: NotRequired[Mapping[str, Any] | None]  # absent from the cheap triage read
    first_seen_at: datetime
    last_synced_at: datetime
    deleted_at: datetime | None


class SessionRow(TypedDict):
    id: uuid.UUID
    user_id: uuid.UUID
    provider: str
    external_session_id: str
    ip: str | None
    user_agent: str | None
    created_at: datetime
    last_seen_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class AuditRow(TypedDict):
    """An audit row as planned; the writer stamps occurred_at, run_id and source."""

    provider: str
    external_id: str
    user_id: uuid.UUID | None
    action: str
    changes: Mapping[str, Any] | None
    event_id: str | None
    error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Current rows for the identities and users a batch touches (read only)."""

    identities: Mapping[Key, IdentityRow] = field(default_factory=dict)
    users: Mapping[uuid.UUID, UserRow] = field(default_factory=dict)
    profiles: Mapping[uuid.UUID, ProfileRow] = field(default_factory=dict)
    verified_email_owner: Mapping[str, uuid.UUID] = field(default_factory=dict)
    sessions: Mapping[Key, SessionRow] = field(default_factory=dict)
    #: (provider, external id, event id) of stale deliveries already audited once.
    stale_audited: frozenset[tuple[str, str, str]] = frozenset()


R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class UpdateGroup(Generic[R]):
    """Rows that change the same set of columns: one multi-row upsert."""

    columns: tuple[str, ...]
    rows: list[R]


@dataclass(slots=True, kw_only=True)
class Writes:
    """Everything one batch writes, grouped into set statements."""

    new_users: list[UserRow] = field(default_factory=list)
    user_updates: list[UpdateGroup[UserRow]] = field(default_factory=list)
    new_profiles: list[ProfileRow] = field(default_factory=list)
    profile_updates: list[UpdateGroup[ProfileRow]] = field(default_factory=list)
    new_identities: list[IdentityRow] = field(default_factory=list)
    identity_updates: list[IdentityRow] = field(default_factory=list)
    new_sessions: list[SessionRow] = field(default_factory=list)
    sessions: list[SessionRow] = field(default_factory=list)  # stored ones that changed
    revoke_sessions_of: list[tuple[str, uuid.UUID]] = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.new_users or self.user_updates or self.new_profiles or self.profile_updates
            or self.new_identities or self.identity_updates or self.new_sessions or self.sessions
            or self.revoke_sessions_of or self.audit
        )  # fmt: skip
