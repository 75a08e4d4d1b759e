"""The CLI against real databases: migrate, status (text and JSON) on SQLite and PostgreSQL."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import tomllib
from collections.abc import Callable
from importlib.metadata import metadata as distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from sqlalchemy import MetaData, Table, func, select

from db.connect import make_engine
from db.tables import metadata
from sync_worker.cli import main
from sync_worker.progress import FALLBACK_COLUMNS
from tests.conftest import sqlalchemy_url
from tests.factories import rows
from tests.fakes.auth0 import FakeAuth0
from tests.fakes.authjs import make_loader
from tests.fakes.stack import USERS_PATH, StackFake

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def sqlite_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("AUTH0_DOMAIN", "STACK_PROJECT_ID", "AUTHJS_DATABASE_URL", "AUTH0_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "worker.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    assert main(["migrate"]) == 0
    return path


def use_stack(monkeypatch: pytest.MonkeyPatch, fake: StackFake) -> None:
    """The Stack pull's environment, pointed at ``fake``."""
    monkeypatch.setenv("STACK_PROJECT_ID", fake.project_id)
    monkeypatch.setenv("STACK_SECRET_SERVER_KEY", fake.secret_server_key)
    monkeypatch.setenv("STACK_BASE_URL", fake.url)


def test_backfill_stack_dry_run_then_real(
    sqlite_worker: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with StackFake() as fake:
        fake.seed(12)
        use_stack(monkeypatch, fake)
        capsys.readouterr()
        assert main(["backfill", "--provider", "stack", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("dry run (nothing written): stack full dry_run: created=12")
        assert '"email": [null, ' in out  # a sample of the diffs
        assert main(["status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["users"]["total"] == 0
        assert main(["backfill", "--provider", "stack"]) == 0
        assert "stack full succeeded: created=12" in capsys.readouterr().out
        assert main(["status", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
    assert report["users"]["total"] == 12
    assert report["runs"][0]["counts"]["created"] == 12


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_backfill_beside_a_running_pass_refuses_and_one_after_a_dead_one_records_it(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two passes of a provider at once would fight over its cursor: a backfill while the
    pass lock is held (here by another connection, as the daemon's pull holds it) exits 1
    saying so and writes nothing; once the lock is free, a run left 'running' by a process
    that died is recorded failed (abandoned) and the backfill goes on. On a SQLite file too:
    its lock spans processes (``db.filelock``)."""
    from db import ledger
    from db.runs import ABANDONED, start_run
    from db.tables import sync_runs

    if backend == "sqlite":
        url = db_url = f"sqlite:///{tmp_path / 'worker.db'}"
    else:
        url = request.getfixturevalue("make_pg_database")()
        db_url = sqlalchemy_url(url)
    for name in ("AUTH0_DOMAIN", "STACK_PROJECT_ID", "AUTHJS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["migrate"]) == 0
    db = make_engine(db_url, schema="identity")
    try:
        dead = start_run(db, "full", "stack")  # its process was killed mid-pass
        other = start_run(db, "full", "auth0")  # another provider's: not ours to judge
        with StackFake() as fake:
            fake.seed(3)
            use_stack(monkeypatch, fake)
            capsys.readouterr()
            with ledger.job_lock(db, "pull", "stack") as held:
                assert held
                assert main(["backfill", "--provider", "stack"]) == 1
                err = capsys.readouterr().err
                assert "stack: a pass is already running" in err
                assert err.count("\n") == 1
                assert main(["sync"]) == 1  # the same lock, and the same message
                assert "a pass is already running" in capsys.readouterr().err
                assert table_counts(url)["users"] == 0
            assert main(["backfill", "--provider", "stack"]) == 0
        with db.connect() as conn:
            got = {r.id: r for r in conn.execute(select(sync_runs))}
    finally:
        db.dispose()
    assert (got[dead].status, got[dead].error) == ("failed", ABANDONED)
    assert got[dead].finished_at is not None
    assert got[other].status == "running"
    assert [r.status for r in got.values() if r.id not in (dead, other)] == ["succeeded"]


def table_counts(url: str) -> dict[str, int]:
    """Rows in every table of the worker's database (its schema on PostgreSQL)."""
    engine = make_engine(sqlalchemy_url(url), schema="identity")
    try:
        with engine.connect() as conn:
            tables = [*metadata.sorted_tables, Table("alembic_version", MetaData())]
            return {
                t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in tables
            }
    finally:
        engine.dispose()


def test_a_dry_run_writes_nothing_at_all(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate"]) == 0
    with StackFake() as fake:
        ids = fake.seed(12)
        use_stack(monkeypatch, fake)
        assert main(["backfill", "--provider", "stack"]) == 0
        fake.delete_user(ids[0])
        fake.seed(3)
        before = table_counts(database_url)
        assert main(["backfill", "--provider", "stack", "--full", "--dry-run"]) == 0
        after = table_counts(database_url)
    out = capsys.readouterr().out
    assert "dry run (nothing written): stack full dry_run: created=3" in out
    assert before["users"] == 12
    assert before["sync_runs"] == 1
    assert after == before


def test_status_text_prints_cursors_as_json_without_trailing_spaces(
    sqlite_worker: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with StackFake() as fake:
        fake.seed(4)
        use_stack(monkeypatch, fake)
        assert main(["backfill", "--provider", "stack"]) == 0
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    (stored,) = json.loads(capsys.readouterr().out)["cursors"]
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line != line.rstrip()] == []
    (cursor_line,) = [line for line in lines if line.startswith("  stack ")]
    printed = cursor_line.removeprefix("  stack ").rsplit("  (at ", 1)[0]
    assert json.loads(printed) == stored["cursor"]


def test_backfill_auth0_and_rejected_credentials_exit_1(
    sqlite_worker: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeAuth0(job_polls=0)
    fake.start()
    try:
        fake.seed_users(9)
        monkeypatch.setenv("AUTH0_DOMAIN", fake.domain)
        monkeypatch.setenv("AUTH0_CLIENT_ID", fake.client_id)
        monkeypatch.setenv("AUTH0_CLIENT_SECRET", fake.client_secret)
        monkeypatch.setenv("AUTH0_BASE_URL", fake.url)
        assert main(["backfill", "--provider", "auth0", "--full"]) == 0
        assert "auth0 full succeeded: created=9" in capsys.readouterr().out
        monkeypatch.setenv("AUTH0_CLIENT_SECRET", "wrong")
        assert main(["backfill", "--provider", "auth0"]) == 1
        err = capsys.readouterr().err
    finally:
        fake.stop()
    last = err.strip().splitlines()[-1]  # structured logs come first, then one clear line
    assert last == "sync-worker: auth0: token request rejected (access_denied)"
    assert "wrong" not in err


@pytest.mark.postgres
def test_backfill_authjs_from_a_real_authjs_database(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_pg_database: Callable[[], str],
) -> None:
    app_db = make_pg_database()
    with make_loader("prisma", app_db) as loader:
        loader.populate(25)
    monkeypatch.setenv("DATABASE_URL", app_db)  # the worker lives beside the app, in "identity"
    monkeypatch.setenv("AUTHJS_DATABASE_URL", app_db)
    monkeypatch.setenv("AUTHJS_SCHEMA", "prisma")
    assert main(["migrate"]) == 0
    assert main(["backfill", "--provider", "authjs"]) == 0
    assert "authjs full succeeded: created=25 (sessions: new=" in capsys.readouterr().out
    assert main(["backfill", "--provider", "authjs"]) == 0
    again = capsys.readouterr().out  # sessions are not users: 25 unchanged users, whatever else
    assert re.search(r"succeeded: unchanged=25 \(sessions: unchanged=\d+\) in \d+ pages", again)
    assert main(["backfill", "--provider", "authjs", "--since", "2026-01-01"]) == 2
    assert "--since" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "request_line"),
    [
        (["sync"], r"stack: GET {url}/api/v1/\S+"),
        (["backfill", "--provider", "stack"], r"stack: GET {url}/api/v1/\S+"),
        (["backfill", "--provider", "auth0"], r"auth0: POST {url}/oauth/token"),
    ],
)
def test_a_wrong_base_url_names_the_host_and_reason_once(
    sqlite_worker: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    request_line: str,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for name, value in {
        "STACK_PROJECT_ID": "proj",
        "STACK_SECRET_SERVER_KEY": "ssk_s3cret",
        "STACK_BASE_URL": url,
        "AUTH0_DOMAIN": "tenant.example.com",
        "AUTH0_CLIENT_ID": "client",
        "AUTH0_CLIENT_SECRET": "cs_s3cret",
        "AUTH0_BASE_URL": url,
    }.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    started = time.monotonic()
    assert main(command) == 1
    assert time.monotonic() - started < 15  # not a minute of backoff
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    where = request_line.format(url=re.escape(url))
    pattern = rf"sync-worker: {where}: connection refused \(after 3 attempts over \d+\.\d s\)"
    assert re.fullmatch(pattern, last), last
    assert "s3cret" not in err


def test_provider_logs_follow_the_configured_json_format(
    sqlite_worker: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with StackFake() as fake:
        monkeypatch.setenv("STACK_PROJECT_ID", fake.project_id)
        monkeypatch.setenv("STACK_SECRET_SERVER_KEY", "ssk_wrong")
        monkeypatch.setenv("STACK_BASE_URL", fake.url)
        capsys.readouterr()
        assert main(["backfill", "--provider", "stack"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # logs never go to stdout
    *logs, last = captured.err.strip().splitlines()
    events = [json.loads(line) for line in logs]  # every log line is JSON when not a terminal
    assert {"pull_started", "pull_failed"} <= {e["event"] for e in events}
    assert last.startswith("sync-worker: ")
    assert "ssk_wrong" not in captured.err


# A suite started in the background inherits SIGINT ignored, and the worker rightly keeps
# a signal its parent ignores: the interrupted process starts with SIGINT at its default.
_SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
    " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_backfill_stops_cleanly_then_resumes(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C and SIGTERM alike: committed pages are kept, the run is recorded as failed naming
    the signal, the exit status is 128 + the signal; the resumed pass says why it does not
    reconcile."""
    worker = tmp_path / "worker.db"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:///{worker}'}}\n"
        "logging: {format: json}\n"
        "providers:\n"
        "  stack:\n"
        "    project_id: ${STACK_PROJECT_ID}\n"
        "    secret_server_key: ${STACK_SECRET_SERVER_KEY}\n"
        "    base_url: ${STACK_BASE_URL}\n"
        "    page_size: 5\n"
    )
    with StackFake() as fake:
        fake.seed(60)
        fake.fail_next(USERS_PATH, status=None, times=100, delay=0.2)  # slow pages
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AUTH0_", "AUTHJS_"))},
            "STACK_PROJECT_ID": fake.project_id,
            "STACK_SECRET_SERVER_KEY": fake.secret_server_key,
            "STACK_BASE_URL": fake.url,
        }
        env.pop("DATABASE_URL", None)
        base = [sys.executable, "-m", "sync_worker", "--config", str(config)]
        subprocess.run([*base, "migrate"], env=env, check=True, capture_output=True, timeout=60)
        backfill = [*base, "backfill", "--provider", "stack"]
        proc = subprocess.Popen(
            [sys.executable, "-c", _SIGINT_DEFAULT, *backfill[1:]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while len(fake.requests_to(USERS_PATH)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
        fake._faults.clear()
        resumed = subprocess.run(
            backfill, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert proc.returncode == 128 + signum
    assert err.strip().splitlines()[-1] == (
        f"sync-worker: interrupted by {signum.name}; committed pages are kept"
    )
    engine = make_engine(f"sqlite:///{worker}", schema="identity")
    try:
        interrupted, _ = sorted(rows(engine, "sync_runs"), key=lambda r: r["started_at"])
    finally:
        engine.dispose()
    committed = interrupted["counts"].get("created", 0)
    assert 0 < committed < 60
    assert committed % 5 == 0  # whole pages only
    assert (interrupted["status"], interrupted["error"]) == (
        "failed",
        f"interrupted by {signum.name}",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"stack incremental succeeded: created={60 - committed}" in resumed.stdout
    assert (
        "reconcile skipped: the pass resumed from a cursor and did not see every user; "
        "run `sync-worker backfill --provider stack --full` to reconcile"
    ) in resumed.stdout
    events = [json.loads(line) for line in resumed.stderr.splitlines()]
    assert "reconcile_skipped" in {e["event"] for e in events}


@pytest.mark.parametrize("command", ["migrate", "status", "backfill", "sync"])
def test_every_command_describes_itself_in_its_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    usage, description, *_ = capsys.readouterr().out.split("\n\n")
    assert usage.startswith(f"usage: sync-worker {command}")
    assert description.strip()
    assert not description.startswith("options:")


def test_backfill_provider_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["backfill", "--help"])
    out = capsys.readouterr().out
    provider = out[out.index("--provider {auth0,stack,authjs}\n") :].splitlines()
    assert "identity provider" in provider[1]


def test_the_licence_is_an_spdx_expression_built_by_a_setuptools_that_reads_it() -> None:
    """PEP 639: a `license = {text=...}` table makes setuptools>=77 print a deprecation block
    on every install; the SPDX string needs setuptools>=77 to build at all."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    (setuptools,) = [r for r in project["build-system"]["requires"] if "setuptools" in r]
    specifier = Requirement(setuptools).specifier
    assert specifier.contains("77.0")
    assert not specifier.contains("76.9")
    installed = distribution("sync-worker")  # re-installed by `make` when pyproject.toml changes
    assert installed["License-Expression"] == "MIT"
    assert installed.get_all("License") is None


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_a_terminal(
    command: list[str], env: dict[str, str], columns: int
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Run the CLI with stderr on a pseudo-terminal of ``columns`` columns (0: one that
    reports no size); returns what the terminal received, without colour codes."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    received = bytearray()
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            received += data
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
    done = subprocess.CompletedProcess(command, proc.returncode, out.decode(), "")
    return ANSI.sub("", received.decode()), done


#: What a backfill never uses: the daemon's stack, Alembic, the HTTP client of the other
#: providers, the maintenance jobs. Every command starts by building the whole parser, so
#: each is imported by the commands that use it, not by the command modules.
NOT_FOR_A_BACKFILL = (
    "fastapi", "uvicorn", "starlette", "svix", "apscheduler", "alembic", "requests",
    "sync_worker.daemon", "sync_worker.jobs.maintenance", "sync_worker.jobs.export", "db.inbox",
)  # fmt: skip


def _authjs_worker(tmp_path: Path, users: int) -> dict[str, str]:
    """A migrated SQLite worker and a Prisma Auth.js source of ``users``; their environment."""
    app = f"sqlite:///{tmp_path / 'app.db'}"
    with make_loader("prisma", app) as loader:
        loader.populate(users)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH0_", "STACK_"))}
    env |= {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'worker.db'}",
        "AUTHJS_DATABASE_URL": app,
        "AUTHJS_SCHEMA": "prisma",
    }
    migrate = [sys.executable, "-m", "sync_worker", "migrate"]
    subprocess.run(migrate, env=env, check=True, capture_output=True, timeout=60)
    return env


def test_an_authjs_backfill_process_imports_only_what_it_uses(tmp_path: Path) -> None:
    env = _authjs_worker(tmp_path, 3)
    script = (
        "import json, sys\n"
        "from sync_worker.cli import main\n"
        "code = main(['backfill', '--provider', 'authjs', '--full'])\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    code, modules = json.loads(done.stdout.splitlines()[-1])
    assert code == 0, done.stderr
    assert "sync_worker.pull" in modules  # it did run the pass
    loaded = [m for m in modules if m.startswith(tuple(f"{n}." for n in NOT_FOR_A_BACKFILL))]
    assert [m for m in modules if m in NOT_FOR_A_BACKFILL] + loaded == []


@pytest.mark.parametrize("columns", [0, 120])
def test_the_progress_bar_on_a_terminal(tmp_path: Path, columns: int) -> None:
    """Users are counted (sessions apart) against the total Auth.js states, with an ETA; log
    lines scroll above the bar instead of running into it; a terminal that reports 0
    columns still gets a bar."""
    env = _authjs_worker(tmp_path, 2100)  # three pages of 1,000
    base = [sys.executable, "-m", "sync_worker"]
    screen, done = run_on_a_terminal([*base, "backfill", "--provider", "authjs"], env, columns)
    assert done.returncode == 0, screen
    segments = re.split(r"[\r\n]", screen)
    logs = [s for s in segments if "batch_applied" in s or "pull_finished" in s]
    assert len(logs) == 4
    assert all(re.match(r"\d{4}-\d\d-\d\dT\S+Z \[info", line) for line in logs), logs
    bars = [s for s in segments if s.startswith("authjs users:")]
    sessions = int(re.findall(r"sessions: new=(\d+)", done.stdout)[0])
    assert re.fullmatch(
        rf"authjs users: 100%\|█+\| 2100/2100 \[\d\d:\d\d<00:00, [\d.]+ users/s, "
        rf"sessions={sessions}\]",
        bars[-1],
    ), bars[-1]
    assert any(re.search(r"\| 1000/2100 \[\d\d:\d\d<\d\d:\d\d", bar) for bar in bars)  # an ETA
    assert len(bars[-1]) <= (columns or FALLBACK_COLUMNS)
