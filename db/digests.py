"""Source digests: what a full pass last applied for each identity, so the next can skip it.

A pull whose source can digest its rows (Auth.js on PostgreSQL) stores, with each applied
page and in its transaction, one digest per upstream user it applied. The column
(``user_identities.source_digest``) holds it only while it is true that the engine would
write nothing for that user given the same source rows: migration 0007's triggers clear it
on every other write to the identity row or to its user's sessions, whoever makes it.

A pass reads them chunk by chunk, alongside the source's digests (``digests_of``).

On the identity row, not a side table: deleting the identity (or its user, by cascade)
takes the digest along with no trigger at all, an identity that holds no digest costs its
writers nothing (the trigger's WHEN is false), and clearing is an assignment to the row
being written anyway.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Engine,
    String,
    bindparam,
    exists,
    func,
    select,
    update,
)

from db.errors import translated, translating
from db.lookup import among
from db.snapshot import lock_writers
from db.tables import user_identities

__all__ = ["digests_in_order", "digests_of", "holds_digests", "store_digests", "stored_digests"]

_ui = user_identities


@translated
def stored_digests(db: Engine, provider: str) -> dict[str, str]:
    """Every ``{external_id: digest}`` of the provider (for inspection and tests: a pass
    reads them chunk by chunk, ``digests_of``)."""
    query = select(_ui.c.external_id, _ui.c.source_digest).where(
        _ui.c.provider == provider, _ui.c.source_digest.is_not(None)
    )
    with db.connect() as conn:
        return {str(e): str(d) for e, d in conn.execute(query)}


@translated
def holds_digests(db: Engine, provider: str) -> bool:
    """Whether any identity of the provider holds a digest (none before a first pass)."""
    query = select(exists().where(_ui.c.provider == provider, _ui.c.source_digest.is_not(None)))
    with db.connect() as conn:
        return bool(conn.execute(query).scalar())


def digests_in_order(db: Engine, provider: str, *, numeric: bool) -> Iterator[tuple[str, str]]:
    """Every ``(external_id, digest)`` of the provider, streamed in byte order of the id, or
    (``numeric``) shorter ids first, which is numeric order for the decimal ids of integer
    keys. A pass merges them with its source's digests, in the same order, holding neither
    side: the order is not enforced, and where it differs a user is only re-read."""
    external_id: ColumnElement[Any] = _ui.c.external_id
    if db.dialect.name == "postgresql":
        external_id = _ui.c.external_id.collate("C")  # SQLite compares bytes already
    order = [func.length(_ui.c.external_id), external_id] if numeric else [external_id]
    query = (
        select(_ui.c.external_id, _ui.c.source_digest)
        .where(_ui.c.provider == provider, _ui.c.source_digest.is_not(None))
        .order_by(*order)
    )
    with translating(), db.connect() as conn:
        result = conn.execution_options(yield_per=10_000).execute(query)
        try:
            for chunk in result.partitions():
                yield from ((str(e), str(d)) for e, d in chunk)
        finally:
            result.close()  # the merge may stop early: close the server-side cursor


@translated
def digests_of(db: Engine, provider: str, external_ids: Sequence[str]) -> dict[str, str]:
    """``{external_id: digest}`` of those of ``external_ids`` that hold one.

    A pass asks chunk by chunk, so that what it holds stays flat however many users there
    are (a dict of a million digests is 200 MB); one short read each, no transaction kept.
    """
    if not external_ids:
        return {}
    with db.connect() as conn:
        query = select(_ui.c.external_id, _ui.c.source_digest).where(
            _ui.c.provider == provider,
            among(conn, _ui.c.external_id, external_ids),
            _ui.c.source_digest.is_not(None),
        )
        if conn.dialect.name != "postgresql":
            return {str(e): str(d) for e, d in conn.execute(query)}
        # The driver's plain tuples, not a Row each: a third of the time at 10,000 rows.
        compiled = query.compile(dialect=conn.dialect)
        with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute(compiled.string, compiled.params)
            return dict(cursor.fetchall())


@translated
def store_digests(conn: Connection, provider: str, digests: Mapping[str, tuple[str, str]]) -> int:
    """Store ``{external_id: (digest, content_hash)}`` in the caller's transaction.

    Only on a live identity whose content hash is the one the pass mapped: the engine has
    just applied (or found unchanged) exactly that, and a row another writer changed since
    gets no digest. The engine's writer lock is taken (again: the engine took it if it
    wrote), so no other engine batch can come between. Returns the rows updated.
    """
    if not digests:
        return 0
    lock_writers(conn)
    ids = list(digests)
    if conn.dialect.name == "postgresql":
        # One statement for the page, not one per user: the first pass stores 100,000.
        rows = (
            func.unnest(
                bindparam("ids", ids, type_=ARRAY(String)),
                bindparam("digests", [digests[i][0] for i in ids], type_=ARRAY(String)),
                bindparam("hashes", [digests[i][1] for i in ids], type_=ARRAY(String)),
            )
            .table_valued("external_id", "digest", "content_hash")
            .render_derived(name="given")
        )
        statement = (
            update(_ui)
            .values(source_digest=rows.c.digest)
            .where(
                _ui.c.provider == provider,
                _ui.c.external_id == rows.c.external_id,
                _ui.c.content_hash == rows.c.content_hash,
                _ui.c.deleted_at.is_(None),
            )
        )
        return int(conn.execute(statement).rowcount)
    statement = (
        update(_ui)
        .values(source_digest=bindparam("d"))
        .where(
            _ui.c.provider == provider,
            _ui.c.external_id == bindparam("e"),
            _ui.c.content_hash == bindparam("h"),
            _ui.c.deleted_at.is_(None),
        )
    )
    params = [{"e": e, "d": d, "h": h} for e, (d, h) in digests.items()]
    return int(conn.execute(statement, params).rowcount)
