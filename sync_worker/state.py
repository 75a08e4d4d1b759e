"""Bookkeeping rows: pull cursors and sync runs."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, Select, delete, func, insert, select, true, update

from db.tables import sync_cursors, sync_runs, sync_seen
from db.upsert import upsert_rows
from sync_worker.changes import utcnow


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DRY_RUN = "dry_run"


def save_cursor(conn: Connection, provider: str, cursor: Mapping[str, Any], now: datetime) -> None:
    upsert_rows(
        conn,
        sync_cursors,
        [{"provider": provider, "cursor": dict(cursor), "updated_at": now}],
        conflict=["provider"],
        update=["cursor", "updated_at"],
    )


def load_cursor(db: Engine | Connection, provider: str) -> dict[str, Any] | None:
    stmt = select(sync_cursors.c.cursor).where(sync_cursors.c.provider == provider)
    if isinstance(db, Connection):
        value = db.execute(stmt).scalar()
    else:
        with db.connect() as conn:
            value = conn.execute(stmt).scalar()
    return dict(value) if value is not None else None


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


def mark_seen(conn: Connection, run_id: uuid.UUID, external_ids: Sequence[str]) -> None:
    """Record ids a full pass observed upstream: one row for the page (duplicates are harmless)."""
    ids = list(dict.fromkeys(external_ids))
    conn.execute(insert(sync_seen).values(run_id=run_id, external_ids=ids))


def seen_ids(dialect: str, run_id: uuid.UUID) -> Select[Any]:
    """Every id the run recorded, unnested from its pages' arrays in the database."""
    unnest = func.jsonb_array_elements_text if dialect == "postgresql" else func.json_each
    ids = unnest(sync_seen.c.external_ids).table_valued("value")
    return (
        select(ids.c.value)
        .select_from(sync_seen.join(ids, true()))
        .where(sync_seen.c.run_id == run_id)
    )


def forget_seen(db: Engine, run_id: uuid.UUID) -> None:
    with db.begin() as conn:
        conn.execute(delete(sync_seen).where(sync_seen.c.run_id == run_id))
