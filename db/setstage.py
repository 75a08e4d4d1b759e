"""Staging a set pass on a second connection, while the pass's connection writes.

``db.setbased.stage`` copies the source and derives the per-user table on the pass's own
connection, before its first batch: a PostgreSQL backend is one core, and the other one
idles. Here a second connection (in a thread) stages into unlogged tables of a schema of
the pass's own (``sw_pass_<hex>``), which both connections put first on their
``search_path``, so the batch statements read the same names as the temporary tables.
The source comes in parts of users in position order (``SourcePart``: a small first
one, then ``PART`` each); for each part, the stager copies its rows, derives its accounts,
sessions and escapes, then its per-user rows ``sw_u`` in ranges of positions, each range
committed and announced. The writer takes a batch as soon as its range is there
(``wait_for``): the first batch waits for the first part only, not for the whole source.

The schema is the pass's alone: its writer connection holds a session advisory lock
named after it for the pass's life. It is dropped when the pass ends, however it ends;
a pass killed before that leaves it behind, and the next pass, whatever its path, drops
every such schema whose lock is free (its owner's session is gone). Where the worker's
role may not create a schema, ``open_private`` says so (None) and the pass stages on its
one connection.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import psycopg
import structlog
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from db import setbased as store
from db.errors import translated, translating
from db.snapshot import refresh_statistics
from sync_worker.errors import StoreError

__all__ = [
    "SourcePart",
    "Staged",
    "Stager",
    "open_private",
    "staged",
    "sweep",
    "sweep_orphans",
]

log = structlog.get_logger(__name__)

_PREFIX = "sw_pass_"
#: The first key of the schemas' advisory locks (the two-integer form: apart from the
#: engine's one-bigint writer lock).
_LOCK_SPACE = 0x53575053
#: Positions per range of ``sw_u`` (within a part): the writer waits for the first one.
RANGE = 10_000
#: Users in the source's first part, and at most in each after it (they double up to it).
#: The first batch waits for the first part's copy and derivations (a tenth of a second),
#: not for the whole source's; the later parts are staged while the writer writes, and
#: stay ahead of it.
FIRST_PART = 2_000
PART = 10_000


@dataclass(frozen=True, slots=True)
class SourcePart:
    """The source's users at positions ``first..last``: their relations' COPY streams."""

    first: int
    last: int
    streams: store.Streams


def sweep(conn: Connection) -> None:
    """Drop the schemas of passes that ended without dropping theirs (killed)."""
    names = conn.execute(
        text(r"SELECT nspname FROM pg_namespace WHERE nspname LIKE 'sw\_pass\_%'")
    ).scalars()
    for name in list(names):
        taken = conn.execute(
            text("SELECT pg_try_advisory_lock(:space, hashtext(:name))"),
            {"space": _LOCK_SPACE, "name": name},
        ).scalar_one()
        if not taken:
            continue  # a live pass's
        try:
            with conn.begin_nested():  # one we may not drop (another role's) stays
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
            log.info("set_pass_schema_swept", schema=name)
        except DBAPIError as exc:
            log.warning("set_pass_schema_not_swept", schema=name, error=str(exc.orig))
        finally:
            _lock(conn, name, "pg_advisory_unlock")


@translated
def sweep_orphans(db: Engine) -> None:
    """``sweep`` on a connection of its own."""
    with db.connect() as conn, conn.begin():
        sweep(conn)


def open_private(conn: Connection) -> tuple[str, str] | None:
    """Lock and create a schema of this pass and put it first on the connection's
    ``search_path`` (the lock and the setting are the session's). Its name and the
    previous ``search_path``; None if the role may not create a schema."""
    name = f"{_PREFIX}{uuid.uuid4().hex[:16]}"
    with conn.begin():
        previous = str(conn.execute(text("SELECT current_setting('search_path')")).scalar_one())
        _lock(conn, name, "pg_advisory_lock")
    try:
        with conn.begin():
            sweep(conn)
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
    except Exception as exc:
        with conn.begin():
            _lock(conn, name, "pg_advisory_unlock")
        if _refused(exc):
            log.info("set_pass_schema_refused", error=str(exc).splitlines()[0])
            return None
        raise
    with conn.begin():
        _search_path(conn, f'"{name}", {previous}')
    return name, previous


def close_private(conn: Connection, name: str, previous: str) -> None:
    """Drop the pass's schema, restore the ``search_path``, release the lock."""
    try:
        with conn.begin():
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    finally:
        with conn.begin():
            _search_path(conn, previous)
            _lock(conn, name, "pg_advisory_unlock")


def _search_path(conn: Connection, path: str) -> None:
    """For the session, not the transaction."""
    conn.execute(text("SELECT set_config('search_path', :path, false)"), {"path": path})


def _lock(conn: Connection, name: str, function: str) -> None:
    conn.execute(
        text(f"SELECT {function}(:space, hashtext(:name))"),
        {"space": _LOCK_SPACE, "name": name},
    )


def _refused(exc: BaseException) -> bool:
    cause = getattr(exc, "orig", exc)
    return isinstance(cause, psycopg.errors.InsufficientPrivilege)


class Stager:
    """The staging thread: a connection of its own fills the pass's schema; the writer
    asks for the number of users (``total``) and waits for ranges (``wait_for``)."""

    def __init__(
        self,
        db: Engine,
        parts: Sequence[SourcePart],
        *,
        schema: str,
        search_path: str,
        provider: str,
        role: str,
        observed: datetime,
        max_age_seconds: float,
        copied: Callable[[], None],
    ) -> None:
        self._db = db
        self._parts = parts
        self._schema = schema
        self._search_path = search_path
        self._provider = provider
        self._role = role
        self._observed = observed
        self._max_age = max_age_seconds
        self._copied = copied
        self._state = threading.Condition()
        self._total: int | None = None
        self._staged = -1  # sw_u holds every position up to this one (-1: no sw_u yet)
        self._error: BaseException | None = None
        self._stop = False
        self._range = RANGE
        self._derived_stats = 0  # the derived tables' statistics are of this many users
        self._thread = threading.Thread(target=self._run, name="set-pass-stager", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def total(self) -> int:
        """The number of users, once the source is copied."""
        with self._state:
            self._state.wait_for(lambda: self._total is not None or self._error is not None)
            self._raise()
            assert self._total is not None
            return self._total

    def wait_for(self, position: int) -> int:
        """Wait until ``sw_u`` holds every position up to ``position`` (or the last);
        returns the last position it holds."""
        with self._state:
            self._state.wait_for(
                lambda: (
                    self._error is not None
                    or (self._total is not None and self._staged >= min(position, self._total))
                )
            )
            self._raise()
            return self._staged

    def staged(self) -> int:
        with self._state:
            self._raise()
            return self._staged

    def close(self) -> None:
        """Stop after the current statement's range and wait for the thread."""
        with self._state:
            self._stop = True
        if self._thread.is_alive():
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _publish(self, **values: int) -> bool:
        with self._state:
            for key, value in values.items():
                setattr(self, f"_{key}", value)
            self._state.notify_all()
            return not self._stop

    def _run(self) -> None:
        try:
            with translating(), self._db.connect() as conn:
                try:
                    with conn.begin():
                        _search_path(conn, f'"{self._schema}", {self._search_path}')
                        # Unlogged tables, dropped with the pass: nothing to wait for.
                        conn.execute(text("SET synchronous_commit = off"))
                        # Every derivation joins a range of users to its rows: hash joins.
                        # On statistics of earlier parts the planner estimated a range at
                        # one user and chose a nested loop over the growing tables (one
                        # range ran 15x slower); refreshing them for every part instead
                        # cost a second of this connection's core per 100,000 users.
                        conn.execute(text("SET enable_nestloop = off"))
                        conn.execute(text("SET jit = off"))  # see setbased.batch_settings
                    self._stage(conn)
                finally:
                    if conn.in_transaction():
                        conn.rollback()
                    try:
                        with conn.begin():
                            conn.execute(text("RESET synchronous_commit"))
                            conn.execute(text("RESET enable_nestloop"))
                            conn.execute(text("RESET jit"))
                            _search_path(conn, self._search_path)
                    except Exception:
                        conn.invalidate()
        except BaseException as exc:
            with self._state:
                self._error = exc
                self._state.notify_all()

    def _stage(self, conn: Connection) -> None:
        total = self._parts[-1].last
        if not self._publish(total=total):
            return
        kinds: dict[str, dict[str, str]] = {}
        try:
            for index, part in enumerate(self._parts):
                first = index == 0
                with conn.begin():
                    if first:
                        kinds = store.create_sources(conn, part.streams, temp=False)
                        store.known_digests(conn, self._provider, temp=False)
                    store.copy_sources(conn, part.streams)
                    if first:
                        store.analyze_sources(conn)
                    store.derive_sources(
                        conn, kinds, lo=part.first, hi=part.last, observed=self._observed,
                        max_age_seconds=self._max_age, create=first, temp=False,
                    )  # fmt: skip
                if index == len(self._parts) - 1:
                    self._copied()  # everything is copied: the source snapshot can end
                if not self._derive(conn, kinds["users"], part):
                    return
        finally:
            self._copied()
        if total > self._derived_stats:
            with conn.begin():  # the statistics of the whole table, for the later batches
                store.analyze_derived(conn)
        # The worker's tables have grown by what the writer wrote so far: their statistics
        # are refreshed here, on the core the writer does not use, and not after the last
        # batch, where refreshing them cost the pass 0.6-0.9 s at 100,000 users (the pass's
        # own refresh then finds them fresh: they have not doubled since).
        with conn.begin():
            refresh_statistics(conn)

    def _derive(self, conn: Connection, users: dict[str, str], part: SourcePart) -> bool:
        """``sw_u`` for the part, range by range, each announced; False: stop."""
        starts = range(part.first, part.last + 1, self._range) or range(part.first, part.first + 1)
        for lo in starts:
            hi = min(part.last, lo + self._range - 1)
            with conn.begin():
                store.derive_users(
                    conn, users, role=self._role, lo=lo, hi=hi,
                    create=lo == 1, temp=False,
                )  # fmt: skip
                # The batches' statements plan by these (as the derivations by the
                # sources'): refreshed whenever the tables have doubled.
                if lo == 1 or hi >= 2 * self._derived_stats:
                    store.analyze_derived(conn)
                    self._derived_stats = hi
            if not self._publish(staged=hi):
                return False
        return True


class Staged:
    """The staged source as the writer sees it: the number of users, and the position of
    the n-th changed user from a position on (waiting for the ranges it needs)."""

    def __init__(self, conn: Connection, total: int, stager: Stager | None) -> None:
        self.conn = conn
        self.total = total
        self._stager = stager

    def nth_changed(self, start: int, n: int, end: int) -> int | None:
        """As ``db.setbased.nth_changed``, for a page that ends at ``end`` at the latest,
        between the batches' transactions. Only staged positions are read: an n-th found
        among them is the n-th of the whole table."""
        while True:
            staged = self.total if self._stager is None else self._stager.wait_for(start)
            with self.conn.begin():
                found = store.nth_changed(self.conn, start, n)
            if found is not None or staged >= end:
                return found
            assert self._stager is not None
            self._stager.wait_for(staged + 1)


@contextmanager
def staged(
    db: Engine,
    conn: Connection,
    parts: Sequence[SourcePart],
    *,
    provider: str,
    role: str,
    observed: datetime,
    max_age_seconds: float,
    copied: Callable[[], None],
) -> Iterator[Staged]:
    """The source staged for the pass's connection ``conn`` (outside any transaction):
    on a second connection into the pass's schema where the role may create one, else on
    ``conn`` into temporary tables. Everything staged is dropped on the way out.
    ``copied`` ends the source's snapshot once it is copied; it is called again on the way
    out (it must allow that), in case staging never got that far."""
    private = open_private(conn)
    stager: Stager | None = None
    try:
        if private is None:
            try:
                with conn.begin():
                    total = store.stage(
                        conn,
                        [stream for part in parts for stream in part.streams],
                        provider=provider,
                        role=role,
                        observed=observed,
                        max_age_seconds=max_age_seconds,
                    )
            finally:
                copied()
        else:
            stager = Stager(
                db,
                parts,
                schema=private[0],
                search_path=private[1],
                provider=provider,
                role=role,
                observed=observed,
                max_age_seconds=max_age_seconds,
                copied=copied,
            )
            stager.start()
            with conn.begin():
                store.drop(conn)
                store.batch_tables(conn)
            total = stager.total()
            stager.wait_for(1)  # sw_u is there (a pass of no user has no page to wait)
        yield Staged(conn, total, stager)
    finally:
        if stager is not None:
            stager.close()
        copied()  # if the stager never got to it (the source's close is idempotent)
        if conn.in_transaction():
            conn.rollback()
        try:
            with translating():
                with conn.begin():
                    store.drop(conn)
                if private is not None:
                    close_private(conn, *private)
        except StoreError as exc:  # never hide why the pass stopped; a later pass
            # drops them first anyway (the connection may go back to the pool)
            log.warning("set_pass_cleanup_failed", error=str(exc))
