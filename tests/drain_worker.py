"""Drainers for tests/test_drainer_concurrency.py, including one in a process of its own.

Kept apart from the test module so that a spawned process imports only what draining needs
(not svix, FastAPI or pytest): that is seconds per process on a busy machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine

from db.connect import make_engine
from providers import registry
from providers.webhook import WorkDecoder
from sync_worker.changes import UserChange
from sync_worker.config import settings_from_mapping
from sync_worker.daemon.drainer import Drainer, DrainSettings
from sync_worker.engine import BatchResult, PlanSettings, SyncEngine

SCHEMA = "identity"  # as tests/conftest.py migrates


class RecordingEngine(SyncEngine):
    """The real engine, noting the event ids of every change it is asked to apply."""

    def __init__(self) -> None:
        super().__init__(PlanSettings())
        self.applied: list[str] = []

    def apply(self, conn: Connection, changes: Sequence[UserChange], **kw: Any) -> BatchResult:
        result = super().apply(conn, changes, **kw)
        self.applied.extend(c.event_id for c in changes if c.event_id)
        return result


def decoders() -> dict[str, WorkDecoder]:
    """Every provider's decoder (decoding needs no secret)."""
    return registry.decoders(settings_from_mapping({"database": {"url": "sqlite://"}}))


def make_drainer(
    db: Engine,
    *,
    batch: int,
    lease: timedelta = timedelta(minutes=5),
    clock: Callable[[], datetime] | None = None,
    decoders_: Mapping[str, WorkDecoder] | None = None,
) -> tuple[Drainer, RecordingEngine]:
    """A drainer without IdP lookups, as the daemon has without pull credentials."""
    engine = RecordingEngine()
    settings = DrainSettings(batch_size=batch, lease=lease)
    found = decoders() if decoders_ is None else decoders_
    if clock is None:
        return Drainer(db, engine, found, {}, settings), engine
    return Drainer(db, engine, found, {}, settings, clock=clock), engine


def drain_all(drainer: Drainer) -> int:
    """``drain_once`` until this drainer finds nothing due; the rows it claimed."""
    total = 0
    while claimed := drainer.drain_once():
        total += claimed
    return total


def run(url: str, batch: int, rounds: int, barrier: Any, results: Any) -> None:
    """One drainer process: its own SQLAlchemy engine and Drainer, drained round after
    round; the parent stores each round's deliveries before the first barrier of the round.
    Reports (worker, rows claimed, event ids applied, error) on ``results``."""
    db = make_engine(url, schema=SCHEMA)
    drainer, engine = make_drainer(db, batch=batch)
    claimed = 0
    try:
        for _ in range(rounds):
            barrier.wait(timeout=120)  # the round is stored: start together
            claimed += drain_all(drainer)
            barrier.wait(timeout=120)  # this drainer found nothing more due
        results.put((drainer.worker, claimed, engine.applied, None))
    except BaseException as exc:
        results.put((drainer.worker, claimed, engine.applied, repr(exc)))
        barrier.abort()  # the others fail at once rather than at the timeout
        raise
    finally:
        db.dispose()
