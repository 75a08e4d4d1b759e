"""Upstream ids a full pass has seen (``sync_seen``), for reconcile's set difference."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Select, delete, func, insert, select, true

from db.errors import translated
from db.tables import sync_seen


@translated
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


@translated
def forget_seen(db: Engine, run_id: uuid.UUID) -> None:
    with db.begin() as conn:
        conn.execute(delete(sync_seen).where(sync_seen.c.run_id == run_id))
