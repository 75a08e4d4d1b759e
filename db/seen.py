"""Upstream ids a full pass has seen (``sync_seen``), for reconcile's set difference."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    CompoundSelect,
    Connection,
    Engine,
    Select,
    Subquery,
    delete,
    func,
    insert,
    select,
    text,
    true,
)

from db.errors import translated
from db.lookup import among
from db.tables import sync_seen, user_identities

#: Ids per ``sync_seen`` row when a pass records them all at once (``mark_seen_staged``):
#: some 1.5 MB of JSON.
SEEN_CHUNK = 100_000


@translated
def mark_seen(conn: Connection, run_id: uuid.UUID, external_ids: Sequence[str]) -> None:
    """Record ids a full pass observed upstream: one row for the page (duplicates are harmless)."""
    ids = list(dict.fromkeys(external_ids))
    conn.execute(insert(sync_seen).values(run_id=run_id, external_ids=ids))


@translated
def mark_seen_staged(
    conn: Connection, run_id: uuid.UUID, table: str, column: str, *, rows: int
) -> None:
    """Record every id of a temporary table a pass staged (PostgreSQL; ``rows`` of them),
    in ``mark_seen``'s shape, rows of at most ``SEEN_CHUNK`` ids: the ids never travel
    through Python. One aggregate while they fit one row (numbering them to cut rows
    costs a third more)."""
    ids = f"to_jsonb(array_agg({column}))"
    if rows <= SEEN_CHUNK:
        statement = f"SELECT :run, {ids} FROM {table} HAVING count(*) > 0"  # noqa: S608
    else:
        statement = (
            f"SELECT :run, {ids} FROM (SELECT {column}, (row_number() OVER () - 1)"  # noqa: S608
            f" / :chunk AS part FROM {table}) AS t GROUP BY part"
        )
    conn.execute(
        text(f"INSERT INTO sync_seen (run_id, external_ids) {statement}"),
        {"run": run_id, "chunk": SEEN_CHUNK},
    )


def seen_ids(dialect: str, run_id: uuid.UUID) -> Select[Any]:
    """Every id the run recorded, unnested from its pages' arrays in the database."""
    unnest = func.jsonb_array_elements_text if dialect == "postgresql" else func.json_each
    ids = unnest(sync_seen.c.external_ids).table_valued("value")
    return (
        select(ids.c.value)
        .select_from(sync_seen.join(ids, true()))
        .where(sync_seen.c.run_id == run_id)
    )


@translated
def forget_seen(db: Engine, run_id: uuid.UUID) -> None:
    with db.begin() as conn:
        conn.execute(delete(sync_seen).where(sync_seen.c.run_id == run_id))


@translated
def live_ids(db: Engine, provider: str) -> list[str]:
    """External ids of the provider's live primary identities (for a dry run's reconcile)."""
    with db.connect() as conn:
        return [
            str(e) for e in conn.execute(select(live_identities(provider).c.external_id)).scalars()
        ]


@translated
def count_unseen(db: Engine, provider: str, run_id: uuid.UUID) -> tuple[int, int]:
    """(live primary identities of the provider, how many of them the run did not see)."""
    unseen = _unseen(db.dialect.name, provider, run_id).subquery()
    with db.connect() as conn:
        total = count_live(conn, provider)
        missing = conn.execute(select(func.count()).select_from(unseen)).scalar_one()
    return total, int(missing)


@translated
def count_live(conn: Connection, provider: str, among_ids: Sequence[str] | None = None) -> int:
    """Live primary identities of the provider (of those ``among_ids``, if given)."""
    live = live_identities(provider)
    query = select(func.count()).select_from(live)
    if among_ids is not None:
        if not among_ids:
            return 0
        query = query.where(among(conn, live.c.external_id, among_ids))
    return int(conn.execute(query).scalar_one())


@translated
def count_unseen_compared(
    conn: Connection,
    provider: str,
    *,
    unchanged: int,
    changed: Sequence[str],
    live: int | None = None,
) -> tuple[int, int] | None:
    """``count_unseen`` for a pass whose every seen id was just compared with the stored
    source digests, in the comparing transaction, without unnesting the seen ids: of the
    ids it saw, ``unchanged`` held their stored digest, ``changed`` (the others) did not.

    A stored digest stands only for a live primary identity (``store_digests`` stores
    none for any other, and migration 0007's triggers drop it with any later write to the
    identity): the digest pass skips such a user on that ground already. So the live
    identities the pass saw are the ``unchanged`` ones and those of ``changed`` that are
    live; the rest of the live ones it did not see. One count over the live identities,
    and one short lookup of the changed ids (none on a pass that changed nobody). None
    where the digests contradict that (more seen than live: digests that outlived their
    identities, say after a TRUNCATE, which fires no trigger): count over the seen ids."""
    if live is None:
        live = count_live(conn, provider)
    seen = unchanged + count_live(conn, provider, changed)
    return (live, live - seen) if seen <= live else None


@translated
def unseen_ids(db: Engine, provider: str, run_id: uuid.UUID) -> list[str]:
    """The live ids the run did not see (bounded by the caller's deletion guard)."""
    with db.connect() as conn:
        return [str(e) for e in conn.execute(_unseen(db.dialect.name, provider, run_id)).scalars()]


def _unseen(dialect: str, provider: str, run_id: uuid.UUID) -> Select[Any] | CompoundSelect[Any]:
    # The seen ids are unnested from JSON arrays, which no index covers: a set difference
    # in one pass over each side. On SQLite, EXCEPT (a NOT EXISTS there would unnest the
    # arrays once per live id); PostgreSQL runs NOT EXISTS as a hashed anti-join, half the
    # time of its EXCEPT at 100,000 ids.
    live = live_identities(provider)
    if dialect != "postgresql":
        return select(live.c.external_id).except_(seen_ids(dialect, run_id))
    ids = func.jsonb_array_elements_text(sync_seen.c.external_ids).table_valued("value")
    seen = (
        select(ids.c.value)
        .select_from(sync_seen.join(ids, true()))
        .where(sync_seen.c.run_id == run_id, ids.c.value == live.c.external_id)
    )
    return select(live.c.external_id).where(~seen.exists())


def live_identities(provider: str) -> Subquery:
    """Primary identities of this provider that are not deleted (linked accounts excluded)."""
    return (
        select(user_identities.c.external_id)
        .where(
            user_identities.c.provider == provider,
            user_identities.c.deleted_at.is_(None),
            user_identities.c.content_hash.is_not(None),
        )
        .subquery()
    )
