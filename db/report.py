"""The status report's figures: counts, cursors, inbox and recent runs (read only)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, case, func, select

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
        }


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
