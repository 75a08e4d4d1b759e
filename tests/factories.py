"""Builders for normalized changes and readers of the worker's tables, for tests."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy import Engine as SAEngine

from db.cursors import save_cursor
from db.tables import metadata, sync_audit
from db.transaction import transaction
from sync_worker.changes import (
    ChangeKind,
    LinkedIdentity,
    SessionInfo,
    Source,
    UserAttributes,
    UserChange,
)
from sync_worker.engine import BatchResult, PlanSettings, SyncEngine

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def upsert(
    external_id: str,
    version: float | None = 0,
    *,
    provider: str = "auth0",
    event_id: str | None = None,
    linked: tuple[LinkedIdentity, ...] = (),
    linked_stated: bool = True,
    raw: dict[str, Any] | None = None,
    **attrs: Any,
) -> UserChange:
    values: dict[str, Any] = {
        "email": f"{external_id.replace('|', '-')}@example.org",
        "email_verified": True,
        "name": f"Name {external_id}",
    }
    values.update(attrs)
    return UserChange(
        provider=provider,
        external_id=external_id,
        kind=ChangeKind.UPSERT,
        version=at(version) if version is not None else None,
        attributes=UserAttributes(**values),
        linked=linked,
        linked_stated=linked_stated,
        # Like Auth0's records, the raw record carries its own updated_at.
        raw=raw
        if raw is not None
        else {"id": external_id, "updated_at": _iso(version), **_jsonable(values)},
        event_id=event_id,
    )


def delete(
    external_id: str, version: float = 0, *, provider: str = "auth0", event_id: str | None = None
) -> UserChange:
    return UserChange(
        provider=provider,
        external_id=external_id,
        kind=ChangeKind.DELETE,
        version=at(version),
        event_id=event_id,
    )


def login(
    external_id: str,
    session_id: str,
    minutes: float = 0,
    *,
    provider: str = "auth0",
    expires_in_minutes: float | None = None,
) -> UserChange:
    expires = at(minutes + expires_in_minutes) if expires_in_minutes is not None else None
    return UserChange(
        provider=provider,
        external_id=external_id,
        kind=ChangeKind.LOGIN,
        version=at(minutes),
        session=SessionInfo(
            external_session_id=session_id,
            created_at=at(minutes),
            expires_at=expires,
            ip="203.0.113.7",
        ),
    )


def sign_in(
    external_id: str, minutes: float = 0, event_id: str | None = None, *, provider: str = "auth0"
) -> UserChange:
    """A login that names no session (an Auth.js signIn webhook)."""
    return UserChange(
        provider=provider,
        external_id=external_id,
        kind=ChangeKind.LOGIN,
        version=at(minutes),
        event_id=event_id,
    )


def _iso(version: float | None) -> str | None:
    return at(version).isoformat() if version is not None else None


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in values.items()}


def dump(
    engine: Engine, *, exclude: tuple[str, ...] = ("sync_audit", "sync_runs")
) -> dict[str, Any]:
    """Every row of every worker table, sorted, for before/after comparisons."""
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            if table.name in exclude:
                continue
            rows = [dict(r) for r in conn.execute(select(table)).mappings()]
            out[table.name] = sorted(rows, key=repr)
    return out


def rows(engine: Engine, table_name: str, **where: Any) -> list[dict[str, Any]]:
    table = metadata.tables[table_name]
    stmt = select(table)
    for column, value in where.items():
        stmt = stmt.where(table.c[column] == value)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(stmt).mappings()]


def audit(engine: Engine, **where: Any) -> list[dict[str, Any]]:
    stmt = select(sync_audit).order_by(sync_audit.c.id)
    for column, value in where.items():
        stmt = stmt.where(sync_audit.c[column] == value)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(stmt).mappings()]


class BoundEngine:
    """The engine bound to a database: each ``apply`` in a transaction of its own.

    The engine works inside its caller's transaction; callers (pull runner, drainer) own
    it. Tests of the engine rules do what a caller does: open one, apply, save the cursor
    with the batch, commit (or roll back, for a dry run).
    """

    def __init__(self, db: SAEngine, settings: PlanSettings | None = None, **kw: Any) -> None:
        self.db = db
        self.engine = SyncEngine(settings or PlanSettings(), **kw)

    def apply(
        self,
        changes: Sequence[UserChange],
        *,
        source: Source,
        cursor: tuple[str, dict[str, Any]] | None = None,
        dry_run: bool = False,
        **kw: Any,
    ) -> BatchResult:
        with transaction(self.db, rollback=dry_run) as conn:
            result = self.engine.apply(conn, list(changes), source=source, **kw)
            if cursor is not None:
                save_cursor(conn, cursor[0], cursor[1], T0)
        return result
