"""Cross-process job locks for a SQLite database file: ``flock`` on a file per lock.

PostgreSQL's session advisory locks let every process that shares the database exclude the
others from a job (``db.ledger.job_lock``). A SQLite database is shared the same way by the
daemon and a CLI backfill started beside it, so it needs a lock with the same two
properties: held across processes, and released by the kernel when the holder dies, SIGKILL
included (no stale lock to clean up, and a lock held proves its holder alive). ``flock`` on
a file has both; each acquisition opens its own descriptor, so threads of one process
exclude each other too. The files live in ``<database>.locks/`` beside the database and are
never deleted (deleting a lock file while another process waits on it would split the lock).
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import URL

from sync_worker.errors import StoreUnavailable

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def lock_directory(url: URL) -> Path | None:
    """Where the lock files of the SQLite database ``url`` live; None for an in-memory
    database (only its own process can see it) and for other dialects."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if url.query.get("uri") in ("true", "1") and database.startswith("file:"):
        if "memory" in (url.query.get("mode"), database[5:]):
            return None
        database = database[5:]
    if database in ("", ":memory:"):
        return None
    path = Path(database)
    return path.parent / f"{path.name}.locks"


@contextmanager
def file_lock(directory: Path, name: str) -> Iterator[bool]:
    """Hold the lock ``name`` for the ``with`` block: yields True if taken, False if another
    process or thread holds it. Never waits."""
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(directory / f"{_UNSAFE.sub('_', name)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreUnavailable(f"cannot open the job lock in {directory}: {exc.strerror}") from exc
    try:
        yield _try_lock(fd)  # closing the descriptor below releases the lock
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
