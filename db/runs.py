"""The run ledger: one ``sync_runs`` row per pull, reconcile or job run."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Connection, Engine, insert, update

from db.errors import translated
from db.tables import sync_runs
from sync_worker.changes import utcnow

#: The kinds of run a pass of a provider records (``sync_worker.pull.PullRunner``).
PASS_KINDS = ("full", "incremental")
#: The error of a run whose process died before it recorded an outcome.
ABANDONED = "abandoned: its process stopped before recording an outcome"


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DRY_RUN = "dry_run"


@translated
def start_run(db: Engine, kind: str, provider: str | None) -> uuid.UUID:
    run_id = uuid.uuid4()
    with db.begin() as conn:
        conn.execute(
            insert(sync_runs).values(
                id=run_id,
                kind=kind,
                provider=provider,
                started_at=utcnow(),
                status=str(RunStatus.RUNNING),
                counts={},
            )
        )
    return run_id


@translated
def finish_run(
    db: Engine,
    run_id: uuid.UUID,
    status: RunStatus,
    counts: Mapping[str, int],
    error: str | None = None,
) -> None:
    with db.begin() as conn:
        conn.execute(
            update(sync_runs)
            .where(sync_runs.c.id == run_id)
            .values(finished_at=utcnow(), status=str(status), counts=dict(counts), error=error)
        )


@translated
def abandon_runs(
    conn: Connection,
    kinds: tuple[str, ...],
    provider: str | None,
    *,
    before: datetime,
    now: datetime,
) -> int:
    """Mark failed the ``running`` runs of ``kinds`` for ``provider`` started before
    ``before``; returns how many.

    Only for a caller holding, across processes, the lock every run of those kinds holds
    (``db.ledger.job_lock`` on PostgreSQL): no such run can then be alive, so the row is the
    record of a process that died (SIGKILL, a crash) and would read "running" for ever.
    """
    match = sync_runs.c.provider.is_(None) if provider is None else sync_runs.c.provider == provider
    stmt = (
        update(sync_runs)
        .where(
            sync_runs.c.kind.in_(kinds),
            match,
            sync_runs.c.started_at < before,
            sync_runs.c.status == str(RunStatus.RUNNING),
        )
        .values(finished_at=now, status=str(RunStatus.FAILED), error=ABANDONED)
    )
    return int(conn.execute(stmt).rowcount)
