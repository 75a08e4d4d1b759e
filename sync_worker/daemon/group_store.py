"""Group commit for webhook deliveries: the requests waiting at the same moment share one
statement and one commit.

Each delivery must be durable before its 2xx, and on PostgreSQL that is a WAL flush per
commit (about 4 ms on this machine) plus a round trip per request; under concurrent load
these dominated a delivery's cost (bench/RESULTS.md, ingest). One flusher task on the event
loop takes every request waiting, stores their events with one statement, and settles each
request's answer only after that commit. A lone request waits for nothing: the flusher
takes it at once. A request whose values the inbox refuses (``ValueError``, checked before
any SQL) fails alone; a database error fails the whole group, and every request in it
answers 503 (the senders retry). After a group that stored new rows, ``on_commit`` runs
once (the drainer's wake-up: one per group, not one per request).

Where the statement runs: on PostgreSQL on the event loop itself, through psycopg's
asynchronous connection (``db/inbox_writer.py``): a writer thread cost the receiver GIL
handoffs and a cross-thread wake-up of the loop for every group, and SQLAlchemy's per-row
work. On SQLite (a synchronous driver, one writer at a time, the embedded default) the
group's transaction runs in a worker thread that the flusher awaits.

The flusher, its connection and its queue belong to one event loop (the server's); a store
used from another loop (a test client's, one per request) starts afresh there. The flusher
lives as long as its loop: when the loop ends it is cancelled and closes its connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import Engine

from db import inbox
from db.inbox_writer import InboxWriter
from db.transaction import transaction
from sync_worker.errors import StoreError

log = structlog.get_logger(__name__)

#: Requests stored in one statement at most (an Auth0 body may hold 1,000 events each).
MAX_GROUP = 64
_TICK = timedelta(microseconds=1)  # the resolution of received_at on both dialects

_Outcome = inbox.StoreResult | BaseException


@dataclass(frozen=True, slots=True)
class _Waiting:
    provider: str
    deliveries: Sequence[inbox.Delivery]
    answer: asyncio.Future[inbox.StoreResult]


class GroupStore:
    def __init__(
        self,
        db: Engine,
        clock: Callable[[], datetime],
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.db, self.clock, self.on_commit = db, clock, on_commit
        self._last = datetime.min.replace(tzinfo=UTC)  # the last receipt time handed out
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[_Waiting] = []
        self._ready = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def store(self, provider: str, deliveries: Sequence[inbox.Delivery]) -> inbox.StoreResult:
        """Store ``deliveries`` durably; returns once their statement has committed."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # what another loop held went with it
            self._loop, self._waiting, self._ready = loop, [], asyncio.Event()
            self._flusher = None
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="inbox-group-store")
        answer: asyncio.Future[inbox.StoreResult] = loop.create_future()
        self._waiting.append(_Waiting(provider, deliveries, answer))
        self._ready.set()
        return await answer

    def _receipt_time(self) -> datetime:
        """Each request its own receipt time, strictly later than the one before: versionless
        payloads are ordered by it, and two equal times (a coarse or stepped-back clock)
        would leave two deliveries without an order."""
        now = max(self.clock(), self._last + _TICK)
        self._last = now
        return now

    async def _flush(self) -> None:
        writer = InboxWriter(self.db) if self.db.dialect.name == "postgresql" else None
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._waiting:
                    group = self._waiting[:MAX_GROUP]
                    del self._waiting[:MAX_GROUP]
                    await self._commit(group, writer)
        finally:
            if writer is not None:
                await writer.close()

    async def _commit(self, group: list[_Waiting], writer: InboxWriter | None) -> None:
        outcomes: dict[int, _Outcome] = {}
        arrivals: list[tuple[int, inbox.Arrival]] = []
        for index, waiting in enumerate(group):
            try:
                inbox.check(waiting.provider, waiting.deliveries)
            except ValueError as exc:  # refused before any SQL: this request alone
                outcomes[index] = exc
                continue
            arrivals.append((index, inbox.Arrival(waiting.provider, waiting.deliveries,
                                                  self._receipt_time())))  # fmt: skip
        try:
            if arrivals:
                stored = await self._write([a for _, a in arrivals], writer)
                outcomes.update((i, r) for (i, _), r in zip(arrivals, stored, strict=True))
                if any(r.inserted for r in stored):
                    self.on_commit()
        except StoreError as exc:
            log.warning("inbox_store_failed", requests=len(group), error=str(exc))
            outcomes.update((i, exc) for i, _ in arrivals)
        except Exception as exc:  # a bug must not leave requests waiting for ever: 503
            log.exception("inbox_store_crashed", requests=len(group))
            failed = StoreError(f"storing failed: {type(exc).__name__}")
            outcomes.update((i, failed) for i, _ in arrivals)
        for index, waiting in enumerate(group):
            if waiting.answer.done():  # the client went away and the request was cancelled
                continue
            outcome = outcomes[index]
            if isinstance(outcome, BaseException):
                waiting.answer.set_exception(outcome)
            else:
                waiting.answer.set_result(outcome)

    async def _write(
        self, arrivals: list[inbox.Arrival], writer: InboxWriter | None
    ) -> list[inbox.StoreResult]:
        if writer is not None:
            return await writer.store(arrivals)
        return await asyncio.to_thread(self._write_in_thread, arrivals)

    def _write_in_thread(self, arrivals: list[inbox.Arrival]) -> list[inbox.StoreResult]:
        with transaction(self.db) as conn:
            return inbox.store_arrivals(conn, arrivals)
