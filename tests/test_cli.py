"""The CLI against real databases: migrate, status (text and JSON) on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sync_worker.cli import main


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cli.db'}"
    else:
        make: Callable[[], str] = request.getfixturevalue("make_pg_database")
        url = make()
    for name in ("AUTH0_DOMAIN", "STACK_PROJECT_ID", "AUTHJS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", url)
    return url


def test_migrate_twice_then_status(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate"]) == 0
    assert "migrated from empty" in capsys.readouterr().out
    assert main(["migrate"]) == 0
    assert "already at" in capsys.readouterr().out
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "users      0 (0 deleted)" in out
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["users"] == {"total": 0, "deleted": 0}
    assert report["runs"] == []


def test_status_before_migrate_says_what_to_do(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 1
    assert "run `sync-worker migrate`" in capsys.readouterr().err


def test_sync_without_providers_says_how_to_configure(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate"]) == 0
    assert main(["sync"]) == 0
    assert "no provider configured" in capsys.readouterr().out


def test_unreachable_database_is_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sync-worker: database unavailable:")
    assert err.strip().count("\n") == 0
