"""Reads for a data-access request: finding one person, then everything stored about them.

A person is one ``users`` row. Everything about them hangs off its id (profile, identities,
sessions, audit rows), plus the audit rows of their identities that name no user (a record
that failed before it reached one), plus the webhook deliveries still in the inbox whose
payload mentions one of their identities (``inbox_mentioning``: the caller decodes them to
keep those that are about the person). Nothing is matched loosely: emails compare equal
ignoring case, ids and identity keys compare equal, so a namesake or a look-alike email
never comes along. A handful of statements per person, whatever their history.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    Table,
    Text,
    and_,
    func,
    or_,
    select,
    union,
)

from db.errors import translated, translating
from db.tables import profiles, sync_audit, sync_inbox, user_identities, user_sessions, users

Record = dict[str, Any]


@contextmanager
def snapshot(db: Engine) -> Iterator[Connection]:
    """A read-only transaction; on PostgreSQL one snapshot, so the sections agree."""
    with translating(), db.connect() as opened:
        conn = opened
        if opened.dialect.name == "postgresql":
            conn = opened.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        with conn.begin():
            yield conn


@translated
def users_by_email(conn: Connection, email: str) -> list[uuid.UUID]:
    """Users whose email, or one of whose identities' email, is ``email`` ignoring case.

    The users' side uses ``ix_users_lower_email``; identities have no email index, which a
    rare operator command can afford.
    """
    wanted = func.lower(email)  # the database's lower(), as the index was built with
    own = select(users.c.id.label("user_id")).where(func.lower(users.c.email) == wanted)
    held = select(user_identities.c.user_id).where(func.lower(user_identities.c.email) == wanted)
    return _ids(conn, union(own, held).subquery())


@translated
def users_by_id(conn: Connection, user_id: uuid.UUID) -> list[uuid.UUID]:
    return list(conn.execute(select(users.c.id).where(users.c.id == user_id)).scalars())


@translated
def users_by_identity(conn: Connection, keys: Sequence[tuple[str, str]]) -> list[uuid.UUID]:
    """Users holding any of these (provider, external id) identities."""
    if not keys:
        return []
    matches = or_(*(_key(user_identities, provider, external) for provider, external in keys))
    query = select(user_identities.c.user_id).where(matches).distinct()
    return sorted(conn.execute(query).scalars(), key=str)


@translated
def person(conn: Connection, user_id: uuid.UUID) -> dict[str, Any]:
    """Every row stored about the user ``user_id``, by section (rows as plain dicts)."""
    identities = _rows(
        conn,
        select(user_identities)
        .where(user_identities.c.user_id == user_id)
        .order_by(user_identities.c.provider, user_identities.c.external_id),
    )
    return {
        "user": _one(conn, select(users).where(users.c.id == user_id)),
        "profile": _one(conn, select(profiles).where(profiles.c.user_id == user_id)),
        "identities": identities,
        "sessions": _rows(
            conn,
            select(user_sessions)
            .where(user_sessions.c.user_id == user_id)
            .order_by(user_sessions.c.created_at, user_sessions.c.id),
        ),
        "audit": _rows(conn, _audit_query(user_id, identities)),
    }


@translated
def inbox_mentioning(conn: Connection, keys: Sequence[tuple[str, str]]) -> list[Record]:
    """Inbox rows of each key's provider whose stored payload holds its external id, as the
    JSON text spells it (a prefilter: ``12`` is in ``123`` too; the caller decodes).

    No index covers payloads: the scan reads the inbox, which retention keeps to a few days
    of deliveries (and the failed and dead rows), for a rare operator command.
    """
    if not keys:
        return []
    if conn.dialect.name == "postgresql":  # jsonb prints as JSON text

        def holds(needle: str) -> ColumnElement[bool]:
            return func.strpos(sync_inbox.c.payload.cast(Text), needle) > 0
    else:  # SQLite keeps the JSON text itself

        def holds(needle: str) -> ColumnElement[bool]:
            return func.instr(sync_inbox.c.payload, needle) > 0

    mentions = [
        and_(sync_inbox.c.provider == provider, holds(_spelled(external)))
        for provider, external in keys
    ]
    return _rows(conn, select(sync_inbox).where(or_(*mentions)).order_by(sync_inbox.c.id))


def _spelled(external_id: str) -> str:
    """The id as it appears inside a JSON string (escapes as both databases print them)."""
    return json.dumps(external_id, ensure_ascii=False)[1:-1]


def _audit_query(user_id: uuid.UUID, identities: Sequence[Record]) -> Select[Any]:
    """The user's audit rows, and those of their identities that name no user.

    A row naming another user is that user's, even for one of these identities (an
    identity moved between users keeps its history with each).
    """
    mine: ColumnElement[bool] = sync_audit.c.user_id == user_id
    keys = [_key(sync_audit, i["provider"], i["external_id"]) for i in identities]
    if keys:
        mine = or_(mine, and_(sync_audit.c.user_id.is_(None), or_(*keys)))
    return select(sync_audit).where(mine).order_by(sync_audit.c.id)


def _key(table: Table, provider: str, external_id: str) -> ColumnElement[bool]:
    return and_(table.c.provider == provider, table.c.external_id == external_id)


def _ids(conn: Connection, found: Any) -> list[uuid.UUID]:
    return sorted(conn.execute(select(found.c.user_id).distinct()).scalars(), key=str)


def _one(conn: Connection, query: Select[Any]) -> Record | None:
    row = conn.execute(query).first()
    return None if row is None else dict(row._mapping)


def _rows(conn: Connection, query: Select[Any]) -> list[Record]:
    return [dict(row._mapping) for row in conn.execute(query)]
