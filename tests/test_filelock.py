"""The job lock on a SQLite file spans processes and dies with its holder (``db.filelock``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import Engine

from db import ledger
from db.connect import make_engine
from db.filelock import file_lock, lock_directory
from sync_worker.errors import StoreUnavailable

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import sys, time
    from db import ledger
    from db.connect import make_engine

    engine = make_engine(sys.argv[1], schema="identity")
    with ledger.job_lock(engine, "pull", "stack") as held:
        print("held" if held else "busy", flush=True)
        time.sleep(120)
    """
)


def _holder(url: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def _taken(db: Engine, job: str = "pull", provider: str | None = "stack") -> bool:
    with ledger.job_lock(db, job, provider) as held:
        return held


def test_a_lock_held_by_another_process_is_busy_until_that_process_is_killed(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    db = make_engine(url, schema="identity")
    child = _holder(url)
    try:
        assert _taken(db) is False
        assert _taken(db, provider="auth0") is True  # another provider's lock
        assert _taken(db, job="reconcile") is True  # another job's
        os.kill(child.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        child.wait(timeout=30)
        assert _taken(db) is True
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
        db.dispose()
    assert sorted(p.name for p in (tmp_path / "worker.db.locks").iterdir()) == [
        "pull.auth0.lock",
        "pull.stack.lock",
        "reconcile.stack.lock",
    ]


def test_an_in_memory_database_locks_within_its_process() -> None:
    db = make_engine("sqlite://", schema="identity")
    try:
        assert not ledger.locks_across_processes(db)
        with ledger.job_lock(db, "pull", "stack") as first:
            assert first is True
            with ledger.job_lock(db, "pull", "stack") as second:
                assert second is False
        assert _taken(db) is True
    finally:
        db.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:shared?mode=memory&uri=true", None),
        ("sqlite:///var/worker.db", Path("var/worker.db.locks")),
        ("sqlite:////srv/sync/worker.db", Path("/srv/sync/worker.db.locks")),
        ("sqlite:///file:/srv/sync/worker.db?uri=true", Path("/srv/sync/worker.db.locks")),
        ("postgresql+psycopg://localhost/test", None),
    ],
)
def test_where_the_lock_files_live(url: str, expected: Path | None) -> None:
    from sqlalchemy.engine import make_url

    assert lock_directory(make_url(url)) == expected


def test_a_lock_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with (
        pytest.raises(StoreUnavailable, match="cannot open the job lock"),
        file_lock(blocked, "pull.stack"),
    ):
        pass


def test_lock_names_are_kept_to_safe_file_names(tmp_path: Path) -> None:
    with file_lock(tmp_path, "pull.../../x y") as held:
        assert held
    assert [p.name for p in tmp_path.iterdir()] == ["pull..._.._x_y.lock"]
