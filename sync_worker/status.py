"""What is in the worker's database: counts, cursors, inbox and recent runs."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, case, func, select

from db.tables import profiles, sync_cursors, sync_inbox, sync_runs, user_identities, users


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


def render(report: dict[str, Any]) -> str:
    users_ = report["users"]
    lines = [
        f"users      {users_['total']} ({users_['deleted']} deleted)",
        f"profiles   {report['profiles']}",
        "identities " + (_pairs(report["identities"]) or "none"),
        "inbox      " + (_pairs(report["inbox"]) or "empty"),
        "cursors" + ("" if report["cursors"] else "    none"),
    ]
    lines += [
        f"  {c['provider']:<8} {_json(c['cursor'])}  (at {c['updated_at']})"
        for c in report["cursors"]
    ]
    lines.append("last runs" + ("" if report["runs"] else "  none"))
    for run in report["runs"]:
        counts = _pairs(run["counts"] or {})
        lines.append(
            f"  {run['started_at']}  {run['kind']:<12} {run['provider'] or '-':<7} "
            f"{run['status']:<9} {counts}" + (f"  error: {run['error']}" if run["error"] else "")
        )
    # Columns are padded to line up; a line never ends in that padding.
    return "\n".join(line.rstrip() for line in lines)


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


def _json(value: Any) -> str:
    """A stored JSON value as JSON, as the database holds it (not a Python repr)."""
    return json.dumps(value, sort_keys=True, default=str)


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None
