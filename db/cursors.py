"""Pull cursors: where each provider's next incremental pull starts (``sync_cursors``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select

from db.errors import translated
from db.tables import sync_cursors
from db.upsert import upsert_rows


@translated
def save_cursor(conn: Connection, provider: str, cursor: Mapping[str, Any], now: datetime) -> None:
    """Inside the transaction of the batch it follows, so it never moves past an unapplied page."""
    upsert_rows(
        conn,
        sync_cursors,
        [{"provider": provider, "cursor": dict(cursor), "updated_at": now}],
        conflict=["provider"],
        update=["cursor", "updated_at"],
    )


@translated
def load_cursor(db: Engine | Connection, provider: str) -> dict[str, Any] | None:
    stmt = select(sync_cursors.c.cursor).where(sync_cursors.c.provider == provider)
    if isinstance(db, Connection):
        value = db.execute(stmt).scalar()
    else:
        with db.connect() as conn:
            value = conn.execute(stmt).scalar()
    return dict(value) if value is not None else None
