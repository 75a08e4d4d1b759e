"""Deciding what a batch of changes does to the database: pure, no I/O.

``plan(changes, snapshot, settings, now)`` takes the batch (already validated and deduplicated)
and the current rows it touches, and returns every row to insert or update and every audit row
to append. The engine loads the snapshot and executes the plan; this module holds the rules.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sync_worker.changes import AuditAction, ChangeKind, UserAttributes, UserChange

Row = dict[str, Any]
Key = tuple[str, str]

# IdP-owned user columns: they follow the provider on every real change.
USER_FIELDS = (
    "email", "email_verified", "name", "given_name", "family_name",
    "phone", "avatar_url", "blocked", "last_login_at",
)  # fmt: skip
# Set from the provider only when it states them (a value, or None named in
# ``UserAttributes.stated``); otherwise the stored value stays.
OPTIONAL_USER_FIELDS = ("role", "tenant_id")
PROFILE_IDP_FIELDS = {"display_name": "name", "avatar_url": "avatar_url"}
APP_PROFILE_FIELDS = ("timezone", "currency", "locale", "settings")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanSettings:
    link_by_verified_email: bool = True
    profile_defaults: Mapping[str, Any] = field(
        default_factory=lambda: {"timezone": "UTC", "currency": "USD", "locale": "en"}
    )
    profile_overwrite: frozenset[str] = frozenset()
    default_role: str = "member"


@dataclass(slots=True, kw_only=True)
class Snapshot:
    """Current rows for the identities and users a batch touches."""

    identities: dict[Key, Row] = field(default_factory=dict)
    users: dict[uuid.UUID, Row] = field(default_factory=dict)
    profiles: dict[uuid.UUID, Row] = field(default_factory=dict)
    verified_email_owner: dict[str, uuid.UUID] = field(default_factory=dict)
    sessions: dict[Key, Row] = field(default_factory=dict)
    stale_audited: set[tuple[str, str, str]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Outcome:
    provider: str
    external_id: str
    action: str  # an AuditAction value, or "unchanged" / "unknown"
    user_id: uuid.UUID | None = None
    error: str | None = None
    changes: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class UpdateGroup:
    """Rows that change the same set of columns: one multi-row upsert."""

    columns: tuple[str, ...]
    rows: list[Row]


@dataclass(slots=True, kw_only=True)
class Plan:
    new_users: list[Row] = field(default_factory=list)
    user_updates: list[UpdateGroup] = field(default_factory=list)
    new_profiles: list[Row] = field(default_factory=list)
    profile_updates: list[UpdateGroup] = field(default_factory=list)
    new_identities: list[Row] = field(default_factory=list)
    identity_updates: list[Row] = field(default_factory=list)
    sessions: list[Row] = field(default_factory=list)
    revoke_sessions_of: list[tuple[str, uuid.UUID]] = field(default_factory=list)
    audit: list[Row] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def writes_nothing(self) -> bool:
        return not (
            self.new_users or self.user_updates or self.new_profiles or self.profile_updates
            or self.new_identities or self.identity_updates or self.sessions
            or self.revoke_sessions_of or self.audit
        )  # fmt: skip


def dedupe(changes: Iterable[UserChange]) -> list[UserChange]:
    """Keep the newest upsert/delete per identity (later wins a tie) and each session once."""
    latest: dict[Key, UserChange] = {}
    logins: dict[tuple[str, str], UserChange] = {}
    for change in changes:
        if change.kind is ChangeKind.LOGIN:
            assert change.session is not None
            logins[(change.provider, change.session.external_session_id)] = change
            continue
        key = (change.provider, change.external_id)
        held = latest.get(key)
        if held is None or not _older(change.version, held.version):
            latest[key] = change
    return [*latest.values(), *logins.values()]


def _older(candidate: datetime | None, held: datetime | None) -> bool:
    return candidate is not None and held is not None and candidate < held


class _Planner:
    """Walks a batch once, keeping a working image of every row it touches."""

    def __init__(self, snapshot: Snapshot, settings: PlanSettings, now: datetime) -> None:
        self.snap = snapshot
        self.settings = settings
        self.now = now
        self.plan = Plan()
        self.users = {k: dict(v) for k, v in snapshot.users.items()}
        self.profiles = {k: dict(v) for k, v in snapshot.profiles.items()}
        self.identities = {k: dict(v) for k, v in snapshot.identities.items()}
        self.by_user: dict[uuid.UUID, set[Key]] = defaultdict(set)
        for key, row in self.identities.items():
            self.by_user[row["user_id"]].add(key)
        self.email_owner = dict(snapshot.verified_email_owner)
        self.new_user_ids: set[uuid.UUID] = set()
        self.user_cols: dict[uuid.UUID, set[str]] = defaultdict(set)
        self.profile_cols: dict[uuid.UUID, set[str]] = defaultdict(set)
        # Insertion-ordered sets (dicts): membership tests stay O(1) in large batches.
        self.new_identity_keys: dict[Key, None] = {}
        self.changed_identity_keys: dict[Key, None] = {}

    # -- entry -------------------------------------------------------------------------

    def run(self, changes: Sequence[UserChange]) -> Plan:
        ordered = sorted(changes, key=lambda c: c.kind is ChangeKind.LOGIN)
        for change in ordered:
            if change.kind is ChangeKind.UPSERT:
                self._upsert(change)
            elif change.kind is ChangeKind.DELETE:
                self._delete(change)
            else:
                self._login(change)
        self._emit()
        return self.plan

    # -- upserts -----------------------------------------------------------------------

    def _upsert(self, change: UserChange) -> None:
        key = (change.provider, change.external_id)
        held = self.identities.get(key)
        digest = change.content_hash()
        if held is None:
            self._create_or_link(change, digest)
            return
        if self._stale(change, held):
            return
        if held["content_hash"] == digest and held["deleted_at"] is None:
            self._outcome(change, "unchanged", held["user_id"])
            return
        user_id = held["user_id"]
        restoring = held["deleted_at"] is not None
        diff = self._apply_attributes(user_id, change.attributes, fill_only=False)
        diff.update(self._sync_linked(change, user_id))
        if restoring:
            diff["identity.deleted_at"] = [_json(held["deleted_at"]), None]
            diff.update(self._restore(user_id))
        self._touch_identity(key, change, digest, user_id)
        if not diff:
            self._outcome(change, "unchanged", user_id)
            return
        action = AuditAction.RESTORED if restoring else AuditAction.UPDATED
        self._audit(change, action, user_id, diff)

    def _create_or_link(self, change: UserChange, digest: str) -> None:
        attrs = change.attributes
        assert attrs is not None
        owner = self._link_target(attrs)
        if owner is not None:
            diff = self._apply_attributes(owner, attrs, fill_only=True)
            diff["identity"] = [None, f"{change.provider}:{change.external_id}"]
            diff.update(self._sync_linked(change, owner))
            self._new_identity(change, digest, owner)
            self._audit(change, AuditAction.LINKED, owner, diff)
            return
        user_id = self._new_user(attrs)
        self._new_identity(change, digest, user_id)
        diff = {f: [None, _json(v)] for f, v in self.users[user_id].items() if f in _AUDITED}
        diff.update(self._sync_linked(change, user_id))
        self._audit(change, AuditAction.CREATED, user_id, _compact(diff))

    def _link_target(self, attrs: UserAttributes) -> uuid.UUID | None:
        if not (self.settings.link_by_verified_email and attrs.email and attrs.email_verified):
            return None
        return self.email_owner.get(attrs.email.lower())

    def _new_user(self, attrs: UserAttributes) -> uuid.UUID:
        user_id = uuid.uuid4()
        row: Row = {f: getattr(attrs, f) for f in USER_FIELDS}
        row.update(
            id=user_id,
            role=attrs.role or self.settings.default_role,
            tenant_id=attrs.tenant_id,
            created_at=attrs.created_at or self.now,
            updated_at=self.now,
            deleted_at=None,
        )
        self.users[user_id] = row
        self.new_user_ids.add(user_id)
        self.profiles[user_id] = self._new_profile(user_id, attrs)
        if attrs.email and attrs.email_verified:
            self.email_owner.setdefault(attrs.email.lower(), user_id)
        return user_id

    def _new_profile(self, user_id: uuid.UUID, attrs: UserAttributes) -> Row:
        app = {**self.settings.profile_defaults, **dict(attrs.profile)}
        return {
            "id": uuid.uuid4(),
            "user_id": user_id,
            "display_name": attrs.name,
            "avatar_url": attrs.avatar_url,
            "timezone": app.get("timezone", "UTC"),
            "currency": app.get("currency", "USD"),
            "locale": app.get("locale", "en"),
            "settings": app.get("settings") or {},
            "created_at": self.now,
            "updated_at": self.now,
        }

    def _apply_attributes(
        self, user_id: uuid.UUID, attrs: UserAttributes | None, *, fill_only: bool
    ) -> dict[str, list[Any]]:
        """Bring the user's IdP-owned fields and profile in line with ``attrs``; return the diff."""
        if attrs is None:
            return {}
        user = self.users[user_id]
        wanted: Row = {f: getattr(attrs, f) for f in USER_FIELDS}
        wanted.update(
            {
                f: getattr(attrs, f)
                for f in OPTIONAL_USER_FIELDS
                if getattr(attrs, f) or f in attrs.stated
            }
        )
        if fill_only:
            wanted = {f: v for f, v in wanted.items() if user.get(f) in (None, False) and v}
        diff = self._set(user, self.user_cols[user_id], wanted, "")
        if diff:
            self._mark_user(user_id, "updated_at")
        diff.update(self._apply_profile(user_id, attrs, fill_only=fill_only))
        return diff

    def _apply_profile(
        self, user_id: uuid.UUID, attrs: UserAttributes, *, fill_only: bool
    ) -> dict[str, list[Any]]:
        profile = self.profiles.get(user_id)
        if profile is None:  # an app deleted the profile: recreate it rather than fail
            profile = self.profiles[user_id] = self._new_profile(user_id, attrs)
            self.profile_cols[user_id].add("*new*")
            return {}
        wanted: Row = {col: getattr(attrs, src) for col, src in PROFILE_IDP_FIELDS.items()}
        for name in self.settings.profile_overwrite:
            if name in attrs.profile:
                wanted[name] = attrs.profile[name]
        if fill_only:
            wanted = {f: v for f, v in wanted.items() if profile.get(f) is None and v}
        diff = self._set(profile, self.profile_cols[user_id], wanted, "profile.")
        if diff:
            profile["updated_at"] = self.now
            self.profile_cols[user_id].add("updated_at")
        return diff

    def _set(self, row: Row, cols: set[str], wanted: Row, prefix: str) -> dict[str, list[Any]]:
        diff: dict[str, list[Any]] = {}
        for name, value in wanted.items():
            if row.get(name) != value:
                diff[prefix + name] = [_json(row.get(name)), _json(value)]
                row[name] = value
                cols.add(name)
        return diff

    def _mark_user(self, user_id: uuid.UUID, *cols: str) -> None:
        self.users[user_id]["updated_at"] = self.now
        self.user_cols[user_id].update(cols)

    def _restore(self, user_id: uuid.UUID) -> dict[str, list[Any]]:
        user = self.users[user_id]
        if user["deleted_at"] is None:
            return {}
        diff = {"deleted_at": [_json(user["deleted_at"]), None]}
        user["deleted_at"] = None
        self._mark_user(user_id, "deleted_at", "updated_at")
        return diff

    # -- linked (secondary) identities ---------------------------------------------------

    def _sync_linked(self, change: UserChange, user_id: uuid.UUID) -> dict[str, list[Any]]:
        prefix = f"{change.provider}:"
        current = {
            k for k in self.by_user[user_id]
            if k[0].startswith(prefix) and self.identities[k]["deleted_at"] is None
        }  # fmt: skip
        wanted = {(i.provider, i.external_id): i for i in change.linked}
        for key, identity in wanted.items():
            if key not in current:
                self._upsert_secondary(key, identity.email, user_id)
        for key in current - wanted.keys():
            self.identities[key]["deleted_at"] = self.now
            self._changed_identity(key)
        if current == wanted.keys():
            return {}
        return {"identities": [sorted(":".join(k) for k in current), sorted(map(":".join, wanted))]}

    def _upsert_secondary(self, key: Key, email: str | None, user_id: uuid.UUID) -> None:
        row = self.identities.get(key)
        if row is None:
            self._add_identity(self._identity_row(key, user_id, email=email))
            return
        self.by_user[row["user_id"]].discard(key)
        self.by_user[user_id].add(key)
        row.update(user_id=user_id, email=email, deleted_at=None, last_synced_at=self.now)
        self._changed_identity(key)

    def _add_identity(self, row: Row) -> None:
        key = (row["provider"], row["external_id"])
        self.identities[key] = row
        self.by_user[row["user_id"]].add(key)
        self.new_identity_keys[key] = None

    # -- identities --------------------------------------------------------------------

    def _identity_row(self, key: Key, user_id: uuid.UUID, **values: Any) -> Row:
        row: Row = {
            "provider": key[0],
            "external_id": key[1],
            "user_id": user_id,
            "email": None,
            "upstream_updated_at": None,
            "content_hash": None,
            "raw": None,
            "first_seen_at": self.now,
            "last_synced_at": self.now,
            "deleted_at": None,
        }
        row.update(values)
        return row

    def _new_identity(self, change: UserChange, digest: str, user_id: uuid.UUID) -> None:
        key = (change.provider, change.external_id)
        self._add_identity(
            self._identity_row(
                key,
                user_id,
                email=change.attributes.email if change.attributes else None,
                upstream_updated_at=change.version,
                content_hash=digest,
                raw=change.raw,  # encoded by db.jsoncodec on the way out
            )
        )

    def _touch_identity(
        self, key: Key, change: UserChange, digest: str | None, user_id: uuid.UUID
    ) -> None:
        row = self.identities[key]
        row.update(user_id=user_id, last_synced_at=self.now, deleted_at=None)
        if digest is not None:
            row.update(content_hash=digest, raw=change.raw)
            if change.attributes is not None:
                row["email"] = change.attributes.email
        row["upstream_updated_at"] = _newest(row["upstream_updated_at"], change.version)
        self._changed_identity(key)

    def _changed_identity(self, key: Key) -> None:
        if key not in self.new_identity_keys and key not in self.changed_identity_keys:
            self.changed_identity_keys[key] = None

    def _stale(self, change: UserChange, held: Row) -> bool:
        if not _older(change.version, held["upstream_updated_at"]):
            return False
        self._outcome(change, AuditAction.STALE_SKIPPED, held["user_id"])
        marker = (change.provider, change.external_id, change.event_id or "")
        if change.event_id and marker not in self.snap.stale_audited:
            self.snap.stale_audited.add(marker)
            seen = _json(held["upstream_updated_at"])
            self._audit_row(change, AuditAction.STALE_SKIPPED, held["user_id"],
                            {"upstream_updated_at": [seen, _json(change.version)]})  # fmt: skip
        return True

    # -- deletes -----------------------------------------------------------------------

    def _delete(self, change: UserChange) -> None:
        key = (change.provider, change.external_id)
        held = self.identities.get(key)
        if held is None:
            self._tombstone(change)
            return
        if self._stale(change, held):
            return
        user_id = held["user_id"]
        if held["deleted_at"] is not None:
            self._advance_version(key, change.version)
            self._outcome(change, "unchanged", user_id)
            return
        self._touch_identity(key, change, None, user_id)
        held = self.identities[key]
        held["deleted_at"] = self.now
        self._sync_linked(_without_linked(change), user_id)
        diff: dict[str, list[Any]] = {"identity.deleted_at": [None, _json(self.now)]}
        if not self._live_identities(user_id) and self.users[user_id]["deleted_at"] is None:
            self.users[user_id]["deleted_at"] = self.now
            self._mark_user(user_id, "deleted_at", "updated_at")
            diff = {"deleted_at": [None, _json(self.now)]}
        self.plan.revoke_sessions_of.append((change.provider, user_id))
        self._audit(change, AuditAction.DELETED, user_id, diff)

    def _advance_version(self, key: Key, version: datetime | None) -> None:
        """A newer deletion of a deleted identity: keep its version, or an older upsert
        arriving later would still pass the version guard and restore the user."""
        row = self.identities[key]
        newest = _newest(row["upstream_updated_at"], version)
        if newest != row["upstream_updated_at"]:
            row["upstream_updated_at"] = newest
            self._changed_identity(key)

    def _tombstone(self, change: UserChange) -> None:
        """Remember a versioned deletion of an identity never seen, so that an older create
        arriving after it (webhooks are unordered) cannot bring the user to life."""
        if change.version is None:
            self._outcome(change, "unknown")
            return
        user_id = self._new_user(UserAttributes())
        self.users[user_id]["deleted_at"] = self.now
        key = (change.provider, change.external_id)
        self._add_identity(
            self._identity_row(
                key, user_id, upstream_updated_at=change.version, deleted_at=self.now
            )
        )
        self._audit(change, AuditAction.DELETED, user_id, {"deleted_at": [None, _json(self.now)]})

    def _live_identities(self, user_id: uuid.UUID) -> list[Key]:
        return [
            k for k in self.by_user[user_id]
            if self.identities[k]["deleted_at"] is None and self.identities[k]["content_hash"]
        ]  # fmt: skip

    # -- logins ------------------------------------------------------------------------

    def _login(self, change: UserChange) -> None:
        session = change.session
        assert session is not None
        held = self.identities.get((change.provider, change.external_id))
        if held is None or held["deleted_at"] is not None:
            self._fail(change, "login for an unknown or deleted identity")
            return
        user_id = held["user_id"]
        key = (change.provider, session.external_session_id)
        seen_at = session.created_at or change.version or self.now
        row = self.snap.sessions.get(key)
        wanted: Row = {
            "last_seen_at": session.last_seen_at or seen_at,
            "expires_at": session.expires_at,
            "revoked_at": session.revoked_at,
            "ip": session.ip,
            "user_agent": session.user_agent,
        }
        if row is not None and all(row.get(k) == v for k, v in wanted.items()):
            self._outcome(change, "unchanged", user_id)
            return
        new = row is None
        row = {**(row or {"id": uuid.uuid4(), "created_at": seen_at}), **wanted}
        row.update(user_id=user_id, provider=change.provider,
                   external_session_id=session.external_session_id)  # fmt: skip
        self.snap.sessions[key] = row
        self.plan.sessions.append(row)
        diff = self._set(self.users[user_id], self.user_cols[user_id],
                         {"last_login_at": _newest(self.users[user_id]["last_login_at"], seen_at)},
                         "")  # fmt: skip
        if diff:
            self._mark_user(user_id, "updated_at")
        if new:
            diff["session"] = [None, session.external_session_id]
            self._audit(change, AuditAction.LOGIN, user_id, diff)
        else:
            self._outcome(change, "session_updated", user_id)

    # -- results -----------------------------------------------------------------------

    def _fail(self, change: UserChange, reason: str) -> None:
        outcome, row = failure(change, reason)
        self.plan.outcomes.append(outcome)
        self.plan.audit.append(row)

    def _outcome(self, change: UserChange, action: str, user_id: uuid.UUID | None = None) -> None:
        self.plan.outcomes.append(
            Outcome(change.provider, change.external_id, str(action), user_id)
        )

    def _audit(
        self, change: UserChange, action: AuditAction, user_id: uuid.UUID, diff: Mapping[str, Any]
    ) -> None:
        self.plan.outcomes.append(
            Outcome(change.provider, change.external_id, str(action), user_id, None, dict(diff))
        )
        self._audit_row(change, action, user_id, dict(diff))

    def _audit_row(
        self,
        change: UserChange,
        action: AuditAction,
        user_id: uuid.UUID | None,
        diff: dict[str, Any] | None,
    ) -> None:
        self.plan.audit.append(audit_row(change, action, user_id, diff))

    def _emit(self) -> None:
        plan = self.plan
        plan.new_users = [self.users[u] for u in self.new_user_ids]
        plan.user_updates = _groups(
            self.users, {u: c for u, c in self.user_cols.items() if u not in self.new_user_ids}
        )
        new_profiles = self.new_user_ids | {u for u, c in self.profile_cols.items() if "*new*" in c}
        plan.new_profiles = [self.profiles[u] for u in new_profiles]
        plan.profile_updates = _groups(
            self.profiles, {u: c for u, c in self.profile_cols.items() if u not in new_profiles}
        )
        plan.new_identities = [self.identities[k] for k in self.new_identity_keys]
        plan.identity_updates = [self.identities[k] for k in self.changed_identity_keys]


_AUDITED = frozenset((*USER_FIELDS, *OPTIONAL_USER_FIELDS))


def plan(
    changes: Sequence[UserChange], snapshot: Snapshot, settings: PlanSettings, now: datetime
) -> Plan:
    """Decide the writes for a validated, deduplicated batch."""
    return _Planner(snapshot, settings, now).run(changes)


def audit_row(
    change: UserChange,
    action: AuditAction,
    user_id: uuid.UUID | None,
    diff: dict[str, Any] | None,
    error: str | None = None,
) -> Row:
    return {
        "provider": change.provider,
        "external_id": change.external_id,
        "user_id": user_id,
        "action": str(action),
        "changes": diff,
        "event_id": change.event_id,
        "error": error,
    }


def failure(change: UserChange, reason: str) -> tuple[Outcome, Row]:
    """The outcome and audit row of a change isolated before (or while) it reached the database."""
    outcome = Outcome(change.provider, change.external_id, str(AuditAction.FAILED), None, reason)
    return outcome, audit_row(change, AuditAction.FAILED, None, None, error=reason)


def _groups(rows: Mapping[Any, Row], cols: Mapping[Any, set[str]]) -> list[UpdateGroup]:
    grouped: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for key, changed in cols.items():
        if changed:
            grouped[tuple(sorted(changed))].append(rows[key])
    return [UpdateGroup(columns, members) for columns, members in grouped.items()]


def _without_linked(change: UserChange) -> UserChange:
    return UserChange(provider=change.provider, external_id=change.external_id, kind=change.kind)


def _newest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


def _compact(diff: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {k: v for k, v in diff.items() if v[1] not in (None, False)}


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value
