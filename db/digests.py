"""Source digests: what a full pass last applied for each identity, so the next can skip it.

A pull whose source can digest its rows (Auth.js on PostgreSQL) stores, with each applied
page and in its transaction, one digest per upstream user it applied, in
``sync_source_digests``. A row there stands only while it is true that the engine would
write nothing for that user given the same source rows: migration 0007's triggers delete it
on every other write to the identity row or to its user's sessions, whoever makes it, and
with the identity. A pass streams them in id order beside the source's digests.

A table of its own, not a column of user_identities: that table's writers build its rows
from its column list (the bulk load positionally), and a narrow table reads faster.
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
)
from sqlalchemy.dialects import postgresql, sqlite

from db.errors import translated, translating
from db.lookup import among
from db.snapshot import lock_writers
from db.tables import sync_source_digests, user_identities

__all__ = ["digests_in_order", "digests_of", "holds_digests", "store_digests", "stored_digests"]

_sd = sync_source_digests
_ui = user_identities


@translated
def stored_digests(db: Engine, provider: str) -> dict[str, str]:
    """Every ``{external_id: digest}`` of the provider (for inspection and tests: a pass
    streams them, ``digests_in_order``)."""
    query = select(_sd.c.external_id, _sd.c.digest).where(_sd.c.provider == provider)
    with db.connect() as conn:
        return {str(e): str(d) for e, d in conn.execute(query)}


@translated
def holds_digests(db: Engine, provider: str) -> bool:
    """Whether any identity of the provider holds a digest (none before a first pass)."""
    query = select(exists().where(_sd.c.provider == provider))
    with db.connect() as conn:
        return bool(conn.execute(query).scalar())


def digests_in_order(db: Engine, provider: str, *, numeric: bool) -> Iterator[tuple[str, str]]:
    """Every ``(external_id, digest)`` of the provider, streamed in byte order of the id, or
    (``numeric``) shorter ids first, which is numeric order for the decimal ids of integer
    keys. A pass merges them with its source's digests, in the same order, holding neither
    side: the order is not enforced, and where it differs a user is only re-read."""
    external_id: ColumnElement[Any] = _sd.c.external_id
    if db.dialect.name == "postgresql":
        external_id = _sd.c.external_id.collate("C")  # SQLite compares bytes already
    order = [func.length(_sd.c.external_id), external_id] if numeric else [external_id]
    query = (
        select(_sd.c.external_id, _sd.c.digest).where(_sd.c.provider == provider).order_by(*order)
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
    """``{external_id: digest}`` of those of ``external_ids`` that hold one (one short read,
    no transaction kept: a pass asks chunk by chunk)."""
    if not external_ids:
        return {}
    with db.connect() as conn:
        query = select(_sd.c.external_id, _sd.c.digest).where(
            _sd.c.provider == provider, among(conn, _sd.c.external_id, external_ids)
        )
        return {str(e): str(d) for e, d in conn.execute(query)}


@translated
def store_digests(conn: Connection, provider: str, digests: Mapping[str, tuple[str, str]]) -> int:
    """Store ``{external_id: (digest, content_hash)}`` in the caller's transaction.

    Only for a live identity whose content hash is the one the pass mapped: the engine has
    just applied (or found unchanged) exactly that, and a row another writer changed since
    gets no digest. The engine's writer lock is taken (again: the engine took it if it
    wrote), so no other engine batch can come between. Returns the rows stored.
    """
    if not digests:
        return 0
    lock_writers(conn)
    ids = list(digests)
    if conn.dialect.name == "postgresql":
        # One statement for the page, not one per user: the first pass stores 100,000.
        given = (
            func.unnest(
                bindparam("ids", ids, type_=ARRAY(String)),
                bindparam("digests", [digests[i][0] for i in ids], type_=ARRAY(String)),
                bindparam("hashes", [digests[i][1] for i in ids], type_=ARRAY(String)),
            )
            .table_valued("external_id", "digest", "content_hash")
            .render_derived(name="given")
        )
        rows = select(_ui.c.provider, _ui.c.external_id, given.c.digest).where(
            _ui.c.provider == provider,
            _ui.c.external_id == given.c.external_id,
            _ui.c.content_hash == given.c.content_hash,
            _ui.c.deleted_at.is_(None),
        )
        pg = postgresql.insert(_sd).from_select(["provider", "external_id", "digest"], rows)
        pg = pg.on_conflict_do_update(
            index_elements=["provider", "external_id"], set_={"digest": pg.excluded.digest}
        )
        return int(conn.execute(pg).rowcount)
    held = select(_ui.c.external_id, _ui.c.content_hash).where(
        _ui.c.provider == provider,
        among(conn, _ui.c.external_id, ids),
        _ui.c.deleted_at.is_(None),
    )
    live = [e for e, h in conn.execute(held) if digests[str(e)][1] == h]
    if not live:
        return 0
    lite = sqlite.insert(_sd)
    lite = lite.on_conflict_do_update(
        index_elements=["provider", "external_id"], set_={"digest": lite.excluded.digest}
    )
    conn.execute(
        lite, [{"provider": provider, "external_id": e, "digest": digests[e][0]} for e in live]
    )
    return len(live)
