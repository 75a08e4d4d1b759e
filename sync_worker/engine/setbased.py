"""The set-based path of a full pass: a batch's simple creates decided and written in SQL.

A full pass whose source can hand its rows over as COPY streams, into a PostgreSQL worker
(``sync_worker.pull``), stages the source in temporary tables (``db.setbased.stage``) and
then, batch by batch, each in its caller's transaction:

1. ``classify``: the batch's users whose source digest is stored unchanged are skipped;
   of the changed ones, the *simple creates* (``engine.bulk``'s rules: nothing stored or
   in the batch that they could meet, rows hashable in SQL) are marked;
2. ``write_simple``: those are written by ``INSERT ... SELECT`` with the rows, audit rows
   and content hashes the bulk path writes, and their source digests stored;
3. every other changed user (OTHER) is handed back to the caller, which maps its rows and
   applies them through ``SyncEngine.apply`` in the same transaction.

If the database refuses the set writes (a constraint the classification did not foresee),
they are rolled back to their savepoint and every changed user of the batch goes the
per-row way, which isolates the refused record.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial

import structlog
from sqlalchemy import Connection

from db import setbased as store
from db.snapshot import lock_writers
from sync_worker.engine.apply import BatchResult
from sync_worker.engine.plan import PlanSettings
from sync_worker.errors import RecordRefused

log = structlog.get_logger(__name__)


#: A user the set path hands to the per-row path: (position, external id, source digest).
Changed = tuple[int, str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class PerRow:
    """What the caller's per-row application of some changed users did."""

    result: BatchResult
    #: The engine isolated a record the database (or validation) refused, by bisecting
    #: the batch it was given: an outcome that depends on that batch's composition.
    isolated: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SetBatch:
    """What the set path did with one batch (and the per-row path with the rest)."""

    users: int
    last_external_id: str | None
    skipped_users: int
    skipped_sessions: int
    created: int
    logins: int
    per_row: PerRow | None


def page_bounds(
    total: int, size: int, seen_max: int, nth_changed: Callable[[int, int], int | None]
) -> Iterator[tuple[int, int, bool]]:
    """``(first, last, is_last)`` positions of each page, cut as the digest pass cuts
    its pages: at ``size`` changed users or ``seen_max`` users, whichever comes first.
    ``nth_changed(start, n)``: the position of the n-th changed user from ``start`` on
    (asked of the database page by page, so no list of positions is held)."""
    if total <= 0:
        yield 1, 0, True
        return
    lo = 1
    while lo <= total:
        end = min(total, lo + seen_max - 1)
        nth = nth_changed(lo, size)
        if nth is not None and nth <= end:
            end = nth
        yield lo, end, end == total
        lo = end + 1


class _Redo(Exception):
    """The batch must be applied again, wholly per row."""


class _Unforeseen(Exception):
    """A unique key refused a write the batch's classification, made without probing the
    stored rows, took for a create: classify again, probing."""


def apply_batch(
    conn: Connection,
    lo: int,
    hi: int,
    *,
    provider: str,
    settings: PlanSettings,
    now: datetime,
    version: datetime,
    source: str,
    run_id: uuid.UUID | None,
    per_row: Callable[[Sequence[Changed]], PerRow],
) -> SetBatch:
    """The users at positions ``lo..hi``, in the caller's transaction: classified, the
    simple creates written in SQL, the other changed users given to ``per_row`` (which
    maps and applies them through the engine, and stores their digests).

    The first classification does not probe the stored identities and sessions (see
    ``db.setbased.classify``); should a unique key refuse a create, the writes are rolled
    back to their savepoint and the batch is classified again, probing. Should the database
    refuse the set writes after that, or the engine isolate a record among the others (its
    bisection depends on the batch it is given), the batch is rolled back to a savepoint
    and all its changed users go to ``per_row``: the batch then ends exactly as the per-row
    pass would end it.
    """
    lock_writers(conn)  # as every engine batch: before anything is read
    # The lock switched the transaction to generic plans (for the engine's set lookups);
    # the set statements run once per batch over temporary tables: plan them per run.
    store.batch_settings(conn)
    link = settings.link_by_verified_email
    summary = store.classify(conn, lo, hi, provider=provider, link=link)
    write = partial(
        store.write_simple, conn, lo, hi, provider=provider, now=now, version=version,
        run_id=run_id, source=source, role=settings.default_role,
        profile=settings.profile_defaults,
    )  # fmt: skip
    try:
        written, done = _simple_then_other(
            conn, write, per_row, summary, provider=provider, probed=False
        )
    except _Unforeseen:
        log.info("set_batch_classified_again", provider=provider)
        summary = store.classify(conn, lo, hi, provider=provider, link=link, probe=True)
        written, done = _simple_then_other(
            conn, write, per_row, summary, provider=provider, probed=True
        )
    log.info(
        "set_batch_applied",
        provider=provider,
        created=written.created,
        logins=written.logins,
        unchanged=summary.skipped_users,
        per_row=len(summary.changed) - written.created,
    )
    return SetBatch(
        users=summary.users,
        last_external_id=summary.last_ext,
        skipped_users=summary.skipped_users,
        skipped_sessions=summary.skipped_sessions,
        created=written.created,
        logins=written.logins,
        per_row=done,
    )


def _simple_then_other(
    conn: Connection,
    write: Callable[[], store.Written],
    per_row: Callable[[Sequence[Changed]], PerRow],
    summary: store.BatchSummary,
    *,
    provider: str,
    probed: bool,
) -> tuple[store.Written, PerRow | None]:
    """The simple creates in SQL, then the other changed users per row, under a savepoint;
    all of them per row if that fails. ``probed``: the classification looked up the stored
    rows (else a refused write raises ``_Unforeseen``, with nothing written)."""
    if not summary.simple:
        return store.Written(created=0, logins=0), (
            per_row(summary.changed) if summary.changed else None
        )
    try:
        with conn.begin_nested():
            try:
                written = write()
            except RecordRefused:
                if not probed:
                    raise _Unforeseen from None
                raise
            done = per_row(summary.other) if summary.other else None
            if done is not None and done.isolated:
                raise _Redo
    except (_Redo, RecordRefused) as exc:
        log.info("set_batch_redone_per_row", provider=provider, reason=type(exc).__name__)
        return store.Written(created=0, logins=0), per_row(summary.changed)
    return written, done
