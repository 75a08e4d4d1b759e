"""Source digests: what a full pass last applied for each identity, so the next can skip it.

A pull whose source can digest its rows (Auth.js on PostgreSQL) stores, with each applied
page and in its transaction, one digest per upstream user it applied, in
``sync_source_digests``. A row there stands only while it is true that the engine would
write nothing for that user given the same source rows: migration 0007's triggers delete it
on every other write to the identity row or to its user's sessions, whoever makes it, and
with the identity. A pass streams them in id order beside the source's digests.

On PostgreSQL a pass compares in the worker instead (``stage_digests``, ``compare_staged``,
``changed_staged``): the source's digests arrive as COPY bytes, passed through undecoded,
into a temporary table of the comparing transaction, and only the changed users come back.
Before any row, a whole pass compares the stored digests' total (``stored_totals``; the
digests add up, ``sync_worker.digest_sum``) with the source's: equal, nothing changed, and
no user's digest is read.

A table of its own, not a column of user_identities: that table's writers build its rows
from its column list (the bulk load positionally), and a narrow table reads faster.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    String,
    bindparam,
    case,
    cast,
    exists,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite

from db.errors import translated, translating
from db.lookup import among
from db.seen import count_live
from db.snapshot import lock_writers
from db.tables import sync_source_digests, user_identities
from sync_worker.digest_sum import MODULUS, DigestSum

__all__ = [
    "STAGED",
    "Comparison",
    "changed_staged",
    "compare_staged",
    "create_staged",
    "digests_in_order",
    "digests_of",
    "holds_digests",
    "stage_digests",
    "store_digests",
    "stored_digests",
    "stored_sum",
    "stored_totals",
]

#: The temporary table a pass's source digests are copied into (``stage_digests``).
STAGED = "sw_pass_digests"

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


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """Staged source digests against the stored ones."""

    users: int
    unchanged: int  # users whose stored digest is the source's
    skipped_sessions: int  # their live sessions


@translated
def create_staged(conn: Connection) -> None:
    """``STAGED``, for a pass's source digests: a temporary table dropped when the caller's
    transaction ends (PostgreSQL only)."""
    conn.execute(
        text(f"CREATE TEMP TABLE {STAGED} (ext text, digest text, n bigint) ON COMMIT DROP")
    )


def stage_digests(conn: Connection, rows: Iterable[bytes]) -> None:
    """COPY a pass's source digests, text rows ``(external id, digest, live sessions)``,
    into ``STAGED`` (``create_staged``); the bytes are written as they come, never decoded."""
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur, cur.copy(f"COPY {STAGED} FROM STDIN") as copy:
        for block in rows:
            copy.write(block)


@translated
def stored_sum(conn: Connection, provider: str) -> DigestSum:
    """How many digests are stored for the provider and their sum (``sync_worker.
    digest_sum``), on PostgreSQL: one scan, no row sent back. A full pass compares it with
    its source's total. Digests of an older definition that are not decimal integers
    (authjs-1's 32 hex digits) are counted and not summed: they cannot match anyway."""
    digest = _sd.c.digest
    number = case((func.length(digest) <= _DECIMAL_DIGITS, cast(digest, BigInteger)))
    users, total = conn.execute(
        select(func.count(), func.coalesce(func.sum(number), 0)).where(_sd.c.provider == provider)
    ).one()
    return DigestSum(users=int(users), total=int(total) % MODULUS)


@translated
def stored_totals(conn: Connection, provider: str) -> tuple[DigestSum, int]:
    """``stored_sum`` and the provider's live identities (``db.seen.count_live``), for a
    pass whose source totals its side meanwhile. Each scan on one backend: a parallel plan
    started two processes a scan and took twice the CPU, on the cores the source's total
    is computed on (in the caller's transaction)."""
    conn.execute(text("SELECT set_config('max_parallel_workers_per_gather', '0', true)"))
    return stored_sum(conn, provider), count_live(conn, provider)


#: At most this many characters in a decimal digest of any definition that had them (a
#: signed 64-bit integer's: each fits a bigint); anything longer is not one.
_DECIMAL_DIGITS = 20


@translated
def compare_staged(conn: Connection, provider: str) -> Comparison:
    """How many staged users there are, and how many of them (with their live sessions)
    hold the stored digest: one join, nothing sent back per user."""
    users, unchanged, sessions = conn.execute(
        text(
            "SELECT count(*), count(s.digest), coalesce(sum(d.n) FILTER"  # noqa: S608
            f" (WHERE s.digest IS NOT NULL), 0) FROM {STAGED} d"
            " LEFT JOIN sync_source_digests s ON s.provider = :p AND s.external_id = d.ext"
            " AND s.digest = d.digest"
        ),
        {"p": provider},
    ).one()
    return Comparison(users=int(users), unchanged=int(unchanged), skipped_sessions=int(sessions))


@translated
def changed_staged(conn: Connection, provider: str) -> dict[str, str]:
    """``{external_id: digest}`` of the staged users whose stored digest differs or is missing."""
    rows = conn.execute(
        text(
            f"SELECT d.ext, d.digest FROM {STAGED} d WHERE NOT EXISTS"  # noqa: S608
            " (SELECT 1 FROM sync_source_digests s WHERE s.provider = :p"
            " AND s.external_id = d.ext AND s.digest = d.digest)"
        ),
        {"p": provider},
    )
    return {str(e): str(d) for e, d in rows}
