"""Loading the current rows a batch touches: a handful of set queries, never one per change.

Part of the store: the engine asks for a ``Snapshot`` and plans on it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, any_, bindparam, func, select, text
from sqlalchemy.dialects import postgresql

from db.errors import translated
from db.lookup import among
from db.rows import IdentityRow, Key, ProfileRow, SessionRow, Snapshot, UserRow
from db.tables import profiles, sync_audit, user_identities, user_sessions, users
from sync_worker.changes import Action, ChangeKind, UserChange

IN_CHUNK = 5000
_TRIAGE_COLUMNS = [c for c in user_identities.columns if c.name != "raw"]
WRITER_LOCK = 0x5F1C_0001  # arbitrary, fixed: the engine's writer lock
# The lock, and generic plans for the rest of the transaction (see ``among``).
_LOCK = text(
    "SELECT pg_advisory_xact_lock(:key), set_config('plan_cache_mode', 'force_generic_plan', true)"
)


@translated
def lock_writers(conn: Connection) -> None:
    """Serialize engine writers on PostgreSQL with one transaction-scoped advisory lock.

    Two applies of the same new identity (a webhook and a backfill, say) would otherwise both
    create a user. One lock per batch rather than per identity: a 5,000-change batch would
    exhaust the lock table (max_locks_per_transaction), and batches are short. SQLite needs
    nothing: its write transactions are already serialized. The same statement switches the
    transaction to generic plans, which the set lookups rely on (see ``among``).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK, {"key": WRITER_LOCK})


@contextmanager
def planned_per_run(conn: Connection) -> Iterator[None]:
    """Plan every statement run inside afresh: no server-side prepared plan (PostgreSQL).

    psycopg prepares a statement on its fifth run and PostgreSQL keeps that plan for the
    connection's life; nothing replans it as the tables grow unless their statistics are
    refreshed, and autovacuum may be off. A plan cached while ``user_sessions`` was empty
    read the whole table for every batch: 87 % of a 100,000-user load (issue #13). An
    unnamed statement's generic plan is made against the tables' current size (PostgreSQL
    scales its row estimates by the current number of pages), so it follows their growth,
    for about 0.1 ms of planning per lookup (``among`` keeps that planning cheap).
    tests/test_engine_scale.py checks every statement at two table sizes.
    """
    driver = conn.connection.driver_connection if conn.dialect.name == "postgresql" else None
    if driver is None:
        yield
        return
    previous = driver.prepare_threshold
    driver.prepare_threshold = None
    try:
        yield
    finally:
        driver.prepare_threshold = previous


@translated
def refresh_statistics(conn: Connection) -> None:
    """ANALYZE the looked-up tables that have more than doubled since their last ANALYZE.

    The set lookups run as generic plans, and psycopg prepares a statement after a few
    executions: a plan made while a table was nearly empty (during the first batches of a
    bulk load, say) is kept until something invalidates it, and it can read the whole
    table (measured: load_identities went from 0.1 s to 4 s over a 20,000-user load).
    ANALYZE invalidates such plans and gives the planner real numbers; autovacuum does it
    too, but lags a bulk load by a minute or more, and may be off. Re-analyzing only on
    doubling keeps the total cost logarithmic in the tables' size.
    """
    if conn.dialect.name != "postgresql":
        return
    stale = conn.execute(_STALE, {"names": list(_LOOKED_UP), "floor": _ANALYZE_FLOOR}).scalars()
    names = [name for name in stale if name in _LOOKED_UP]  # only our own names reach SQL
    if names:
        conn.execute(text(f"ANALYZE {', '.join(names)}"))


_LOOKED_UP = ("users", "profiles", "user_identities", "user_sessions")
_ANALYZE_FLOOR = 1000  # modified rows; below this a scan costs little
# Each name as ANALYZE resolves it (the search_path), not by current_schema(): a set
# pass puts its staging schema first, and the check then found none of the tables, so the
# reconcile after a 100,000-user initial load planned on empty-table statistics (a nested
# loop that ran for minutes where autovacuum is off).
_STALE = text(
    "SELECT s.relname FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid"
    " WHERE s.relid IN (SELECT to_regclass(n) FROM unnest(CAST(:names AS text[])) AS n)"
    " AND s.n_mod_since_analyze >= :floor AND s.n_mod_since_analyze > c.reltuples"
)


@translated
def load_identities(conn: Connection, changes: Iterable[UserChange]) -> dict[Key, IdentityRow]:
    """The batch's identities, without ``raw``: enough to triage, cheap to fetch.

    Most changes of a full pass are unchanged, and decoding each stored ~1 KB record only to
    drop it cost more than the query. ``load_snapshot`` reads the full rows it plans with.
    """
    by_provider: dict[str, set[str]] = defaultdict(set)
    for change in changes:
        by_provider[change.provider].add(change.external_id)
    if sum(len(ids) for ids in by_provider.values()) <= PREFETCH_MAX:
        return _prefetch(conn, by_provider)
    found: dict[Key, IdentityRow] = {}
    for provider, ids in by_provider.items():
        for chunk in _chunks(sorted(ids)):
            stmt = _statements(conn.dialect.name).triage
            found.update(_keyed(_dicts(conn, stmt, {"provider": provider, "ids": chunk})))
    return found


@translated
def load_snapshot(
    conn: Connection,
    changes: Sequence[UserChange],
    identities: Mapping[Key, IdentityRow],
    *,
    link_by_email: bool,
    stale: Sequence[UserChange] = (),
    sessions: Mapping[Key, SessionRow] | None = None,
) -> Snapshot:
    """The rows ``changes`` touch; ``stale`` are the changes older than their stored identity,
    whose earlier stale-skip audit rows are looked up (a redelivery is audited once).
    ``sessions`` are those ``load_sessions`` already read for these changes."""
    held = dict(identities)
    user_ids = {row["user_id"] for row in identities.values()}
    owners = _email_owners(conn, changes, identities) if link_by_email else {}
    user_ids |= set(owners.values())
    joined = _Joined()
    if isinstance(identities, _Prefetched):  # read with the identities already
        read = identities.joined
        joined = _Joined(dict(read.users), dict(read.profiles), dict(read.identities))
        user_ids -= set(joined.users)
    for chunk in _chunks(sorted(user_ids)):
        # One statement for the three tables (one round trip, not three).
        result = conn.execute(_statements(conn.dialect.name).users, {"ids": chunk})
        joined.take(result.all())
    held.update(joined.identities)  # full rows (with raw) replace the triage rows
    return Snapshot(
        identities=held,
        users=joined.users,
        profiles=joined.profiles,
        verified_email_owner=owners,
        sessions=load_sessions(conn, changes) if sessions is None else sessions,
        stale_audited=_stale_audited(conn, stale),
    )


#: A batch of at most this many identities reads its users' rows with its identities, in one
#: statement instead of two (a webhook's batch of one: one round trip and one lookup fewer).
#: Larger batches read identities alone first: most of a full pass is unchanged, and set
#: aside on them without reading anything more.
PREFETCH_MAX = 50


@dataclass(slots=True)
class _Joined:
    """Rows of the joined users-profiles-identities statements: a user's row and profile
    repeat on each of its identities (a user may have no profile yet)."""

    users: dict[uuid.UUID, UserRow] = field(default_factory=dict)
    profiles: dict[uuid.UUID, ProfileRow] = field(default_factory=dict)
    identities: dict[Key, IdentityRow] = field(default_factory=dict)

    def take(self, rows: Iterable[Sequence[Any]]) -> None:
        for row in rows:
            user: Any = dict(zip(_USER_KEYS, row[_USER_SLICE], strict=True))
            self.users[user["id"]] = user
            profile = row[_PROFILE_SLICE]
            if profile[0] is not None:  # the profile's id
                self.profiles[user["id"]] = dict(zip(_PROFILE_KEYS, profile, strict=True))  # type: ignore[assignment]
            identity: Any = row[_IDENTITY_SLICE]
            if identity[0] is not None:  # provider
                key = (identity[0], identity[1])
                self.identities[key] = dict(zip(_IDENTITY_KEYS, identity, strict=True))  # type: ignore[assignment]


class _Prefetched(dict[Key, IdentityRow]):
    """``load_identities``' answer for a small batch: the batch's identities, and in
    ``joined`` the rows of their users that ``load_snapshot`` reads next."""

    def __init__(self, joined: _Joined, wanted: Mapping[str, set[str]]) -> None:
        super().__init__(
            (key, row) for key, row in joined.identities.items() if key[1] in wanted.get(key[0], ())
        )
        self.joined = joined


def _prefetch(conn: Connection, by_provider: Mapping[str, set[str]]) -> _Prefetched:
    joined = _Joined()
    stmt = _statements(conn.dialect.name).prefetch
    for provider, ids in by_provider.items():
        joined.take(conn.execute(stmt, {"provider": provider, "ids": sorted(ids)}).all())
    return _Prefetched(joined, by_provider)


def _among(dialect: str, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """``among`` with a named parameter, for statements built once per dialect."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


@dataclass(frozen=True, slots=True)
class _Statements:
    triage: Select[Any]
    users: Select[Any]
    prefetch: Select[Any]
    sessions: Select[Any]
    owners: Select[Any]


@cache
def _statements(dialect: str) -> _Statements:
    """The lookups of every batch, built once: building and keying a statement for each
    call cost more client time than the database took to answer it (measured: ~0.2 ms of
    CPU per lookup of a one-change batch)."""
    return _Statements(
        triage=select(*_TRIAGE_COLUMNS).where(
            user_identities.c.provider == bindparam("provider"),
            _among(dialect, user_identities.c.external_id, "ids"),
        ),
        users=_USERS_JOINED.where(_among(dialect, users.c.id, "ids")),
        prefetch=_JOINED_COLUMNS.select_from(
            _WANTED.join(users, users.c.id == _WANTED.c.user_id)
            .outerjoin(profiles, profiles.c.user_id == users.c.id)
            .outerjoin(user_identities, user_identities.c.user_id == users.c.id)
        ).where(
            _WANTED.c.provider == bindparam("provider"),
            _among(dialect, _WANTED.c.external_id, "ids"),
        ),
        sessions=select(user_sessions).where(
            user_sessions.c.provider == bindparam("provider"),
            _among(dialect, user_sessions.c.external_session_id, "ids"),
        ),
        owners=select(_LOWERED.label("email"), users.c.id)
        .where(
            _among(dialect, _LOWERED, "ids"),
            users.c.email_verified.is_(True),
            users.c.deleted_at.is_(None),
        )
        .order_by(users.c.created_at, users.c.id),
    )


_USER_KEYS = tuple(users.c.keys())
_PROFILE_KEYS = tuple(profiles.c.keys())
_IDENTITY_KEYS = tuple(user_identities.c.keys())
_USER_SLICE = slice(0, len(_USER_KEYS))
_PROFILE_SLICE = slice(_USER_SLICE.stop, _USER_SLICE.stop + len(_PROFILE_KEYS))
_IDENTITY_SLICE = slice(_PROFILE_SLICE.stop, _PROFILE_SLICE.stop + len(_IDENTITY_KEYS))
_LOWERED = func.lower(users.c.email, type_=users.c.email.type)  # ix_users_lower_email
_WANTED = user_identities.alias("wanted")  # the batch's identities, whose users are read
_JOINED_COLUMNS = select(
    *(c.label(f"u_{c.key}") for c in users.c),
    *(c.label(f"p_{c.key}") for c in profiles.c),
    *(c.label(f"i_{c.key}") for c in user_identities.c),
)
_USERS_JOINED = _JOINED_COLUMNS.select_from(
    users.outerjoin(profiles, profiles.c.user_id == users.c.id).outerjoin(
        user_identities, user_identities.c.user_id == users.c.id
    )
)


def _email_owners(
    conn: Connection, changes: Sequence[UserChange], identities: Mapping[Key, IdentityRow]
) -> dict[str, uuid.UUID]:
    emails = {
        c.attributes.email.lower()
        for c in changes
        if c.kind is ChangeKind.UPSERT
        and c.attributes is not None
        and c.attributes.email
        and c.attributes.email_verified
        and (c.provider, c.external_id) not in identities
    }
    owners: dict[str, uuid.UUID] = {}
    for chunk in _chunks(sorted(emails)):
        stmt = _statements(conn.dialect.name).owners
        for row in conn.execute(stmt, {"ids": chunk}).all():
            owners.setdefault(row.email, row.id)
    return owners


@translated
def load_sessions(conn: Connection, changes: Iterable[UserChange]) -> dict[Key, SessionRow]:
    """The stored sessions of the batch's logins, by (provider, upstream session id)."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for change in changes:
        if change.kind is ChangeKind.LOGIN and change.session is not None:
            wanted[change.provider].add(change.session.external_session_id)
    found: dict[Key, SessionRow] = {}
    for provider, ids in wanted.items():
        for chunk in _chunks(sorted(ids)):
            stmt = _statements(conn.dialect.name).sessions
            found.update(
                ((provider, r["external_session_id"]), r)  # type: ignore[misc]
                for r in _dicts(conn, stmt, {"provider": provider, "ids": chunk})
            )
    return found


def _stale_audited(
    conn: Connection, stale: Sequence[UserChange]
) -> frozenset[tuple[str, str, str]]:
    """Earlier stale-skip audit rows of these deliveries, found through the audit's
    (provider, external_id) index: sync_audit only grows, and ``event_id`` has none."""
    by_provider: dict[str, set[str]] = defaultdict(set)
    for change in stale:
        if change.event_id:
            by_provider[change.provider].add(change.external_id)
    event_ids = {c.event_id for c in stale if c.event_id}
    found: set[tuple[str, str, str]] = set()
    for provider, ids in by_provider.items():
        for chunk in _chunks(sorted(ids)):
            stmt = select(sync_audit.c.external_id, sync_audit.c.event_id).where(
                sync_audit.c.provider == provider,
                among(conn, sync_audit.c.external_id, chunk),
                sync_audit.c.action == str(Action.STALE_SKIPPED),
            )
            found.update(
                (provider, r.external_id, r.event_id)
                for r in conn.execute(stmt)
                if r.event_id in event_ids
            )
    return frozenset(found)


def _keyed(rows: Iterable[dict[str, Any]]) -> dict[Key, IdentityRow]:
    return {(r["provider"], r["external_id"]): r for r in rows}  # type: ignore[misc]


def _dicts(
    conn: Connection, stmt: Any, params: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Rows as plain dicts. ``dict(row_mapping)`` per row cost twice this zip (measured:
    1.7 s of 20,000 identities and sessions decoded in a re-pass, under cProfile)."""
    result = conn.execute(stmt, params)
    keys = list(result.keys())
    return (dict(zip(keys, row, strict=True)) for row in result.all())


def _chunks(values: Sequence[object]) -> Iterable[list[object]]:
    for start in range(0, len(values), IN_CHUNK):
        yield list(values[start : start + IN_CHUNK])
