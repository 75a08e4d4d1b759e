"""The run ledger: one ``sync_runs`` row per pull, reconcile or job run."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from enum import StrEnum

from sqlalchemy import Engine, insert, update

from db.errors import translated
from db.tables import sync_runs
from sync_worker.changes import utcnow


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
