"""The bulk create path: new users of a large batch written as rows straight to COPY.

An initial load is almost all creates: a new identity, its linked accounts and sessions.
The planner handles every case through one working copy of dict rows, sets and diffs; for a
create that no other change of the batch touches, that generality costs ~3x the rows' own
encoding (measured: issue #13). ``split`` picks those creates (and their new sessions) out
of a batch; ``BulkPlan`` builds their rows as tuples in the store's column order
(``db.bulk``), with the audit rows and outcomes the planner would give them, using the
planner's own rules (``plan.new_user_row`` and friends: one definition). Every other change
(updates, links, restores, deletes, stale versions, anything odd) goes through the planner,
in the same transaction, after the creates are written.

A create is *simple* when nothing else in the batch or the database can meet it:

- no stored identity under its key (not an update, restore or tombstone);
- each of its identity keys (its own and its linked accounts') named once in the batch, and
  none of its linked accounts stored: the planner would move such an account between users;
- no verified-email link: linking off, its email unverified, or no live user owning the
  address and no other create in the batch claiming it.

A login is written here when its identity is such a create, its session is not stored, and
every login of that identity is too; otherwise all of that identity's logins go to the
planner, which then finds the user stored (so each login's diff is computed in batch order,
as the planner computes it).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from db.rows import IdentityRow, Key, SessionRow
from sync_worker.changes import Action, ChangeKind, UserChange
from sync_worker.engine.plan import (
    USER_FIELDS,
    Outcome,
    PlanSettings,
    audit_row,
    json_value,
    newest,
    session_fields,
)

#: Changes left after triage from which a batch takes the bulk path (PostgreSQL only).
#: Below it the two extra lookups and the COPYs' set-up cost more than they save.
THRESHOLD = 200

NewIds = Callable[[int], list[uuid.UUID]]


@dataclass(slots=True)
class Candidates:
    """What ``split`` needs the store to answer before it can decide."""

    emails: set[str] = field(default_factory=set)  # lower-cased verified emails of creates
    linked: set[Key] = field(default_factory=set)  # linked-account keys of creates


def candidates(
    changes: Sequence[UserChange], identities: Mapping[Key, IdentityRow], *, link: bool
) -> Candidates:
    """The emails and linked keys of the batch's creates, to look up in the store."""
    found = Candidates()
    for change in changes:
        if change.kind is not ChangeKind.UPSERT or (change.provider, change.external_id) in (
            identities
        ):
            continue
        attrs = change.attributes
        if link and attrs is not None and attrs.email and attrs.email_verified:
            found.emails.add(attrs.email.lower())
        if change.linked_stated:
            found.linked.update((i.provider, i.external_id) for i in change.linked)
    return found


def split(
    changes: Sequence[UserChange],
    identities: Mapping[Key, IdentityRow],
    sessions: Mapping[Key, SessionRow],
    *,
    link: bool,
    owned_emails: Collection[str],
    stored_linked: Collection[Key],
) -> tuple[list[UserChange], list[UserChange], list[UserChange]]:
    """(simple creates, their logins, the rest) of a triaged batch, each in batch order.

    ``owned_emails`` are the candidates' emails a live user holds verified;
    ``stored_linked`` the candidates' linked keys already stored.
    """
    named, claimed = _claims(changes, identities, link=link)
    creates: dict[Key, UserChange] = {}
    for change in changes:
        key = (change.provider, change.external_id)
        if change.kind is ChangeKind.UPSERT and key not in identities and named[key] == 1:
            linked = [(i.provider, i.external_id) for i in change.linked]
            if change.linked_stated and any(named[k] != 1 or k in stored_linked for k in linked):
                continue
            email = _link_email(change, link)
            if email is None or (email not in owned_emails and claimed[email] == 1):
                creates[key] = change

    # Logins of a create: all written here, or all left to the planner.
    planner_only: set[Key] = set()
    for change in changes:
        if change.kind is ChangeKind.LOGIN:
            key = (change.provider, change.external_id)
            # A sign-in without a session compares last_login_at: the planner's to do.
            if key in creates and (
                change.session is None
                or (change.provider, change.session.external_session_id) in sessions
            ):
                planner_only.add(key)
    logins: list[UserChange] = []
    rest: list[UserChange] = []
    for change in changes:
        key = (change.provider, change.external_id)
        if change.kind is ChangeKind.LOGIN:
            simple = key in creates and key not in planner_only
            (logins if simple else rest).append(change)
        elif creates.get(key) is not change:
            rest.append(change)
    return list(creates.values()), logins, rest


def _claims(
    changes: Sequence[UserChange], identities: Mapping[Key, IdentityRow], *, link: bool
) -> tuple[Counter[Key], Counter[str]]:
    """(how often each identity key is named by an upsert or delete, how many creates
    would link by each verified email)."""
    named: Counter[Key] = Counter()
    claimed: Counter[str] = Counter()
    for change in changes:
        if change.kind is ChangeKind.LOGIN:
            continue
        key = (change.provider, change.external_id)
        named[key] += 1
        if change.kind is ChangeKind.UPSERT:
            if change.linked_stated:
                named.update((i.provider, i.external_id) for i in change.linked)
            email = _link_email(change, link)
            if email is not None and key not in identities:
                claimed[email] += 1
    return named, claimed


def _link_email(change: UserChange, link: bool) -> str | None:
    attrs = change.attributes
    if link and attrs is not None and attrs.email and attrs.email_verified:
        return attrs.email.lower()
    return None


class BulkPlan:
    """The rows, audit rows and outcomes of ``split``'s creates and logins, as the planner
    would write them (tests/contract runs every engine rule through both paths).

    Construction assigns the ids and builds the users' rows (their last login settled from
    the batch's logins). The rest is computed as the store consumes ``profiles``,
    ``identities``, ``sessions`` and ``audit``, in that order: the store COPYs each table
    while its iterator runs, so the content hashes, rows and audit diffs are computed while
    the server inserts the rows already sent. ``outcomes`` is complete once ``audit`` is.
    """

    def __init__(
        self,
        creates: Sequence[UserChange],
        logins: Sequence[UserChange],
        settings: PlanSettings,
        now: datetime,
        new_ids: NewIds,
    ) -> None:
        self.creates = creates
        self.logins = logins
        self.settings = settings
        self.now = now
        count = len(creates)
        ids = new_ids(2 * count + len(logins))
        self._user_ids = ids[:count]
        self._profile_ids = ids[count : 2 * count]
        self._session_ids = ids[2 * count :]
        last_login: dict[Key, datetime] = {}
        for change in logins:
            seen_at = _login_time(change, now)
            if seen_at is not None:
                key = (change.provider, change.external_id)
                prior = last_login.get(key)
                last_login[key] = seen_at if prior is None else max(prior, seen_at)
        role = settings.default_role
        self.users: list[tuple[Any, ...]] = []
        for user_id, change in zip(self._user_ids, creates, strict=True):
            attrs = change.attributes
            assert attrs is not None
            logged_in = last_login.get((change.provider, change.external_id))
            self.users.append(
                (
                    user_id, attrs.email, attrs.email_verified, attrs.name, attrs.given_name,
                    attrs.family_name, attrs.phone, attrs.avatar_url, attrs.role or role,
                    attrs.tenant_id, attrs.blocked, newest(attrs.last_login_at, logged_in),
                    attrs.created_at or now, now, None,
                )
            )  # fmt: skip
        self.outcomes: list[Outcome] = []
        self._login_audit: list[tuple[Any, ...]] = []
        self._login_outcomes: list[Outcome] = []

    def profiles(self) -> Iterator[tuple[Any, ...]]:
        defaults = dict(self.settings.profile_defaults)
        now = self.now
        for profile_id, user_id, change in zip(
            self._profile_ids, self._user_ids, self.creates, strict=True
        ):
            attrs = change.attributes
            assert attrs is not None
            app = {**defaults, **attrs.profile} if attrs.profile else defaults
            yield (
                profile_id, user_id, attrs.name, attrs.avatar_url, app.get("timezone", "UTC"),
                app.get("currency", "USD"), app.get("locale", "en"),
                app.get("settings") or {}, now, now,
            )  # fmt: skip

    def identities(self) -> Iterator[tuple[Any, ...]]:
        now = self.now
        for user_id, change in zip(self._user_ids, self.creates, strict=True):
            attrs = change.attributes
            assert attrs is not None
            yield (
                change.provider, change.external_id, user_id, attrs.email, change.version,
                change.content_hash(), change.raw, now, now, None,
            )  # fmt: skip
            if change.linked_stated:
                for provider, external_id, email in _linked(change):
                    yield (provider, external_id, user_id, email, None, None, None, now, now,
                           None)  # fmt: skip

    def sessions(self) -> Iterator[tuple[Any, ...]]:
        """The logins' new sessions; their audit rows and outcomes are kept for ``audit``.

        The planner's ``_login`` for a new session of a new user: each login's diff shows
        the user's last login as the logins before it in the batch left it.
        """
        held: dict[Key, tuple[uuid.UUID, datetime | None]] = {
            (change.provider, change.external_id): (user_id, change.attributes.last_login_at)
            for user_id, change in zip(self._user_ids, self.creates, strict=True)
            if change.attributes is not None
        }
        now = self.now
        for session_id, change in zip(self._session_ids, self.logins, strict=True):
            session = change.session
            assert session is not None
            key = (change.provider, change.external_id)
            user_id, before = held[key]
            seen_at, wanted = session_fields(change, now)
            yield (
                session_id, user_id, change.provider, session.external_session_id,
                wanted["ip"], wanted["user_agent"], seen_at, wanted["last_seen_at"],
                wanted["expires_at"], wanted["revoked_at"],
            )  # fmt: skip
            after = newest(before, _login_time(change, now))
            diff: dict[str, list[Any]] = {}
            if before != after:
                diff["last_login_at"] = [json_value(before), json_value(after)]
                held[key] = (user_id, after)
            diff["session"] = [None, session.external_session_id]
            self._login_audit.append(
                _audit(self._login_outcomes, change, Action.LOGIN, user_id, diff)
            )

    def audit(self) -> Iterator[tuple[Any, ...]]:
        """The created rows, then the logins' (the planner's order); after ``sessions``."""
        for user_id, change in zip(self._user_ids, self.creates, strict=True):
            attrs = change.attributes
            assert attrs is not None
            values = (
                attrs.email,
                attrs.email_verified,
                attrs.name,
                attrs.given_name,
                attrs.family_name,
                attrs.phone,
                attrs.avatar_url,
                attrs.blocked,
                attrs.last_login_at,
                attrs.role or self.settings.default_role,
                attrs.tenant_id,
            )  # fmt: skip
            # USER_FIELDS' order (checked below); the last login before the batch's logins
            # compact({f: [None, json_value(v)]}), skipping what it drops before converting
            diff = {
                f: [None, json_value(v)]
                for f, v in zip(USER_FIELDS, values, strict=True)
                if v not in (None, False)
            }
            if change.linked_stated and change.linked:
                diff["identities"] = [[], sorted(f"{p}:{e}" for p, e, _ in _linked(change))]
            yield _audit(self.outcomes, change, Action.CREATED, user_id, diff)
        self.outcomes += self._login_outcomes
        yield from self._login_audit


def _login_time(change: UserChange, now: datetime) -> datetime | None:
    """When a login happened, for the user's last login; None for a logout that does not
    say when its session began (the planner's ``_login``)."""
    session = change.session
    assert session is not None
    if session.revoked_at is not None and session.created_at is None:
        return None
    return session_fields(change, now)[0]


def _audit(
    outcomes: list[Outcome],
    change: UserChange,
    action: Action,
    user_id: uuid.UUID,
    diff: dict[str, list[Any]],
) -> tuple[Any, ...]:
    """Its outcome (appended) and its audit row (returned), as ``plan._audit`` has them."""
    outcomes.append(Outcome.of(change, action, user_id, diff=dict(diff)))
    row = audit_row(change, action, user_id, diff)
    return (row["provider"], row["external_id"], user_id, row["action"], row["changes"],
            row["event_id"], None)  # fmt: skip


def _linked(change: UserChange) -> list[tuple[str, str, str | None]]:
    """(provider, external id, email) of the accounts a create links, each once (the
    planner keys them in a dict: the last of a repeated key wins)."""
    wanted = {(i.provider, i.external_id): i.email for i in change.linked}
    return [(p, e, email) for (p, e), email in wanted.items()]


# ``BulkPlan.audit`` lists a created user's values in this order.
assert USER_FIELDS == (
    "email", "email_verified", "name", "given_name", "family_name", "phone", "avatar_url",
    "blocked", "last_login_at", "role", "tenant_id",
), USER_FIELDS  # fmt: skip
