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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import Connection

from db import setbased as store
from db.snapshot import lock_writers
from sync_worker.engine.plan import PlanSettings
from sync_worker.errors import RecordRefused

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class SetBatch:
    """What the set path did with one batch, and what it leaves to the per-row path."""

    users: int
    last_external_id: str | None
    skipped_users: int
    skipped_sessions: int
    created: int
    logins: int
    other: Sequence[tuple[int, str, str]]  # (position, external id, source digest)


def page_bounds(
    total: int, changed: Sequence[int], size: int, seen_max: int
) -> Iterator[tuple[int, int, bool]]:
    """``(first, last, is_last)`` positions of each page, cut as the digest pass cuts
    its pages: at ``size`` changed users or ``seen_max`` users, whichever comes first."""
    if total <= 0:
        yield 1, 0, True
        return
    lo, i = 1, 0
    while lo <= total:
        end = min(total, lo + seen_max - 1)
        if i + size - 1 < len(changed) and changed[i + size - 1] <= end:
            end = changed[i + size - 1]
        while i < len(changed) and changed[i] <= end:
            i += 1
        yield lo, end, end == total
        lo = end + 1


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
) -> SetBatch:
    """Classify the users at positions ``lo..hi`` and write the simple creates, in the
    caller's transaction (the engine's writer lock taken first, as every engine batch)."""
    lock_writers(conn)
    summary = store.classify(
        conn, lo, hi, provider=provider, link=settings.link_by_verified_email
    )
    written = store.Written(created=0, logins=0)
    other = summary.other
    if summary.simple:
        try:
            with conn.begin_nested():
                written = store.write_simple(
                    conn,
                    provider=provider,
                    now=now,
                    version=version,
                    run_id=run_id,
                    source=source,
                    role=settings.default_role,
                    profile=settings.profile_defaults,
                )
        except RecordRefused as exc:
            log.warning("set_batch_refused", provider=provider, error=str(exc))
            other = store.changed_rows(conn)
            written = store.Written(created=0, logins=0)
    log.info(
        "set_batch_applied",
        provider=provider,
        created=written.created,
        logins=written.logins,
        unchanged=summary.skipped_users,
        other=len(other),
    )
    return SetBatch(
        users=summary.users,
        last_external_id=summary.last_ext,
        skipped_users=summary.skipped_users,
        skipped_sessions=summary.skipped_sessions,
        created=written.created,
        logins=written.logins,
        other=other,
    )
