"""Profiles for users that have none (a legacy database, or an app that deleted one).

A batch is three statements whatever its size: a keyset read of users without a profile,
one multi-row ``INSERT ... ON CONFLICT (user_id) DO NOTHING RETURNING``, and one insert of
their audit rows. The read walks ``users`` in primary-key order after the previous batch's
last id and probes ``profiles`` by its unique ``user_id`` index, so a whole run reads each
user once, however few lack a profile. The ids are made here (uuid4, like the engine's);
SQLite has no portable way to make one in an ``INSERT ... SELECT``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, exists, func, select
from sqlalchemy.dialects import postgresql, sqlite

from db.errors import translated
from db.rows import ProfileRow
from db.tables import profiles, sync_audit, users
from db.upsert import insert_rows

#: The audit action of a profile this job created, apart from the engine's ``created``
#: (which means a new user from an IdP).
PROFILE_CREATED = "profile_created"
#: sync_audit.provider of rows the worker writes on its own account, not an IdP's.
WORKER_PROVIDER = "sync-worker"


@dataclass(frozen=True, slots=True)
class Bare:
    """A user without a profile, with the fields its profile copies."""

    id: uuid.UUID
    name: str | None
    avatar_url: str | None


@translated
def count_users(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(users)).scalar_one())


@translated
def users_without_profile(conn: Connection, *, after: uuid.UUID | None, limit: int) -> list[Bare]:
    """Up to ``limit`` users without a profile, in id order, after ``after``.

    Soft-deleted users are included: every user has exactly one profile (DESIGN), and a
    restored user must find theirs.
    """
    missing = ~exists().where(profiles.c.user_id == users.c.id)
    query = select(users.c.id, users.c.name, users.c.avatar_url).where(missing)
    if after is not None:
        query = query.where(users.c.id > after)
    rows = conn.execute(query.order_by(users.c.id).limit(limit))
    return [Bare(id=r.id, name=r.name, avatar_url=r.avatar_url) for r in rows]


@translated
def create_profiles(
    conn: Connection,
    bare: Sequence[Bare],
    *,
    defaults: Mapping[str, Any],
    now: datetime,
    source: str,
    run_id: uuid.UUID | None = None,
) -> list[ProfileRow]:
    """Insert a profile per user with the configured defaults and audit each one created.

    A user who got a profile meanwhile (the engine, concurrently) keeps it: the insert skips
    them, and they are neither returned nor audited.
    """
    if not bare:
        return []
    rows = [_profile(user, defaults, now) for user in bare]
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = (
        insert(profiles)
        .on_conflict_do_nothing(index_elements=[profiles.c.user_id])
        .returning(*profiles.c)
    )
    created = [cast(ProfileRow, dict(row._mapping)) for row in conn.execute(stmt, rows)]
    insert_rows(conn, sync_audit, [_audit(row, now, source, run_id) for row in created])
    return created


def _profile(user: Bare, defaults: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    # The same fields and fallbacks as a profile the engine creates with a new user.
    return {
        "id": uuid.uuid4(),
        "user_id": user.id,
        "display_name": user.name,
        "avatar_url": user.avatar_url,
        "timezone": defaults.get("timezone", "UTC"),
        "currency": defaults.get("currency", "USD"),
        "locale": defaults.get("locale", "en"),
        "settings": defaults.get("settings") or {},
        "created_at": now,
        "updated_at": now,
    }


_AUDITED_FIELDS = ("display_name", "avatar_url", "timezone", "currency", "locale", "settings")


def _audit(
    profile: ProfileRow, now: datetime, source: str, run_id: uuid.UUID | None
) -> dict[str, Any]:
    fields: Mapping[str, Any] = profile
    changes = {
        f"profile.{name}": [None, fields[name]]
        for name in _AUDITED_FIELDS
        if fields[name] is not None
    }
    return {
        "occurred_at": now,
        "run_id": run_id,
        "source": source,
        "provider": WORKER_PROVIDER,
        "external_id": None,
        "user_id": profile["user_id"],
        "action": PROFILE_CREATED,
        "changes": changes,
        "event_id": None,
        "error": None,
    }
