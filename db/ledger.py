"""The scheduler's run ledger (``sync_job_ticks``) and the per-job lock.

Every instance keeps the same schedule in memory and, at each tick, calls ``claim_tick``:
the row's primary key (job, provider, scheduled_at) lets exactly one INSERT win, so each
tick of a job runs once however many instances share the database. The winner runs the job
inside ``job_lock`` and records the outcome with ``finish_tick``.

A tick and the run before it are different rows, so the claim alone would let a run that
outlasts its interval be started again by another instance. ``job_lock`` closes that gap: on
PostgreSQL it is a session advisory lock per (schema, job, provider), held on a connection of
its own in autocommit (no transaction stays open for the run's length); on a SQLite file it is
an exclusive ``flock`` on a file of its own beside the database (``db.filelock``), which, like
the advisory lock, spans processes (the daemon and a CLI backfill) and dies with its holder.

A run killed with its process leaves its tick ``running``; the next run of that job, once
it holds the lock, marks such ticks failed (``abandon_ticks``).

``claim_tick``, ``finish_tick``, ``abandon_ticks``, ``last_ticks``, ``last_scheduled`` and
``purge_ticks`` run in the caller's transaction; ``job_lock`` takes the engine. Driver errors
come out as ``StoreError`` (``db.errors``).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from db.errors import translated, translating
from db.filelock import file_lock, lock_directory
from db.tables import NO_PROVIDER, sync_job_ticks

_t = sync_job_ticks
ERROR_MAX = 1000  # characters of a tick's error kept


class TickStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # claimed, but the run before it still held the job's lock


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    job: str
    provider: str | None
    scheduled_at: datetime
    instance: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    run_id: uuid.UUID | None
    error: str | None


@translated
def claim_tick(
    conn: Connection,
    job: str,
    provider: str | None,
    scheduled_at: datetime,
    *,
    instance: str,
    now: datetime,
) -> bool:
    """Insert the tick's row as ``running``; True if this call inserted it (this instance
    runs the tick), False if any instance already had. Commit before running the job, so
    the others see the claim."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = (
        insert(_t)
        .values(
            job=job,
            provider=_key(provider),
            scheduled_at=scheduled_at,
            instance=instance,
            started_at=now,
            status=str(TickStatus.RUNNING),
        )
        .on_conflict_do_nothing(index_elements=[_t.c.job, _t.c.provider, _t.c.scheduled_at])
        .returning(_t.c.job)
    )
    return conn.execute(stmt).first() is not None


@translated
def finish_tick(
    conn: Connection,
    job: str,
    provider: str | None,
    scheduled_at: datetime,
    *,
    instance: str,
    status: TickStatus,
    now: datetime,
    run_id: uuid.UUID | None = None,
    error: str | None = None,
) -> bool:
    """Record how the tick this instance claimed ended; False if it holds no such tick."""
    stmt = (
        update(_t)
        .where(
            _t.c.job == job,
            _t.c.provider == _key(provider),
            _t.c.scheduled_at == scheduled_at,
            _t.c.instance == instance,
        )
        .values(status=str(status), finished_at=now, run_id=run_id, error=_one_line(error))
    )
    return conn.execute(stmt).rowcount == 1


#: The error of a tick whose run ended with its process, before it recorded an outcome.
ABANDONED = "abandoned: its instance stopped before recording an outcome"


@translated
def abandon_ticks(
    conn: Connection, job: str, provider: str | None, *, before: datetime, now: datetime
) -> int:
    """Mark failed the ``running`` ticks of (job, provider) scheduled before ``before``.

    Only while holding the job's lock (``job_lock``): no run of the job for the provider can
    then be alive anywhere, so such a row is the ledger's record of a run whose process died
    (SIGKILL, a crash, a lost host) and would read "running" in ``status`` for ever.
    """
    stmt = (
        update(_t)
        .where(
            _t.c.job == job,
            _t.c.provider == _key(provider),
            _t.c.scheduled_at < before,
            _t.c.status == str(TickStatus.RUNNING),
        )
        .values(status=str(TickStatus.FAILED), finished_at=now, error=ABANDONED)
    )
    return int(conn.execute(stmt).rowcount)


@translated
def last_ticks(conn: Connection) -> list[Tick]:
    """The latest tick of each (job, provider), by job then provider (for ``status``)."""
    latest = (
        select(_t.c.job, _t.c.provider, func.max(_t.c.scheduled_at).label("scheduled_at"))
        .group_by(_t.c.job, _t.c.provider)
        .subquery()
    )
    rows = conn.execute(
        select(_t)
        .join(
            latest,
            (_t.c.job == latest.c.job)
            & (_t.c.provider == latest.c.provider)
            & (_t.c.scheduled_at == latest.c.scheduled_at),
        )
        .order_by(_t.c.job, _t.c.provider)
    ).mappings()
    return [_tick(row) for row in rows]


@translated
def last_scheduled(conn: Connection, job: str) -> datetime | None:
    """The latest tick of ``job`` any instance claimed, whatever its provider or outcome."""
    value: datetime | None = conn.execute(
        select(func.max(_t.c.scheduled_at)).where(_t.c.job == job)
    ).scalar_one()
    return value


@translated
def purge_ticks(conn: Connection, *, before: datetime) -> int:
    """Delete ticks scheduled before ``before``; returns the count. Called at every run of
    a frequent job, so each call deletes only what aged since the last one."""
    return conn.execute(delete(_t).where(_t.c.scheduled_at < before)).rowcount


def locks_across_processes(db: Engine) -> bool:
    """Whether ``job_lock`` excludes other processes (PostgreSQL; a SQLite file), not just
    this one's threads (an in-memory SQLite database, which only its process can see)."""
    return db.dialect.name == "postgresql" or lock_directory(db.url) is not None


@contextmanager
def job_lock(db: Engine, job: str, provider: str | None) -> Iterator[bool]:
    """Hold the (job, provider) lock for the ``with`` block: yields True if taken, False if
    another run (in any instance) holds it. Never waits. ``job`` names the lock: jobs that
    must not overlap share one."""
    if db.dialect.name == "postgresql":
        with _advisory_lock(db, job, provider) as held:
            yield held
        return
    directory = lock_directory(db.url)
    if directory is None:
        with _local_lock(db, job, provider) as held:
            yield held
    else:
        with file_lock(directory, f"{job}.{_key(provider)}") as held:
            yield held


@contextmanager
def _advisory_lock(db: Engine, job: str, provider: str | None) -> Iterator[bool]:
    with translating():
        # Autocommit: the lock belongs to the session, and no transaction (nor its snapshot,
        # which would hold back vacuum) stays open while the job runs.
        conn = db.connect().execution_options(isolation_level="AUTOCOMMIT")
    held, key = False, 0
    try:
        with translating():
            schema = str(conn.execute(select(func.current_schema())).scalar_one())
            key = lock_key(schema, job, provider)
            held = bool(conn.execute(select(func.pg_try_advisory_lock(key))).scalar_one())
        yield held
    finally:
        if held:
            _unlock(conn, key)
        conn.close()


def _unlock(conn: Connection, key: int) -> None:
    try:
        conn.execute(select(func.pg_advisory_unlock(key)))
    except Exception:
        # The session is in an unknown state: closing it for good releases its locks.
        conn.invalidate()


def lock_key(schema: str, job: str, provider: str | None) -> int:
    """A stable signed 64-bit advisory lock key; the schema keeps two deployments sharing
    one database (in different schemas) from blocking each other."""
    text = f"sync-worker\0{schema}\0{job}\0{_key(provider)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big", signed=True)


_local_locks: dict[tuple[str, str, str], threading.Lock] = {}
_local_locks_guard = threading.Lock()


@contextmanager
def _local_lock(db: Engine, job: str, provider: str | None) -> Iterator[bool]:
    name = (str(db.url), job, _key(provider))
    with _local_locks_guard:
        lock = _local_locks.setdefault(name, threading.Lock())
    held = lock.acquire(blocking=False)
    try:
        yield held
    finally:
        if held:
            lock.release()


def _key(provider: str | None) -> str:
    return NO_PROVIDER if provider is None else provider


def _one_line(error: str | None) -> str | None:
    if error is None:
        return None
    flat = " ".join(error.replace("\x00", "").split())
    return flat if len(flat) <= ERROR_MAX else flat[: ERROR_MAX - 1] + "…"


def _tick(row: Any) -> Tick:
    return Tick(
        job=row["job"],
        provider=row["provider"] or None,
        scheduled_at=row["scheduled_at"],
        instance=row["instance"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        status=row["status"],
        run_id=row["run_id"],
        error=row["error"],
    )
