"""Rendering the status report (``db.report.collect`` reads it) for the ``status`` command."""

from __future__ import annotations

import json
from typing import Any


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


def _json(value: Any) -> str:
    """A stored JSON value as JSON, as the database holds it (not a Python repr)."""
    return json.dumps(value, sort_keys=True, default=str)


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())
