"""Group commit for webhook deliveries: the requests waiting at the same moment share one
transaction, one connection and one commit.

Each delivery must be durable before its 2xx, and on PostgreSQL that is a WAL flush per
commit (about 4 ms on this machine) plus a pooled connection per request; under concurrent
load these dominated a delivery's cost (bench/RESULTS.md, ingest). A single writer thread
takes every request waiting in the queue, stores each one's events in one transaction, and
commits once; each request's answer is released only after that commit. A lone request
waits for nothing: the writer takes it at once. A request whose values the inbox refuses
(``ValueError``, checked before any SQL) fails alone; a database error fails the whole
group, and every request in it answers 503 (the senders retry).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import Engine

from db import inbox
from db.transaction import transaction
from sync_worker.errors import StoreError

log = structlog.get_logger(__name__)

#: Requests stored in one transaction at most (an Auth0 body may hold 1,000 events each).
MAX_GROUP = 64
#: The writer thread ends after this long without work, and starts again on demand.
IDLE_SECONDS = 5.0
_TICK = timedelta(microseconds=1)  # the resolution of received_at on both dialects


@dataclass(frozen=True, slots=True)
class _Waiting:
    provider: str
    deliveries: Sequence[inbox.Delivery]
    loop: asyncio.AbstractEventLoop
    answer: asyncio.Future[inbox.StoreResult]


class GroupStore:
    def __init__(self, db: Engine, clock: Callable[[], datetime]) -> None:
        self.db, self.clock = db, clock
        self._queue: queue.SimpleQueue[_Waiting] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._last = datetime.min.replace(tzinfo=UTC)  # the last receipt time handed out

    def _receipt_time(self) -> datetime:
        """Each request its own receipt time, strictly later than the one before: versionless
        payloads are ordered by it, and two equal times (a coarse or stepped-back clock)
        would leave two deliveries without an order."""
        now = max(self.clock(), self._last + _TICK)
        self._last = now
        return now

    async def store(self, provider: str, deliveries: Sequence[inbox.Delivery]) -> inbox.StoreResult:
        """Store ``deliveries`` durably; returns once their transaction has committed."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[inbox.StoreResult] = loop.create_future()
        self._queue.put(_Waiting(provider, deliveries, loop, answer))
        self._ensure_writer()
        return await answer

    def _ensure_writer(self) -> None:
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=self._write, name="inbox-writer", daemon=True
                )
                self._writer.start()

    def _write(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # else a request came in just now: go on
                        self._writer = None
                        return
                continue
            self._commit([first, *self._more()])

    def _more(self) -> list[_Waiting]:
        group: list[_Waiting] = []
        while len(group) < MAX_GROUP - 1:
            try:
                group.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return group

    def _commit(self, group: list[_Waiting]) -> None:
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
                with transaction(self.db) as conn:
                    stored = inbox.store_arrivals(conn, [a for _, a in arrivals])
                outcomes.update((i, r) for (i, _), r in zip(arrivals, stored, strict=True))
        except StoreError as exc:
            log.warning("inbox_store_failed", requests=len(group), error=str(exc))
            outcomes.update((i, exc) for i, _ in arrivals)
        except Exception as exc:  # a bug must not leave requests waiting for ever: 503
            log.exception("inbox_store_crashed", requests=len(group))
            failed = StoreError(f"storing failed: {type(exc).__name__}")
            outcomes.update((i, failed) for i, _ in arrivals)
        # One wake-up of each event loop for the whole group, not one per request.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Answer, _Outcome]]] = {}
        for index, waiting in enumerate(group):
            by_loop.setdefault(waiting.loop, []).append((waiting.answer, outcomes[index]))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, settled)


_Answer = asyncio.Future[inbox.StoreResult]
_Outcome = inbox.StoreResult | BaseException


def _settle_all(settled: list[tuple[_Answer, _Outcome]]) -> None:
    for answer, outcome in settled:
        if answer.done():  # the client went away and the request was cancelled
            continue
        if isinstance(outcome, BaseException):
            answer.set_exception(outcome)
        else:
            answer.set_result(outcome)
