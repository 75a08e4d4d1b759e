"""Deciding what a batch of changes does to the database: pure, no I/O.

``plan(changes, snapshot, settings, now, new_id)`` takes the batch (already validated and
deduplicated) and the current rows it touches, and returns every row to insert or update and
every audit row to append, with one outcome per change. It reads its snapshot and never
changes it; new ids come from ``new_id``. The engine loads the snapshot and executes the
writes; this module holds the rules.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from db.rows import (
    AuditRow,
    IdentityRow,
    Key,
    ProfileRow,
    SessionRow,
    Snapshot,
    UpdateGroup,
    UserRow,
    Writes,
)
from sync_worker.changes import (
    IDP_FIELDS,
    OPTIONAL_FIELDS,
    Action,
    ChangeKind,
    UserAttributes,
    UserChange,
)

PROFILE_IDP_FIELDS = {"display_name": "name", "avatar_url": "avatar_url"}
APP_PROFILE_FIELDS = ("timezone", "currency", "locale", "settings")
_USER_FIELDS = (*IDP_FIELDS, *OPTIONAL_FIELDS)
_PROVIDER_WIDTH, _ID_WIDTH = 64, 255  # sync_audit's provider; external_id and event_id
Diff = dict[str, list[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanSettings:
    link_by_verified_email: bool = True
    profile_defaults: Mapping[str, Any] = field(
        default_factory=lambda: {"timezone": "UTC", "currency": "USD", "locale": "en"}
    )
    profile_overwrite: frozenset[str] = frozenset()
    default_role: str = "member"


@dataclass(frozen=True, slots=True)
class Outcome:
    provider: str
    external_id: str
    action: Action
    user_id: uuid.UUID | None = None
    error: str | None = None
    changes: Mapping[str, Any] | None = None
    #: For a login: its upstream session id (sessions are counted apart from users).
    session_id: str | None = None

    @classmethod
    def of(
        cls,
        change: UserChange,
        action: Action,
        user_id: uuid.UUID | None = None,
        *,
        error: str | None = None,
        diff: Mapping[str, Any] | None = None,
    ) -> Outcome:
        session = change.session.external_session_id if change.session else None
        return cls(change.provider, change.external_id, action, user_id, error, diff, session)

    @property
    def is_session(self) -> bool:
        return self.session_id is not None


@dataclass(slots=True, kw_only=True)
class Plan:
    writes: Writes = field(default_factory=Writes)
    outcomes: list[Outcome] = field(default_factory=list)


def plan(
    changes: Sequence[UserChange],
    snapshot: Snapshot,
    settings: PlanSettings,
    now: datetime,
    new_id: Callable[[], uuid.UUID] = uuid.uuid4,
) -> Plan:
    """Decide the writes for a validated, deduplicated batch."""
    return _Planner(snapshot, settings, now, new_id).run(changes)


def dedupe(changes: Iterable[UserChange]) -> list[UserChange]:
    """Keep the newest upsert/delete per identity (later wins a tie), each session once,
    and the newest sessionless login per identity."""
    latest: dict[Key, UserChange] = {}
    logins: dict[Key, UserChange] = {}
    sign_ins: dict[Key, UserChange] = {}
    for change in changes:
        if change.kind is ChangeKind.LOGIN:
            if change.session is not None:
                logins[(change.provider, change.session.external_session_id)] = change
                continue
            key = (change.provider, change.external_id)
            held = sign_ins.get(key)
            if held is None or not older(change.version, held.version):
                sign_ins[key] = change
            continue
        key = (change.provider, change.external_id)
        held = latest.get(key)
        if held is None or not older(change.version, held.version):
            latest[key] = change
    return [*latest.values(), *logins.values(), *sign_ins.values()]


def superseded(
    changes: Sequence[UserChange], kept: Sequence[UserChange]
) -> list[tuple[UserChange, UserChange]]:
    """The upserts and deletes ``dedupe`` left out, each with the newer change that won.

    The engine audits them as stale (once per event, like an event older than what is
    stored): whether an event is audited must not depend on which batch it landed in.
    """
    winners = {(c.provider, c.external_id): c for c in kept if c.kind is not ChangeKind.LOGIN}
    kept_ids = {id(c) for c in kept}
    return [
        (c, winners[(c.provider, c.external_id)])
        for c in changes
        if c.kind is not ChangeKind.LOGIN and id(c) not in kept_ids
    ]


def unchanged(change: UserChange, held: IdentityRow | None, digest: str | None = None) -> bool:
    """An upsert whose content is already stored, and not older: it writes nothing at all.

    The engine sets these aside before loading anything else (most of a full pass).
    ``digest`` is the change's content hash when the caller has it already.
    """
    return (
        change.kind is ChangeKind.UPSERT
        and held is not None
        and held["deleted_at"] is None
        and held["content_hash"] == (digest or change.content_hash())
        and not older(change.version, held["upstream_updated_at"])
    )


def triage(
    changes: Sequence[UserChange],
    identities: Mapping[Key, IdentityRow],
    sessions: Mapping[Key, SessionRow],
    now: datetime,
) -> tuple[list[Outcome], list[UserChange]]:
    """(outcomes of the changes that write nothing, the changes left to plan).

    On the cheap triage reads, before anything else is loaded: an unchanged upsert, and a
    login whose stored session already says what it says (most of a full pass: every
    user's live sessions come again each time). A login whose identity the batch deletes
    is planned: the deletion makes it fail.
    """
    _DIGESTS.clear()  # what an earlier batch left (it failed, or went another way)
    done: list[Outcome] = []
    todo: list[UserChange] = []
    logins: list[UserChange] = []
    for change in changes:
        if change.kind is ChangeKind.LOGIN:
            logins.append(change)
            continue
        held = identities.get((change.provider, change.external_id))
        digest = None
        if change.kind is ChangeKind.UPSERT and held is not None and held["deleted_at"] is None:
            digest = change.content_hash()
        if unchanged(change, held, digest):
            assert held is not None
            done.append(Outcome.of(change, Action.UNCHANGED, held["user_id"]))
        else:
            todo.append(change)
            if digest is not None:
                _remember_digest(change, digest)
    deleting = {(c.provider, c.external_id) for c in todo if c.kind is ChangeKind.DELETE}
    for change in logins:
        key = (change.provider, change.external_id)
        held = identities.get(key)
        if (
            key in deleting
            or held is None
            or held["deleted_at"] is not None
            or change.session is None
        ):
            todo.append(change)
        elif session_unchanged(change, sessions, now):
            done.append(Outcome.of(change, Action.UNCHANGED, held["user_id"]))
        else:
            todo.append(change)
    return done, todo


# Content hashes ``triage`` computed for changes it passed on, which ``plan`` needs again (a
# canonical JSON encoding and a SHA-256 each: a tenth of a drain's CPU, half of it spent twice).
# Keyed by id() with the change itself held, so an id that a later object reuses never
# matches; taken out when used, and all dropped when the next batch's triage starts, so at
# most one batch's changes are held. Another thread's triage may drop them first: the
# planner then hashes again, nothing worse.
_DIGESTS: dict[int, tuple[UserChange, str]] = {}
_DIGESTS_MAX = 10_000


def _remember_digest(change: UserChange, digest: str) -> None:
    if len(_DIGESTS) >= _DIGESTS_MAX:
        _DIGESTS.clear()
    _DIGESTS[id(change)] = (change, digest)


def _digest(change: UserChange) -> str:
    held = _DIGESTS.pop(id(change), None)
    if held is not None and held[0] is change:
        return held[1]
    return change.content_hash()


def session_unchanged(
    change: UserChange, sessions: Mapping[Key, SessionRow], now: datetime
) -> bool:
    """A login whose session is stored with every field it states."""
    assert change.session is not None
    row = sessions.get((change.provider, change.session.external_session_id))
    if row is None:
        return False
    stored = _fields(row)
    return all(stored.get(k) == v for k, v in _session_fields(change, now)[1].items())


def _session_fields(change: UserChange, now: datetime) -> tuple[datetime, dict[str, Any]]:
    """(when the login happened, the session columns it states)."""
    session = change.session
    assert session is not None
    seen_at = session.created_at or change.version or now
    return seen_at, {
        "last_seen_at": session.last_seen_at or seen_at,
        "expires_at": session.expires_at,
        "revoked_at": session.revoked_at,
        "ip": session.ip,
        "user_agent": session.user_agent,
    }


def older(candidate: datetime | None, held: datetime | None) -> bool:
    return candidate is not None and held is not None and candidate < held


def audit_row(
    change: UserChange,
    action: Action,
    user_id: uuid.UUID | None,
    diff: Mapping[str, Any] | None,
    error: str | None = None,
) -> AuditRow:
    return {
        "provider": change.provider[:_PROVIDER_WIDTH],
        # A change refused for an over-long id is still audited: cut to the column, or the
        # failure's own row would be refused and roll back the whole batch.
        "external_id": change.external_id[:_ID_WIDTH],
        "user_id": user_id,
        "action": str(action),
        "changes": diff,
        "event_id": change.event_id[:_ID_WIDTH] if change.event_id else None,
        "error": error,
    }


def failure(change: UserChange, reason: str) -> tuple[Outcome, AuditRow]:
    """The outcome and audit row of a change isolated before (or while) it reached the database."""
    outcome = Outcome.of(change, Action.FAILED, error=reason)
    return outcome, audit_row(change, Action.FAILED, None, None, error=reason)


class _Planner:
    """Walks a batch once, keeping a working copy of every row it touches."""

    def __init__(
        self,
        snapshot: Snapshot,
        settings: PlanSettings,
        now: datetime,
        new_id: Callable[[], uuid.UUID],
    ) -> None:
        self.settings = settings
        self.now = now
        self.new_id = new_id
        self.writes = Writes()
        self.outcomes: list[Outcome] = []
        self.users = {k: UserRow(**v) for k, v in snapshot.users.items()}
        self.profiles = {k: ProfileRow(**v) for k, v in snapshot.profiles.items()}
        self.identities = {k: IdentityRow(**v) for k, v in snapshot.identities.items()}
        self.sessions = dict(snapshot.sessions)
        self.stale_audited = set(snapshot.stale_audited)
        self.by_user: dict[uuid.UUID, set[Key]] = defaultdict(set)
        for key, row in self.identities.items():
            self.by_user[row["user_id"]].add(key)
        self.email_owner = dict(snapshot.verified_email_owner)
        self.new_user_ids: set[uuid.UUID] = set()
        self.user_cols: dict[uuid.UUID, set[str]] = defaultdict(set)
        self.profile_cols: dict[uuid.UUID, set[str]] = defaultdict(set)
        self.new_profile_ids: set[uuid.UUID] = set()
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
        return Plan(writes=self.writes, outcomes=self.outcomes)

    # -- upserts -----------------------------------------------------------------------

    def _upsert(self, change: UserChange) -> None:
        key = (change.provider, change.external_id)
        held = self.identities.get(key)
        digest = _digest(change)
        if held is None:
            self._create_or_link(change, digest)
            return
        if self._stale(change, held):
            return
        if unchanged(change, held, digest):
            self._outcome(change, Action.UNCHANGED, held["user_id"])
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
            self._outcome(change, Action.UNCHANGED, user_id)
            return
        self._audit(change, Action.RESTORED if restoring else Action.UPDATED, user_id, diff)

    def _create_or_link(self, change: UserChange, digest: str) -> None:
        attrs = change.attributes
        assert attrs is not None
        owner = self._link_target(attrs)
        if owner is not None:
            diff = self._apply_attributes(owner, attrs, fill_only=True)
            diff["identity"] = [None, f"{change.provider}:{change.external_id}"]
            diff.update(self._sync_linked(change, owner))
            self._new_identity(change, digest, owner)
            self._audit(change, Action.LINKED, owner, diff)
            return
        user_id = self._new_user(attrs)
        self._new_identity(change, digest, user_id)
        user = _fields(self.users[user_id])
        diff = {f: [None, _json(user[f])] for f in _USER_FIELDS}
        diff.update(self._sync_linked(change, user_id))
        self._audit(change, Action.CREATED, user_id, _compact(diff))

    def _link_target(self, attrs: UserAttributes) -> uuid.UUID | None:
        if not (self.settings.link_by_verified_email and attrs.email and attrs.email_verified):
            return None
        return self.email_owner.get(attrs.email.lower())

    def _new_user(self, attrs: UserAttributes) -> uuid.UUID:
        user_id = self.new_id()
        self.users[user_id] = {
            "id": user_id,
            "email": attrs.email,
            "email_verified": attrs.email_verified,
            "name": attrs.name,
            "given_name": attrs.given_name,
            "family_name": attrs.family_name,
            "phone": attrs.phone,
            "avatar_url": attrs.avatar_url,
            "role": attrs.role or self.settings.default_role,
            "tenant_id": attrs.tenant_id,
            "blocked": attrs.blocked,
            "last_login_at": attrs.last_login_at,
            "created_at": attrs.created_at or self.now,
            "updated_at": self.now,
            "deleted_at": None,
        }
        self.new_user_ids.add(user_id)
        self.profiles[user_id] = self._new_profile(user_id, attrs)
        if attrs.email and attrs.email_verified:
            self.email_owner.setdefault(attrs.email.lower(), user_id)
        return user_id

    def _new_profile(self, user_id: uuid.UUID, attrs: UserAttributes) -> ProfileRow:
        app = {**self.settings.profile_defaults, **dict(attrs.profile)}
        self.new_profile_ids.add(user_id)
        return {
            "id": self.new_id(),
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
    ) -> Diff:
        """Bring the user's IdP-owned fields and profile in line with ``attrs``; return the diff.

        Only the fields the record states are written: the rest keep their stored values.
        """
        if attrs is None:
            return {}
        user = _fields(self.users[user_id])
        wanted = {f: getattr(attrs, f) for f in _USER_FIELDS if attrs.states(f)}
        if fill_only:
            wanted = {f: v for f, v in wanted.items() if user.get(f) in (None, False) and v}
        diff = _set(user, self.user_cols[user_id], wanted, "")
        if diff:
            self._mark_user(user_id, "updated_at")
        diff.update(self._apply_profile(user_id, attrs, fill_only=fill_only))
        return diff

    def _apply_profile(self, user_id: uuid.UUID, attrs: UserAttributes, *, fill_only: bool) -> Diff:
        if user_id not in self.profiles:  # an app deleted the profile: recreate it, not fail
            self.profiles[user_id] = self._new_profile(user_id, attrs)
            return {}
        profile = _fields(self.profiles[user_id])
        wanted = {col: getattr(attrs, src) for col, src in PROFILE_IDP_FIELDS.items()}
        wanted = {col: v for col, v in wanted.items() if attrs.states(PROFILE_IDP_FIELDS[col])}
        for name in self.settings.profile_overwrite:
            if name in attrs.profile:
                wanted[name] = attrs.profile[name]
        if fill_only:
            wanted = {f: v for f, v in wanted.items() if profile.get(f) is None and v}
        diff = _set(profile, self.profile_cols[user_id], wanted, "profile.")
        if diff:
            profile["updated_at"] = self.now
            self.profile_cols[user_id].add("updated_at")
        return diff

    def _mark_user(self, user_id: uuid.UUID, *cols: str) -> None:
        self.users[user_id]["updated_at"] = self.now
        self.user_cols[user_id].update(cols)

    def _restore(self, user_id: uuid.UUID) -> Diff:
        user = self.users[user_id]
        if user["deleted_at"] is None:
            return {}
        diff = {"deleted_at": [_json(user["deleted_at"]), None]}
        user["deleted_at"] = None
        self._mark_user(user_id, "deleted_at", "updated_at")
        return diff

    # -- linked (secondary) identities ---------------------------------------------------

    def _sync_linked(self, change: UserChange, user_id: uuid.UUID) -> Diff:
        if not change.linked_stated:  # the source did not say: keep what is stored
            return {}
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
        row.update(
            {"user_id": user_id, "email": email, "deleted_at": None, "last_synced_at": self.now}
        )
        self._changed_identity(key)

    def _add_identity(self, row: IdentityRow) -> None:
        key = (row["provider"], row["external_id"])
        self.identities[key] = row
        self.by_user[row["user_id"]].add(key)
        self.new_identity_keys[key] = None

    # -- identities --------------------------------------------------------------------

    def _identity_row(
        self,
        key: Key,
        user_id: uuid.UUID,
        *,
        email: str | None = None,
        version: datetime | None = None,
        digest: str | None = None,
        raw: Mapping[str, Any] | None = None,
        deleted_at: datetime | None = None,
    ) -> IdentityRow:
        return {
            "provider": key[0],
            "external_id": key[1],
            "user_id": user_id,
            "email": email,
            "upstream_updated_at": version,
            "content_hash": digest,
            "raw": raw,  # encoded by db.jsoncodec on the way out
            "first_seen_at": self.now,
            "last_synced_at": self.now,
            "deleted_at": deleted_at,
        }

    def _new_identity(self, change: UserChange, digest: str, user_id: uuid.UUID) -> None:
        key = (change.provider, change.external_id)
        email = change.attributes.email if change.attributes else None
        self._add_identity(
            self._identity_row(
                key, user_id, email=email, version=change.version, digest=digest, raw=change.raw
            )
        )

    def _touch_identity(
        self, key: Key, change: UserChange, digest: str | None, user_id: uuid.UUID
    ) -> None:
        row = self.identities[key]
        row.update({"user_id": user_id, "last_synced_at": self.now, "deleted_at": None})
        if digest is not None:
            row.update({"content_hash": digest, "raw": change.raw})
            if change.attributes is not None:
                row["email"] = change.attributes.email
        row["upstream_updated_at"] = _newest(row["upstream_updated_at"], change.version)
        self._changed_identity(key)

    def _changed_identity(self, key: Key) -> None:
        if key not in self.new_identity_keys and key not in self.changed_identity_keys:
            self.changed_identity_keys[key] = None

    def _stale(self, change: UserChange, held: IdentityRow) -> bool:
        if not older(change.version, held["upstream_updated_at"]):
            return False
        self._outcome(change, Action.STALE_SKIPPED, held["user_id"])
        marker = (change.provider, change.external_id, change.event_id or "")
        if change.event_id and marker not in self.stale_audited:
            self.stale_audited.add(marker)
            seen = _json(held["upstream_updated_at"])
            self.writes.audit.append(
                audit_row(change, Action.STALE_SKIPPED, held["user_id"],
                          {"upstream_updated_at": [seen, _json(change.version)]})
            )  # fmt: skip
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
            self._outcome(change, Action.UNCHANGED, user_id)
            return
        self._touch_identity(key, change, None, user_id)
        self.identities[key]["deleted_at"] = self.now
        self._sync_linked(_without_linked(change), user_id)
        diff: Diff = {"identity.deleted_at": [None, _json(self.now)]}
        if not self._live_identities(user_id) and self.users[user_id]["deleted_at"] is None:
            self.users[user_id]["deleted_at"] = self.now
            self._mark_user(user_id, "deleted_at", "updated_at")
            diff = {"deleted_at": [None, _json(self.now)]}
        self.writes.revoke_sessions_of.append((change.provider, user_id))
        self._audit(change, Action.DELETED, user_id, diff)

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
            self._outcome(change, Action.UNKNOWN)
            return
        user_id = self._new_user(UserAttributes())
        self.users[user_id]["deleted_at"] = self.now
        key = (change.provider, change.external_id)
        self._add_identity(
            self._identity_row(key, user_id, version=change.version, deleted_at=self.now)
        )
        self._audit(change, Action.DELETED, user_id, {"deleted_at": [None, _json(self.now)]})

    def _live_identities(self, user_id: uuid.UUID) -> list[Key]:
        return [
            k for k in self.by_user[user_id]
            if self.identities[k]["deleted_at"] is None and self.identities[k]["content_hash"]
        ]  # fmt: skip

    # -- logins ------------------------------------------------------------------------

    def _login(self, change: UserChange) -> None:
        session = change.session
        held = self.identities.get((change.provider, change.external_id))
        if held is None or held["deleted_at"] is not None:
            self._fail(change, "login for an unknown or deleted identity")
            return
        user_id = held["user_id"]
        if session is None:
            self._sign_in(change, user_id)
            return
        key = (change.provider, session.external_session_id)
        if session_unchanged(change, self.sessions, self.now):
            self._outcome(change, Action.UNCHANGED, user_id)
            return
        seen_at, wanted = _session_fields(change, self.now)
        row = self.sessions.get(key)
        new = row is None
        row = self._session_row(row, change, user_id, seen_at)
        _fields(row).update(wanted)
        self.sessions[key] = row
        # New sessions are inserted (COPY on PostgreSQL: 3x cheaper than the upsert).
        (self.writes.new_sessions if new else self.writes.sessions).append(row)
        # A logout that does not say when its session began is no login: it leaves the
        # login time alone (Auth0 slo, an Auth.js sign-out without iat).
        logout_only = session.revoked_at is not None and session.created_at is None
        latest = _newest(self.users[user_id]["last_login_at"], None if logout_only else seen_at)
        diff = _set(
            _fields(self.users[user_id]), self.user_cols[user_id], {"last_login_at": latest}, ""
        )
        if diff:
            self._mark_user(user_id, "updated_at")
        if new:
            diff["session"] = [None, session.external_session_id]
            self._audit(change, Action.LOGIN, user_id, diff)
        else:
            self._outcome(change, Action.SESSION_UPDATED, user_id)

    def _sign_in(self, change: UserChange, user_id: uuid.UUID) -> None:
        """A login that names no session: the user's last_login_at moves to it, no later."""
        at = change.version or self.now
        latest = _newest(self.users[user_id]["last_login_at"], at)
        diff = _set(
            _fields(self.users[user_id]), self.user_cols[user_id], {"last_login_at": latest}, ""
        )
        if not diff:
            self._outcome(change, Action.UNCHANGED, user_id)
            return
        self._mark_user(user_id, "updated_at")
        self._audit(change, Action.LOGIN, user_id, diff)

    def _session_row(
        self, held: SessionRow | None, change: UserChange, user_id: uuid.UUID, seen_at: datetime
    ) -> SessionRow:
        assert change.session is not None
        return {
            "id": held["id"] if held else self.new_id(),
            "user_id": user_id,
            "provider": change.provider,
            "external_session_id": change.session.external_session_id,
            "ip": None,
            "user_agent": None,
            "created_at": held["created_at"] if held else seen_at,
            "last_seen_at": None,
            "expires_at": None,
            "revoked_at": None,
        }

    # -- results -----------------------------------------------------------------------

    def _fail(self, change: UserChange, reason: str) -> None:
        outcome, row = failure(change, reason)
        self.outcomes.append(outcome)
        self.writes.audit.append(row)

    def _outcome(
        self, change: UserChange, action: Action, user_id: uuid.UUID | None = None
    ) -> None:
        self.outcomes.append(Outcome.of(change, action, user_id))

    def _audit(self, change: UserChange, action: Action, user_id: uuid.UUID, diff: Diff) -> None:
        self.outcomes.append(Outcome.of(change, action, user_id, diff=dict(diff)))
        self.writes.audit.append(audit_row(change, action, user_id, dict(diff)))

    def _emit(self) -> None:
        writes = self.writes
        writes.new_users = [self.users[u] for u in self.new_user_ids]
        writes.user_updates = _groups(
            self.users, {u: c for u, c in self.user_cols.items() if u not in self.new_user_ids}
        )
        writes.new_profiles = [self.profiles[u] for u in self.new_profile_ids]
        writes.profile_updates = _groups(
            self.profiles,
            {u: c for u, c in self.profile_cols.items() if u not in self.new_profile_ids},
        )
        writes.new_identities = [self.identities[k] for k in self.new_identity_keys]
        writes.identity_updates = [self.identities[k] for k in self.changed_identity_keys]


def _fields(row: Any) -> dict[str, Any]:
    """A row by column name, for the rules that walk columns by name (rows are dicts)."""
    return cast(dict[str, Any], row)


def _set(row: dict[str, Any], cols: set[str], wanted: Mapping[str, Any], prefix: str) -> Diff:
    diff: Diff = {}
    for name, value in wanted.items():
        if row.get(name) != value:
            diff[prefix + name] = [_json(row.get(name)), _json(value)]
            row[name] = value
            cols.add(name)
    return diff


def _groups(rows: Mapping[uuid.UUID, Any], cols: Mapping[uuid.UUID, set[str]]) -> list[Any]:
    grouped: dict[tuple[str, ...], list[Any]] = defaultdict(list)
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


def _compact(diff: Diff) -> Diff:
    return {k: v for k, v in diff.items() if v[1] not in (None, False)}


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


# The planner's rules that the bulk create path (engine/bulk.py) shares: one definition.
USER_FIELDS = _USER_FIELDS
compact = _compact
json_value = _json
newest = _newest
session_fields = _session_fields
