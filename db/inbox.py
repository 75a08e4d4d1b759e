"""The webhook inbox store: every statement over ``sync_inbox``, on PostgreSQL and SQLite.

A delivery's life::

    store -> pending --claim--> (leased to one worker) --hold + complete--> done
                  ^                 |         |
                  |              release    fail --> failed (next_attempt_at) --claim--> ...
                  |                 |                  \\--> dead (attempts >= max_attempts)
                  +-----------------+--- replay / requeue_due (back to pending)
    store (status ignored): nothing to apply, finished on arrival.
    bury_abandoned: a row whose last allowed lease ran out with no outcome --> dead.

The drainer claims rows and commits the claim at once, resolves them with no transaction
open (network calls to the IdP), then in ONE transaction calls ``hold`` (locks the rows it
still owns), applies the changes, and ``complete``\\s them. A lease (``claimed_until``) lets a
row claimed by a killed process come back once it expires; ``hold`` makes sure a row whose
lease ran out and that another worker claimed is applied by that worker only.

Times are the caller's (``now``); on several hosts, a lease must dwarf their clock skew.

Errors: every function lets SQLAlchemy's exceptions through as raised (``OperationalError``
for a lost connection, a lock or statement timeout, or a busy SQLite database;
``DBAPIError`` subclasses otherwise). Arguments are checked first and refused with
``ValueError`` before any SQL runs. Only ``purge_done_in_batches`` commits (it takes the
engine); every other function runs in the caller's transaction and says which one it expects.
"""

from __future__ import annotations

import os
import random
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Row,
    and_,
    any_,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from db.lookup import among
from db.tables import (
    INBOX_CLAIMABLE,
    INBOX_FINISHED,
    INBOX_STATUSES,
    inbox_status_in,
    sync_inbox,
)

Status = Literal["pending", "done", "failed", "dead", "ignored"]
ArrivalStatus = Literal["pending", "ignored"]

ERROR_MAX = 1000  # characters of last_error kept
MAX_BATCH = 10_000  # rows per claim or purge batch
_t = sync_inbox
_CLAIMABLE = inbox_status_in(INBOX_CLAIMABLE)  # the text of ix_sync_inbox_claimable's WHERE
_FINISHED = inbox_status_in(INBOX_FINISHED)  # the text of ix_sync_inbox_finished_processed_at's
_PENDING_ONLY = inbox_status_in(("pending",))
_WIDTHS = {"provider": 64, "event_id": 255, "event_type": 128, "worker": 128}


@dataclass(frozen=True, slots=True)
class Delivery:
    """One verified delivery to store. ``ignored``: kept only to recognise a redelivery."""

    event_id: str
    payload: Mapping[str, Any]
    event_type: str | None = None
    status: ArrivalStatus = "pending"


@dataclass(frozen=True, slots=True)
class StoreResult:
    inserted: int
    duplicates: int  # already stored (a redelivery), or listed twice in the same call


@dataclass(frozen=True, slots=True)
class InboxRow:
    id: int
    provider: str
    event_id: str
    event_type: str | None
    payload: dict[str, Any]
    status: Status
    attempts: int
    received_at: datetime
    next_attempt_at: datetime | None
    last_error: str | None
    processed_at: datetime | None
    claimed_by: str | None
    claimed_until: datetime | None


@dataclass(frozen=True, slots=True)
class FailResult:
    retrying: tuple[int, ...]  # now failed, due again at next_attempt_at
    dead: tuple[int, ...]  # out of attempts; only replay brings them back


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: ``base * 2**(attempt - 1)``, at most ``cap``, then
    shortened by up to ``jitter`` (a fraction) so rows failed together spread out, while the
    cap stays a hard ceiling."""

    base: timedelta = timedelta(seconds=30)
    cap: timedelta = timedelta(hours=1)
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.base <= timedelta(0) or self.cap < self.base:
            raise ValueError("backoff: need 0 < base <= cap")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("backoff: jitter is a fraction between 0 and 1")

    def delay(self, attempt: int, draw: float = 0.0) -> timedelta:
        """Delay after the ``attempt``-th failed attempt (1 for the first); ``draw`` in
        [0, 1) is the random part (0: no jitter), passed in so this stays pure."""
        if attempt < 1:
            raise ValueError("backoff: attempts count from 1")
        if not 0.0 <= draw < 1.0:
            raise ValueError("backoff: draw is in [0, 1)")
        # The exponent is clamped: past 2**64 every delay is the cap anyway, and a float
        # power that large would overflow.
        growth = 2.0 ** min(attempt - 1, 64)
        seconds = min(self.cap.total_seconds(), self.base.total_seconds() * growth)
        return timedelta(seconds=seconds * (1.0 - self.jitter * draw))


def new_worker_id() -> str:
    """A claimant name unique to this process: host, pid and a random part (pids recur)."""
    name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    return name[-_WIDTHS["worker"] :]  # the unique tail survives if the host name is long


def store(
    conn: Connection, provider: str, items: Sequence[Delivery], *, now: datetime
) -> StoreResult:
    """Insert deliveries; one already stored under (provider, event_id) is left as it is.

    One INSERT for the whole call (SQLAlchemy's insertmanyvalues: one round trip per 1,000
    rows), stored all or nothing with the caller's transaction. Ignored
    deliveries arrive finished (processed_at set), so retention ages them like done rows.
    Raises ValueError for a value wider than its column (checked alike on both dialects:
    SQLite would store it).
    """
    check(provider, items)
    return store_arrivals(conn, [Arrival(provider, items, now)])[0]


@dataclass(frozen=True, slots=True)
class Arrival:
    """The deliveries of one request, with the time it was received."""

    provider: str
    items: Sequence[Delivery]
    received_at: datetime


def check(provider: str, items: Sequence[Delivery]) -> None:
    """Refuse (ValueError) deliveries the inbox cannot store, before any SQL runs."""
    _check_width("provider", provider)
    for item in items:
        _check_width("event_id", item.event_id)
        if item.event_type is not None:
            _check_width("event_type", item.event_type)
        if item.status not in ("pending", "ignored"):
            raise ValueError(f"inbox: a delivery arrives pending or ignored, not {item.status}")


def store_arrivals(conn: Connection, arrivals: Sequence[Arrival]) -> list[StoreResult]:
    """Store several requests' deliveries in one INSERT; one result per arrival, in order.

    The group commit's statement: the requests waiting together share one round trip. An
    event id listed twice (in one request, or in two requests of the group, such as a
    sender's retry racing its first attempt) is inserted once and counted stored for the
    first arrival that lists it, a duplicate for the others. Callers ``check`` first.
    (On PostgreSQL the daemon's receiver runs the same on its event loop:
    ``db/inbox_writer.py``.)
    """
    rows, first = planned_rows(arrivals)
    inserted = [0] * len(arrivals)
    if rows:
        statement = _insert_new(conn.dialect.name).returning(_t.c.provider, _t.c.event_id)
        for provider, event_id in conn.execute(statement, rows):
            inserted[first[(provider, event_id)]] += 1
    return results_of(arrivals, inserted)


def planned_rows(
    arrivals: Sequence[Arrival],
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], int]]:
    """The rows to insert for ``arrivals``, each (provider, event id) once, and for each the
    index of the first arrival listing it (the one it counts as stored for)."""
    rows: list[dict[str, Any]] = []
    first: dict[tuple[str, str], int] = {}  # (provider, event_id) -> the arrival storing it
    for index, arrival in enumerate(arrivals):
        for item in arrival.items:
            key = (arrival.provider, item.event_id)
            if key not in first:
                first[key] = index
                rows.append(_new_row(arrival.provider, item, arrival.received_at))
    return rows, first


def results_of(arrivals: Sequence[Arrival], inserted: Sequence[int]) -> list[StoreResult]:
    """Per arrival: ``inserted`` rows stored, the rest of its deliveries duplicates."""
    return [
        StoreResult(inserted=n, duplicates=len(arrival.items) - n)
        for n, arrival in zip(inserted, arrivals, strict=True)
    ]


def claim(
    conn: Connection,
    *,
    limit: int,
    now: datetime,
    lease: timedelta,
    worker: str,
    max_attempts: int | None = None,
) -> list[InboxRow]:
    """Lease up to ``limit`` due rows to ``worker``, oldest id first; commit at once.

    Due: pending or failed, next_attempt_at unset or come, and no live lease. Each claim
    counts an attempt. With ``max_attempts``, a row already claimed that many times is not
    claimed again (``bury_abandoned`` finds it). On PostgreSQL the rows are picked
    ``FOR UPDATE SKIP LOCKED``, so concurrent claimers never wait on each other nor take the
    same row; on SQLite the transaction already holds the only write lock (BEGIN IMMEDIATE).
    """
    _check_batch("limit", limit)
    _check_width("worker", worker)
    if lease <= timedelta(0):
        raise ValueError("inbox: the lease must be positive")
    if max_attempts is not None:
        _check_positive("max_attempts", max_attempts)
    params = {
        "now": now,
        "until": now + lease,
        "worker": worker,
        "limit": limit,
        "max_attempts": max_attempts,
    }
    stmt = _claim_statement(max_attempts is not None)
    rows = [_inbox_row(r) for r in conn.execute(stmt, params).all()]
    return sorted(rows, key=lambda r: r.id)  # RETURNING has no order


@cache
def _claim_statement(capped: bool) -> Any:
    """Built once (per whether attempts are capped): a drainer claims again and again."""
    now = bindparam("now", type_=_t.c.received_at.type)
    due = and_(
        _CLAIMABLE,
        or_(_t.c.next_attempt_at.is_(None), _t.c.next_attempt_at <= now),
        _unleased(now),
    )
    if capped:
        due = and_(due, _t.c.attempts < bindparam("max_attempts", type_=Integer))
    # A CTE holding FOR UPDATE is always materialized on PostgreSQL: the pick runs once, so
    # the update cannot touch more than ``limit`` rows.
    picked = (
        select(_t.c.id)
        .where(due)
        .order_by(_t.c.id)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    return (
        update(_t)
        .where(_t.c.id.in_(select(picked.c.id)))
        .values(
            claimed_by=bindparam("worker", type_=_t.c.claimed_by.type),
            claimed_until=bindparam("until", type_=_t.c.claimed_until.type),
            attempts=_t.c.attempts + 1,
        )
        .returning(*_t.c)
    )


def hold(conn: Connection, ids: Sequence[int], *, worker: str) -> list[int]:
    """Lock the rows of ``ids`` that ``worker`` still holds; call first in the apply
    transaction and apply only the ids returned.

    A row whose lease ran out and that another worker claimed (or finished) is left out:
    on PostgreSQL ``FOR UPDATE`` waits for that worker's transaction, then re-reads the row.
    An expired lease nobody took over is still this worker's: once locked here, no claim can
    take it (claims skip locked rows).
    """
    if not ids:
        return []
    stmt = _held_statement(conn.dialect.name)
    return list(conn.execute(stmt, {"ids": list(ids), "worker": worker}).scalars())


def complete(conn: Connection, ids: Sequence[int], *, worker: str, now: datetime) -> int:
    """Mark rows this worker holds done and end their lease (in the apply transaction,
    after ``hold``). Returns the number of rows marked."""
    if not ids:
        return 0
    stmt = _complete_statement(conn.dialect.name)
    return conn.execute(stmt, {"ids": list(ids), "worker": worker, "now": now}).rowcount


def fail(
    conn: Connection,
    errors: Mapping[int, str],
    *,
    worker: str,
    now: datetime,
    max_attempts: int,
    backoff: Backoff,
    rng: random.Random | None = None,
) -> FailResult:
    """Record failed attempts (row id -> error) of rows this worker holds and end the lease.

    A row with ``attempts >= max_attempts`` goes dead; any other goes failed, due again
    after ``backoff.delay(attempts)``. The error is kept on one line, at most ERROR_MAX
    characters. Rows no longer held by ``worker`` are left alone and appear in neither list.
    Two statements whatever the count: a locking read of the attempts, then one executemany.
    """
    _check_positive("max_attempts", max_attempts)
    if not errors:
        return FailResult(retrying=(), dead=())
    draw = (rng or random).random
    held = conn.execute(
        select(_t.c.id, _t.c.attempts)
        .where(among(conn, _t.c.id, list(errors)), _t.c.claimed_by == worker, _CLAIMABLE)
        .order_by(_t.c.id)
        .with_for_update()
    ).all()
    dead = {row_id for row_id, attempts in held if attempts >= max_attempts}
    params = [
        {
            "row_id": row_id,
            "new_status": "dead" if row_id in dead else "failed",
            "due_at": None if row_id in dead else now + backoff.delay(max(attempts, 1), draw()),
            "error": one_line(errors[row_id]),
        }
        for row_id, attempts in held
    ]
    if params:
        conn.execute(_record_failure, params)
    retrying = tuple(row_id for row_id, _ in held if row_id not in dead)
    return FailResult(retrying=retrying, dead=tuple(sorted(dead)))


def bury_abandoned(conn: Connection, *, now: datetime, max_attempts: int) -> int:
    """Mark dead the rows whose last allowed attempt never ended: claimed ``max_attempts``
    times, the last lease run out, no outcome recorded. The worker died or hung holding
    them, perhaps because of them; without this a delivery that kills its worker would be
    claimed forever. For the scheduled ``retry`` job, with the drainer's max_attempts.
    Returns the count; ``replay`` brings them back."""
    _check_positive("max_attempts", max_attempts)
    stmt = (
        update(_t)
        .where(_CLAIMABLE, _t.c.attempts >= max_attempts, _t.c.claimed_until < now)
        .values(
            status="dead",
            next_attempt_at=None,
            claimed_by=None,
            claimed_until=None,
            last_error=f"abandoned: the lease of attempt {max_attempts} ran out with no outcome",
        )
    )
    return conn.execute(stmt).rowcount


def release(conn: Connection, ids: Sequence[int], *, worker: str) -> int:
    """Give rows this worker holds back unprocessed (graceful shutdown): the lease ends and
    the claim's attempt is taken back, so they are due again at once. Returns the count."""
    if not ids:
        return 0
    stmt = (
        update(_t)
        .where(among(conn, _t.c.id, ids), _t.c.claimed_by == worker, _CLAIMABLE)
        .values(claimed_by=None, claimed_until=None, attempts=_t.c.attempts - 1)
    )
    return conn.execute(stmt).rowcount


def replay(
    conn: Connection,
    *,
    now: datetime,
    provider: str | None = None,
    statuses: Sequence[str] = ("dead", "failed"),
    ids: Sequence[int] | None = None,
    since: datetime | None = None,
) -> int:
    """Put rows back to pending with a fresh count of attempts (the CLI ``replay``).

    Filters combine: ``provider``, ``statuses`` (any but pending), ``ids``, and ``since``
    (received at or after). A row under a live lease is being worked on and is left alone.
    last_error is kept for the record. Returns the number of rows replayed.
    """
    wrong = set(statuses) - (set(INBOX_STATUSES) - {"pending"})
    if not statuses or wrong:
        raise ValueError(f"inbox: replay takes statuses among done, failed, dead, ignored: {wrong}")
    if ids is not None and not ids:
        return 0
    where: list[ColumnElement[bool]] = [_t.c.status.in_(list(statuses)), _unleased(now)]
    if provider is not None:
        where.append(_t.c.provider == provider)
    if ids is not None:
        where.append(among(conn, _t.c.id, ids))
    if since is not None:
        where.append(_t.c.received_at >= since)
    stmt = (
        update(_t)
        .where(*where)
        .values(
            status="pending",
            attempts=0,
            next_attempt_at=None,
            processed_at=None,
            claimed_by=None,
            claimed_until=None,
        )
    )
    return conn.execute(stmt).rowcount


def requeue_due(conn: Connection, *, now: datetime) -> int:
    """Failed rows whose next attempt has come, and no live lease, back to pending (the
    scheduled ``retry`` job). Attempts are kept, so max_attempts still applies. A claim
    takes due failed rows anyway; this makes the state say so. Returns the count."""
    stmt = (
        update(_t)
        .where(
            _CLAIMABLE,
            _t.c.status == "failed",
            _t.c.next_attempt_at <= now,
            _unleased(now),
        )
        .values(status="pending", next_attempt_at=None)
    )
    return conn.execute(stmt).rowcount


def purge_done(conn: Connection, *, older_than: datetime, limit: int) -> int:
    """Delete up to ``limit`` done or ignored rows processed before ``older_than``, oldest
    first; returns how many went. One bounded batch, so the caller's transaction holds its
    locks briefly: commit, and call again while it returns ``limit``
    (``purge_done_in_batches`` does that)."""
    _check_batch("limit", limit)
    old = and_(_FINISHED, _t.c.processed_at < older_than)
    ids = list(
        conn.execute(select(_t.c.id).where(old).order_by(_t.c.processed_at).limit(limit)).scalars()
    )
    if not ids:
        return 0
    # Ids first, then a delete by key: PostgreSQL planned ``id IN (subquery)`` as a hash
    # join over a scan of the whole table, every batch. The condition is checked again in
    # case a row was replayed in between.
    return conn.execute(delete(_t).where(among(conn, _t.c.id, ids), old)).rowcount


def purge_done_in_batches(engine: Engine, *, older_than: datetime, batch: int = 5000) -> int:
    """``purge_done`` until nothing is left to delete, one transaction per batch."""
    total = 0
    while True:
        with engine.begin() as conn:
            deleted = purge_done(conn, older_than=older_than, limit=batch)
        total += deleted
        if deleted < batch:
            return total


def counts(conn: Connection) -> dict[str, int]:
    """Rows by status, every status present (0 when none), for ``sync_worker_inbox_rows``.
    It counts the whole table, done rows included: meant for a scrape, not a hot loop."""
    grouped = conn.execute(select(_t.c.status, func.count()).group_by(_t.c.status))
    found = {str(status): int(count) for status, count in grouped}
    return {status: found.get(status, 0) for status in INBOX_STATUSES}


def oldest_pending_age(conn: Connection, *, now: datetime) -> float | None:
    """Seconds since the oldest pending row arrived, None when none is pending
    (``sync_worker_inbox_oldest_pending_seconds``). Failed rows waiting for a retry are not
    pending: they show in ``counts``."""
    # _CLAIMABLE is redundant but lets SQLite see the partial index applies.
    oldest: datetime | None = conn.execute(
        select(func.min(_t.c.received_at)).where(_CLAIMABLE, _PENDING_ONLY)
    ).scalar_one()
    if oldest is None:
        return None
    return max(0.0, (now - oldest).total_seconds())


def one_line(error: str) -> str:
    """An error message as stored: whitespace runs (newlines too) made one space, NUL
    removed (PostgreSQL text cannot hold it), cut to ERROR_MAX characters."""
    flat = " ".join(error.replace("\x00", "").split())
    return flat if len(flat) <= ERROR_MAX else flat[: ERROR_MAX - 1] + "…"


# -- statements and helpers --------------------------------------------------------------

_record_failure = (
    update(_t)
    .where(_t.c.id == bindparam("row_id"))
    .values(
        status=bindparam("new_status"),
        next_attempt_at=bindparam("due_at"),
        last_error=bindparam("error"),
        claimed_by=None,
        claimed_until=None,
    )
)


def _ids_in(dialect: str) -> ColumnElement[bool]:
    """``among`` with a named parameter (``ids``), for statements built once."""
    if dialect == "postgresql":
        return _t.c.id == any_(bindparam("ids", type_=postgresql.ARRAY(_t.c.id.type)))
    return _t.c.id.in_(bindparam("ids", expanding=True))


@cache
def _held_statement(dialect: str) -> Any:
    return (
        select(_t.c.id)
        .where(_ids_in(dialect), _t.c.claimed_by == bindparam("worker"), _CLAIMABLE)
        .order_by(_t.c.id)  # one lock order for every worker: no deadlock between them
        .with_for_update()
    )


@cache
def _complete_statement(dialect: str) -> Any:
    return (
        update(_t)
        .where(_ids_in(dialect), _t.c.claimed_by == bindparam("worker"), _CLAIMABLE)
        .values(
            status="done",
            processed_at=bindparam("now", type_=_t.c.processed_at.type),
            next_attempt_at=None,
            claimed_by=None,
            claimed_until=None,
        )
    )


def _insert_new(dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(_t).on_conflict_do_nothing(index_elements=[_t.c.provider, _t.c.event_id])


def _new_row(provider: str, item: Delivery, now: datetime) -> dict[str, Any]:
    return {
        "provider": provider,
        "event_id": item.event_id,
        "event_type": item.event_type,
        "payload": item.payload,
        "status": item.status,
        "received_at": now,
        "processed_at": now if item.status == "ignored" else None,
    }


def _unleased(now: datetime | ColumnElement[Any]) -> ColumnElement[bool]:
    return or_(_t.c.claimed_until.is_(None), _t.c.claimed_until < now)


def _inbox_row(row: Row[Any]) -> InboxRow:
    m = row._mapping
    return InboxRow(
        id=m["id"],
        provider=m["provider"],
        event_id=m["event_id"],
        event_type=m["event_type"],
        payload=m["payload"],
        status=m["status"],
        attempts=m["attempts"],
        received_at=m["received_at"],
        next_attempt_at=m["next_attempt_at"],
        last_error=m["last_error"],
        processed_at=m["processed_at"],
        claimed_by=m["claimed_by"],
        claimed_until=m["claimed_until"],
    )


def _check_width(field: str, value: str) -> None:
    if not value or len(value) > _WIDTHS[field]:
        raise ValueError(f"inbox: {field} must be 1 to {_WIDTHS[field]} characters")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"inbox: {name} must be at least 1")


def _check_batch(name: str, value: int) -> None:
    # Ids go back as one parameter each on SQLite (at most 32,766 per statement).
    if not 1 <= value <= MAX_BATCH:
        raise ValueError(f"inbox: {name} must be 1 to {MAX_BATCH}")
