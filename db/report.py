"""The status report's figures: counts, cursors, inbox, recent runs and the latest tick of
each scheduled job (read only)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, case, func, select

from db import ledger
from db.errors import translated
from db.tables import profiles, sync_cursors, sync_inbox, sync_runs, user_identities, users


@translated
def collect(db: Engine, *, runs: int = 10) -> dict[str, Any]:
    with db.connect() as conn:
        user_counts = conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((users.c.deleted_at.is_not(None), 1), else_=0)), 0),
            )
        ).one()
        identities = conn.execute(
            select(user_identities.c.provider, func.count())
            .where(user_identities.c.deleted_at.is_(None))
            .group_by(user_identities.c.provider)
            .order_by(user_identities.c.provider)
        ).all()
        inbox = conn.execute(
            select(sync_inbox.c.status, func.count()).group_by(sync_inbox.c.status)
        ).all()
        cursors = conn.execute(select(sync_cursors).order_by(sync_cursors.c.provider)).mappings()
        recent = conn.execute(
            select(sync_runs).order_by(sync_runs.c.started_at.desc()).limit(runs)
        ).mappings()
        return {
            "users": {"total": user_counts[0], "deleted": int(user_counts[1])},
            "profiles": conn.execute(select(func.count()).select_from(profiles)).scalar_one(),
            "identities": {str(p): int(n) for p, n in identities},
            "inbox": {str(s): int(n) for s, n in inbox},
            "cursors": [
                {
                    "provider": c["provider"],
                    "cursor": c["cursor"],
                    "updated_at": _iso(c["updated_at"]),
                }
                for c in cursors
            ],
            "runs": [_run(r) for r in recent],
            "ticks": _ticks(conn),
        }


def _ticks(conn: Connection) -> list[dict[str, Any]]:
    """The latest tick of each scheduled job and provider, with its run's counts."""
    ticks = ledger.last_ticks(conn)
    run_ids = [t.run_id for t in ticks if t.run_id is not None]
    counts: dict[Any, Any] = {}
    if run_ids:
        query = select(sync_runs.c.id, sync_runs.c.counts).where(sync_runs.c.id.in_(run_ids))
        counts = dict(conn.execute(query).all())
    return [
        {
            "job": t.job,
            "provider": t.provider,
            "scheduled_at": _iso(t.scheduled_at),
            "started_at": _iso(t.started_at),
            "finished_at": _iso(t.finished_at),
            "status": t.status,
            "instance": t.instance,
            "run_id": str(t.run_id) if t.run_id is not None else None,
            "counts": counts.get(t.run_id),
            "error": t.error,
        }
        for t in ticks
    ]


def _run(row: Any) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "kind": row["kind"],
        "provider": row["provider"],
        "status": row["status"],
        "started_at": _iso(row["started_at"]),
        "finished_at": _iso(row["finished_at"]),
        "counts": row["counts"],
        "error": row["error"],
    }


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None
