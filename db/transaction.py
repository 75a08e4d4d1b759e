"""Transactions for the callers that own them (pull runner, drainer, jobs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine

from db.errors import translating


@contextmanager
def transaction(db: Engine, *, rollback: bool = False) -> Iterator[Connection]:
    """A connection in one transaction: committed at the end, or rolled back on an error
    (or always, with ``rollback``: a dry run). Driver errors come out as StoreError."""
    with translating(), db.connect() as conn:
        txn = conn.begin()
        try:
            yield conn
        except BaseException:
            txn.rollback()
            raise
        if rollback:
            txn.rollback()
        else:
            txn.commit()
