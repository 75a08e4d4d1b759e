"""Rendering the status report (``db.report.collect`` reads it) for the ``status`` command."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sync_worker.jobs.registry import Planned


def with_jobs(
    report: Mapping[str, Any], planned: Sequence[Planned], now: datetime
) -> dict[str, Any]:
    """The report with ``jobs`` (each job's schedule, next run and latest ticks) in place of
    the ledger's raw ``ticks``."""
    ticks = report.get("ticks", [])
    jobs = [
        {
            "job": item.job.name,
            "schedule": item.schedule.describe(),
            "enabled": item.enabled,
            "next_run": item.schedule.next_tick(now).isoformat(timespec="seconds")
            if item.enabled
            else None,
            "last": [t for t in ticks if t["job"] == item.job.name],
        }
        for item in planned
    ]
    return {**{k: v for k, v in report.items() if k != "ticks"}, "jobs": jobs}


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
    if "jobs" in report:
        lines += _jobs(report["jobs"])
    lines.append("last runs" + ("" if report["runs"] else "  none"))
    for run in report["runs"]:
        counts = _pairs(run["counts"] or {})
        lines.append(
            f"  {run['started_at']}  {run['kind']:<17} {run['provider'] or '-':<7} "
            f"{run['status']:<9} {counts}" + (f"  error: {run['error']}" if run["error"] else "")
        )
    # Columns are padded to line up; a line never ends in that padding.
    return "\n".join(line.rstrip() for line in lines)


def _jobs(jobs: list[dict[str, Any]]) -> list[str]:
    lines = ["jobs (UTC)"]
    for job in jobs:
        when = f"next {job['next_run']}" if job["enabled"] else "disabled"
        lines.append(f"  {job['job']:<17} {job['schedule']:<18} {when}")
        lines += [_tick(tick) for tick in job["last"]]
        if not job["last"]:
            lines.append("    last never")
    return lines


def _tick(tick: dict[str, Any]) -> str:
    counts = _pairs(tick["counts"] or {})
    error = f"  error: {tick['error']}" if tick["error"] else ""
    return (
        f"    last {tick['scheduled_at']}  {tick['provider'] or '-':<7} "
        f"{tick['status']:<9} {counts}{error}"
    )


def _json(value: Any) -> str:
    """A stored JSON value as JSON, as the database holds it (not a Python repr)."""
    return json.dumps(value, sort_keys=True, default=str)


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())
