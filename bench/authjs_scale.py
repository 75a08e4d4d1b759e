"""Auth.js at scale: whole `sync-worker backfill` processes against floors and peers.

Run: ``.venv/bin/python bench/authjs_scale.py [--quick] [--repeat R] [--no-write]``.
PostgreSQL at 127.0.0.1:5432; every database is a throwaway ``sw_scale_<random>``.

The source is an ``@auth/pg-adapter`` database in which every user has one OAuth account and
one live session. For each size (10,000 and 100,000 users; 2,000 and 10,000 with
``--quick``) it times, as whole processes (start, imports, migrations check, the pass):

- ``sync-worker backfill --provider authjs --full`` into a fresh PostgreSQL worker
  database: the initial load, then an unchanged re-pass; the same into SQLite;
- the floors of the same run: COPY (binary) of the final rows of the initial load into
  empty indexed copies of the worker's tables, and reading the pass's source columns by
  COPY; both in one process, timed around the COPY statements only; and, for context, a
  worker process that only starts and imports (``sync-worker backfill --help``);
- dlt (``sql_database`` -> postgres, ``write_disposition="merge"``, the same three tables)
  as a peer, installed on first use into a virtualenv of its own (``.venv-dlt``, bench only;
  ``bench/dlt_child.py`` runs it);

and once, on the largest worker database: the naive per-row ORM loop (the seeds' pattern:
query, create or update, commit per record) on a subset, and the latency of
webhook-sized batches (1, 10, 100 changes, each its own transaction) on PostgreSQL.
Peak RSS is each process's own (``wait4``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402
from sqlalchemy.orm import Mapped, Session  # noqa: E402

from bench.engine import Base, Identity, User, naive_apply  # noqa: E402
from bench.results import pg_database, sqlalchemy_url, table, write_section  # noqa: E402
from db.connect import make_engine  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from db.tables import sync_audit, user_sessions, users  # noqa: E402
from db.transaction import transaction  # noqa: E402
from providers.authjs import AuthjsProvider, to_change  # noqa: E402
from sync_worker.changes import ChangeKind, Source, UserChange, utcnow  # noqa: E402
from sync_worker.config import AuthjsSettings  # noqa: E402
from sync_worker.engine import PlanSettings, SyncEngine  # noqa: E402
from sync_worker.logging import configure  # noqa: E402
from tests.fakes.authjs import FakeAccount, FakeSession, FakeUser, make_loader  # noqa: E402

SCHEMA = "identity"
WORKER_TABLES = ("users", "profiles", "user_identities", "user_sessions", "sync_audit")
SYNC_WORKER = Path(sys.executable).parent / "sync-worker"
LATENCY_SIZES = {1: 300, 10: 100, 100: 30}  # batch size: batches timed (after 5 warm-ups)
NAIVE_USERS = 1_000

# Targets of issue #13.
TARGET_FLOOR = 2.0  # initial load / COPY floor
TARGET_READ = 4.0  # unchanged pass / reading the source
TARGET_DLT_LOAD = 1.0  # initial load / dlt's
TARGET_DLT_UNCHANGED = 0.5  # unchanged pass / dlt's
TARGET_LINEAR = 1.2  # per-user cost at the large size / at the small one
TARGET_NAIVE = 25.0  # engine users/s / naive users/s
TARGET_P99_ONE_MS = 10.0


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the source ------------------------------------------------------------------------

_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "José", "Zoë", "Linus")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "O'Brien", "Wirth")


def scale_users(n: int, *, seed: int = 0, now: datetime | None = None) -> Iterator[FakeUser]:
    """``n`` users, each with one OAuth account and one session live for 1-30 more days."""
    rng = random.Random(seed)
    anchor = now or datetime.now(UTC)
    for i in range(n):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        local = f"{first}.{last}".lower().replace("'", "")
        github = rng.random() < 0.5
        account = FakeAccount(
            provider="github" if github else "google",
            provider_account_id=str(i * 180 + rng.randrange(1, 181)),
            access_token=f"tok_{rng.getrandbits(128):032x}",
            token_type="bearer",
        )
        signed_up = anchor - timedelta(days=rng.randrange(1, 900))
        yield FakeUser(
            name=f"{first} {last}",
            email=f"{local}{i}@example.org",
            email_verified=signed_up if rng.random() < 0.3 else None,
            image=f"https://avatars.example.org/u/{i}?v=4",
            accounts=(account,),
            sessions=(
                FakeSession(
                    session_token=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    expires=anchor + timedelta(days=rng.uniform(1, 30)),
                ),
            ),
        )


def load_source(url: str, n: int) -> tuple[list[FakeUser], float]:
    started = time.perf_counter()
    loader = make_loader("pg", url)
    try:
        loaded = loader.load(scale_users(n))
        loader.execute("ANALYZE")
    finally:
        loader.close()
    return loaded, time.perf_counter() - started


# -- whole processes -------------------------------------------------------------------


@dataclass(slots=True)
class Proc:
    """One timed process: wall seconds, peak RSS (KiB) and its page cycle times."""

    seconds: float
    maxrss_kb: int
    cpu: float = 0.0  # the process's own user + system seconds (the database's are not)
    cycles: list[float] = field(default_factory=list)
    stdout: str = ""

    def per_user_us(self, n: int) -> float:
        return self.seconds / n * 1e6


# Forks the measured process from a small interpreter and reports that child's rusage. The
# child of this (large) process would not do: Linux keeps the high-water mark of the image
# before exec in ru_maxrss, so after loading 100,000 users here every child "peaked" at 500 MiB.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_process(args: Sequence[str], env: dict[str, str], workdir: Path) -> Proc:
    """Run ``args`` to the end; its wall time (with ~20 ms of launcher), its own peak RSS
    and CPU seconds, and its stdout."""
    out_path, err_path, usage_path = workdir / "stdout", workdir / "stderr", workdir / "usage"
    launch = [sys.executable, "-S", "-c", _LAUNCHER, str(usage_path), *args]
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        done = subprocess.run(launch, stdout=out, stderr=err, env=env, cwd=workdir, check=False)
        seconds = time.perf_counter() - started
    code = done.returncode
    stderr = err_path.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"{args[0]} {args[1:3]} exited {code}:\n{stderr[-3000:]}")
    maxrss, cpu = usage_path.read_text().split()
    return Proc(seconds, int(maxrss), float(cpu), _cycles(stderr), out_path.read_text())


def _cycles(stderr: str) -> list[float]:
    """Seconds between consecutive ``batch_applied`` (or the set path's ``set_batch_applied``)
    log lines: one page each."""
    stamps: list[datetime] = []
    for line in stderr.splitlines():
        if '"batch_applied"' not in line and '"set_batch_applied"' not in line:
            continue
        try:
            stamps.append(datetime.fromisoformat(json.loads(line)["timestamp"]))
        except (ValueError, KeyError):
            continue
    return [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]


def worker_env(worker_url: str, source_url: str) -> dict[str, str]:
    """The worker's environment as an operator's shell has it: no provider but Auth.js, and
    Python's bytecode cache on (PYTHONDONTWRITEBYTECODE recompiled every module each start)."""
    skip = ("AUTH0_", "STACK_", "PYTHONDONTWRITEBYTECODE")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    return {
        **keep,
        "DATABASE_URL": worker_url,
        "AUTHJS_DATABASE_URL": source_url,
        "SYNC_WORKER_CONFIG": str(ROOT / "config.yaml"),
    }


def backfill_pair(worker_url: str, source_url: str) -> tuple[Proc, Proc]:
    """Migrate (untimed), then the initial load and the unchanged re-pass, timed."""
    env = worker_env(worker_url, source_url)
    with tempfile.TemporaryDirectory(prefix="sw-scale-") as tmp:
        work = Path(tmp)
        run_process([str(SYNC_WORKER), "migrate"], env, work)
        command = [str(SYNC_WORKER), "backfill", "--provider", "authjs", "--full"]
        initial = run_process(command, env, work)
        unchanged = run_process(command, env, work)
    return initial, unchanged


def check_worker(worker_url: str, n: int, audit_rows: int | None = None) -> int:
    """Every user and session arrived; returns the audit row count."""
    engine = make_engine(worker_url, schema=SCHEMA)
    try:
        with engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(users)).scalar_one()
            sessions = conn.execute(select(func.count()).select_from(user_sessions)).scalar_one()
            audit = conn.execute(select(func.count()).select_from(sync_audit)).scalar_one()
    finally:
        engine.dispose()
    assert count == n, (count, n)
    assert sessions == n, (sessions, n)
    assert audit_rows is None or audit == audit_rows, f"re-pass wrote audit rows: {audit}"
    return int(audit)


# -- floors ----------------------------------------------------------------------------


def copy_floor(worker_libpq: str) -> float:
    """COPY the initial load's final rows into empty indexed copies; seconds of the COPYs."""
    floor_engine = make_engine(sqlalchemy_url(worker_libpq), schema="bench_floor")
    upgrade(floor_engine, "bench_floor")
    floor_engine.dispose()
    dumps: dict[str, bytes] = {}
    with psycopg.connect(worker_libpq) as conn, conn.cursor() as cur:
        for name in WORKER_TABLES:
            with cur.copy(f'COPY "{SCHEMA}".{name} TO STDOUT (FORMAT BINARY)') as copy:
                dumps[name] = b"".join(bytes(block) for block in copy)
    with psycopg.connect(worker_libpq) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        for name in WORKER_TABLES:
            with cur.copy(f"COPY bench_floor.{name} FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(dumps[name])
        conn.commit()
        return time.perf_counter() - started


SOURCE_READS = (
    'COPY (SELECT id, name, email, "emailVerified", image FROM users) TO STDOUT',
    'COPY (SELECT "userId", provider, "providerAccountId" FROM accounts) TO STDOUT',
    'COPY (SELECT "userId", "sessionToken", expires FROM sessions WHERE expires >= now())'
    " TO STDOUT",
)


def start_floor(worker_url: str, source_url: str) -> float:
    """A worker process that starts, imports everything a backfill imports, and stops
    (``sync-worker backfill --help``): the interpreter's and imports' share of every
    whole-process figure; best of three (seconds)."""
    env = worker_env(worker_url, source_url)
    with tempfile.TemporaryDirectory(prefix="sw-scale-start-") as tmp:
        runs = [
            run_process([str(SYNC_WORKER), "backfill", "--help"], env, Path(tmp)) for _ in range(3)
        ]
    return min(r.seconds for r in runs)


def read_floor(source_libpq: str) -> float:
    """Read the columns a pass reads, by COPY, in one snapshot; best of three (seconds)."""
    best = float("inf")
    for _ in range(3):
        with psycopg.connect(source_libpq) as conn, conn.cursor() as cur:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            started = time.perf_counter()
            for statement in SOURCE_READS:
                with cur.copy(statement) as copy:
                    for _block in copy:
                        pass
            best = min(best, time.perf_counter() - started)
    return best


# -- dlt, the generic mirror -----------------------------------------------------------


#: dlt lives in a virtualenv of its own (bench/dlt_child.py says why).
DLT_VENV = ROOT / ".venv-dlt"
DLT_PYTHON = DLT_VENV / "bin" / "python"
DLT_CHILD = Path(__file__).resolve().parent / "dlt_child.py"
DLT_PACKAGES = ("dlt[postgres]", "sqlalchemy", "psycopg[binary]")


def dlt_available() -> bool:
    """dlt in ``.venv-dlt``, made on first use (dlt with its PostgreSQL extra, SQLAlchemy and
    psycopg 3, which SQLAlchemy 2.1 uses for ``postgresql://``)."""
    probe = [str(DLT_PYTHON), "-c", "import dlt.sources.sql_database"]
    if (
        DLT_PYTHON.exists()
        and subprocess.run(probe, capture_output=True, check=False).returncode == 0
    ):
        return True
    say(f"dlt missing: making {DLT_VENV.name} with {' '.join(DLT_PACKAGES)} (bench only)")
    made = subprocess.run([sys.executable, "-m", "venv", str(DLT_VENV)], capture_output=True,
                          check=False)  # fmt: skip
    if made.returncode != 0:
        return False
    done = subprocess.run(
        [str(DLT_PYTHON), "-m", "pip", "install", "--quiet", *DLT_PACKAGES],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def dlt_pair(source: str) -> tuple[Proc, Proc]:
    with pg_database("sw_scale_dlt") as dest, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "RUNTIME__LOG_LEVEL": "WARNING"}
        args = [str(DLT_PYTHON), str(DLT_CHILD), source, dest, str(work / "pipelines")]
        first = run_process(args, env, work)
        second = run_process(args, env, work)
    return first, second


# -- the naive per-row loop ------------------------------------------------------------


class UserSession(Base):
    __table__ = user_sessions

    id: Mapped[uuid.UUID]
    user_id: Mapped[uuid.UUID]
    provider: Mapped[str]
    external_session_id: Mapped[str]
    ip: Mapped[str | None]
    user_agent: Mapped[str | None]
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


def naive_login(session: Session, change: UserChange) -> None:
    """A session as the seeds' code stores it: look it up, insert it, commit."""
    info = change.session
    assert info is not None
    held = session.scalars(
        select(UserSession).where(
            UserSession.provider == change.provider,
            UserSession.external_session_id == info.external_session_id,
        )
    ).one_or_none()
    if held is None:
        identity = session.get(Identity, (change.provider, change.external_id))
        assert identity is not None
        user = session.get(User, identity.user_id)
        assert user is not None
        session.add(
            UserSession(id=uuid.uuid4(), user_id=identity.user_id, provider=change.provider,
                        external_session_id=info.external_session_id,
                        created_at=info.created_at or utcnow(), last_seen_at=info.last_seen_at,
                        expires_at=info.expires_at)
        )  # fmt: skip
        user.last_login_at = info.last_seen_at
    session.commit()


def naive_changes(source: str, n: int) -> list[UserChange]:
    provider = AuthjsProvider(AuthjsSettings(database_url=source))
    changes: list[UserChange] = []
    try:
        for page in provider.iter_changes(None, full=True):
            changes += page.changes
            if sum(1 for c in changes if c.kind is ChangeKind.UPSERT) >= n:
                break
    finally:
        provider.close()
    ids = {c.external_id for c in changes if c.kind is ChangeKind.UPSERT}
    kept = sorted(ids)[:n]
    keep = set(kept)
    return [c for c in changes if c.external_id in keep]


def naive_loop(worker_libpq: str, source: str, n: int) -> float:
    """Seconds for the naive loop to load ``n`` users and their sessions (empty tables)."""
    engine = make_engine(sqlalchemy_url(worker_libpq), schema="bench_naive")
    upgrade(engine, "bench_naive")
    changes = naive_changes(source, n)
    try:
        with Session(engine) as session:
            started = time.perf_counter()
            for change in changes:
                if change.kind is ChangeKind.LOGIN:
                    naive_login(session, change)
                else:
                    naive_apply(session, change)
            return time.perf_counter() - started
    finally:
        engine.dispose()


# -- webhook-sized batches -------------------------------------------------------------


def latencies(worker_libpq: str, loaded: Sequence[FakeUser]) -> dict[int, list[float]]:
    """Milliseconds per batch of k changed users (each batch its own transaction)."""
    db = make_engine(sqlalchemy_url(worker_libpq), schema=SCHEMA)
    engine = SyncEngine(PlanSettings())
    rng = random.Random(7)
    found: dict[int, list[float]] = {}
    # The bulk load and COPY floor just before leave ~1 GB of dirty pages: a checkpoint
    # flushing them mid-measurement tripled the one-row INSERT's p99 too (0.9 -> 2.9 ms).
    # Written first, as a server between bulk loads would have; floor and batches alike.
    with psycopg.connect(worker_libpq, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    try:
        for size, count in LATENCY_SIZES.items():
            times: list[float] = []
            for index in range(count + 5):
                picked = rng.sample(range(len(loaded)), size)
                changes = [_renamed(loaded[i], f"{size}.{index}") for i in picked]
                started = time.perf_counter()
                with transaction(db) as conn:
                    result = engine.apply(conn, changes, source=Source.WEBHOOK)
                elapsed = (time.perf_counter() - started) * 1000
                assert result.counts.get("updated") == size, result.counts
                if index >= 5:
                    times.append(elapsed)
            found[size] = times
        found[0] = _commit_floor(db, count=LATENCY_SIZES[1])
    finally:
        db.dispose()
    return found


def _commit_floor(db: Any, count: int) -> list[float]:
    """Milliseconds of a transaction that inserts one row and commits: the disk's flush,
    which every write transaction pays (synchronous_commit is on)."""
    with db.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS bench_commit (n integer)"))
    times: list[float] = []
    for index in range(count + 5):
        started = time.perf_counter()
        with transaction(db) as conn:
            conn.execute(text("INSERT INTO bench_commit VALUES (:n)"), {"n": index})
        if index >= 5:
            times.append((time.perf_counter() - started) * 1000)
    return times


def _renamed(user: FakeUser, tag: str) -> UserChange:
    row = {
        "id": user.id,
        "name": f"{user.name} {tag}",
        "email": user.email,
        "emailVerified": user.email_verified,
        "image": user.image,
    }
    accounts = [
        {"provider": a.provider, "providerAccountId": a.provider_account_id} for a in user.accounts
    ]
    return to_change(row, accounts, observed_at=utcnow())


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- one size --------------------------------------------------------------------------


@dataclass(slots=True)
class SizeRun:
    n: int
    pg: list[tuple[Proc, Proc]] = field(default_factory=list)
    sqlite: list[tuple[Proc, Proc]] = field(default_factory=list)
    copy_floor: list[float] = field(default_factory=list)
    read_floor: float = 0.0
    start_floor: float = 0.0
    dlt: tuple[Proc, Proc] | None = None
    naive_seconds: float | None = None
    naive_users: int = 0
    latency: dict[int, list[float]] = field(default_factory=dict)
    source_load: float = 0.0

    def median(self, runs: list[tuple[Proc, Proc]], which: int) -> Proc:
        """The run of median time (the faster middle one of an even count)."""
        ordered = sorted(runs, key=lambda pair: pair[which].seconds)
        return ordered[(len(ordered) - 1) // 2][which]


def bench_size(n: int, opts: argparse.Namespace, *, last: bool) -> SizeRun:
    run = SizeRun(n)
    with pg_database("sw_scale") as source:
        say(f"{n:,}: loading the source")
        loaded, run.source_load = load_source(source, n)
        run.read_floor = read_floor(source)
        say(f"{n:,}: read floor {run.read_floor:.2f} s")
        run.start_floor = start_floor(sqlalchemy_url(source), source)
        say(f"{n:,}: process start {run.start_floor:.2f} s")
        keep_worker: str | None = None
        for attempt in range(opts.repeat):
            with pg_database("sw_scale") as worker:
                say(f"{n:,}: PostgreSQL backfill pair {attempt + 1}")
                pair = backfill_pair(sqlalchemy_url(worker), source)
                audit = check_worker(sqlalchemy_url(worker), n)
                assert audit == 2 * n, f"audit rows after the initial load: {audit}"
                run.copy_floor.append(copy_floor(worker))
                check_worker(sqlalchemy_url(worker), n, audit)
                run.pg.append(pair)
                say(f"{n:,}: pg {pair[0].seconds:.2f} / {pair[1].seconds:.2f} s, "
                    f"floor {run.copy_floor[-1]:.2f} s")  # fmt: skip
                if last and attempt == opts.repeat - 1:
                    keep_worker = worker
                    _extras(run, worker, source, loaded, opts)
        assert keep_worker is not None or not last
        if not opts.skip_sqlite:
            for attempt in range(opts.repeat):
                with tempfile.TemporaryDirectory(prefix="sw-scale-lite-") as tmp:
                    url = f"sqlite:///{tmp}/worker.db"
                    say(f"{n:,}: SQLite backfill pair {attempt + 1}")
                    pair = backfill_pair(url, source)
                    check_worker(url, n)
                    run.sqlite.append(pair)
                    say(f"{n:,}: sqlite {pair[0].seconds:.2f} / {pair[1].seconds:.2f} s")
        if not opts.skip_dlt and dlt_available():
            say(f"{n:,}: dlt pair")
            run.dlt = dlt_pair(source)
            say(f"{n:,}: dlt {run.dlt[0].seconds:.2f} / {run.dlt[1].seconds:.2f} s")
    return run


def _extras(
    run: SizeRun, worker: str, source: str, loaded: Sequence[FakeUser], opts: argparse.Namespace
) -> None:
    say(f"{run.n:,}: webhook-sized batches")
    run.latency = latencies(worker, loaded)
    run.naive_users = min(opts.naive_users, run.n)
    say(f"{run.n:,}: naive ORM loop on {run.naive_users:,} users")
    run.naive_seconds = naive_loop(worker, source, run.naive_users)


# -- reporting -------------------------------------------------------------------------


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def process_table(runs: Sequence[SizeRun]) -> str:
    headers = ["Whole process", *[f"{r.n:,} users" for r in runs], "per user at each size"]
    rows: list[list[object]] = []

    def line(name: str, figures: Sequence[Proc | float | None]) -> None:
        cells: list[object] = [name]
        per: list[str] = []
        for r, f in zip(runs, figures, strict=True):
            if f is None:
                cells.append("—")
                continue
            wall = f.seconds if isinstance(f, Proc) else f
            cpu = f" (CPU {f.cpu:.2f} s)" if isinstance(f, Proc) else ""
            cells.append(_s(wall) + cpu)
            per.append(f"{wall / r.n * 1e6:.0f} µs")
        rows.append([*cells, " / ".join(per)])

    line("sync-worker backfill, PostgreSQL: initial load", [r.median(r.pg, 0) for r in runs])
    line("sync-worker backfill, PostgreSQL: unchanged re-pass", [r.median(r.pg, 1) for r in runs])
    line("sync-worker backfill, SQLite: initial load",
         [r.median(r.sqlite, 0) if r.sqlite else None for r in runs])  # fmt: skip
    line("sync-worker backfill, SQLite: unchanged re-pass",
         [r.median(r.sqlite, 1) if r.sqlite else None for r in runs])  # fmt: skip
    line("dlt merge (3 tables): first run", [r.dlt[0] if r.dlt else None for r in runs])
    line("dlt merge (3 tables): unchanged re-run", [r.dlt[1] if r.dlt else None for r in runs])
    line("floor: COPY of the final rows into indexed tables",
         [statistics.median(r.copy_floor) for r in runs])  # fmt: skip
    line("floor: reading the source by COPY", [r.read_floor for r in runs])
    line("process start (`sync-worker backfill --help`)", [r.start_floor for r in runs])
    return table(headers, rows)


def _ratio_row(
    what: str,
    figure: float,
    base: float,
    target: float,
    base_text: str,
    note: str = "",
    ratio: float | None = None,
) -> list[object]:
    ratio = figure / base if ratio is None else ratio
    met = "yes" if ratio <= target else "NO"
    shown = _s if figure >= 0.1 else _us  # per-user figures in microseconds
    return [what, shown(figure), f"{shown(base)} {base_text}", f"{ratio:.2f}x",
            f"≤ {target:g}x", met, note]  # fmt: skip


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def target_rows(runs: Sequence[SizeRun]) -> list[list[object]]:
    small, big = runs[0], runs[-1]
    n = f"{big.n:,}"
    load, again = big.median(big.pg, 0), big.median(big.pg, 1)
    floor = statistics.median(big.copy_floor)
    # Each load's COPY floor is measured right after it, in its database: the ratio is the
    # median of those pairs' ratios.
    pair_ratio = statistics.median(
        pair[0].seconds / f for pair, f in zip(big.pg, big.copy_floor, strict=True)
    )
    rows = [
        _ratio_row(f"Initial load, {n} users, PostgreSQL", load.seconds, floor, TARGET_FLOOR,
                   "COPY floor", _pairs(big.pg, 0, big.copy_floor), pair_ratio),
        _ratio_row(f"Unchanged re-pass, {n} users, PostgreSQL", again.seconds, big.read_floor,
                   TARGET_READ, "reading the source", _start_note(big, again)),
    ]  # fmt: skip
    if big.dlt:
        rows += [
            _ratio_row(f"Initial load vs dlt merge, {n}", load.seconds, big.dlt[0].seconds,
                       TARGET_DLT_LOAD, "dlt"),
            _ratio_row(f"Unchanged re-pass vs dlt re-run, {n}", again.seconds,
                       big.dlt[1].seconds, TARGET_DLT_UNCHANGED, "dlt"),
        ]  # fmt: skip
    for name, pick in (("PostgreSQL", "pg"), ("SQLite", "sqlite")):
        for which, label in ((0, "initial load"), (1, "unchanged re-pass")):
            lows, highs = getattr(small, pick), getattr(big, pick)
            if not lows or not highs:
                continue
            lo, hi = small.median(lows, which), big.median(highs, which)
            rows.append(
                _ratio_row(
                    f"Linear: {name} {label}, per user at {n} vs {small.n:,}",
                    hi.per_user_us(big.n) / 1e6,
                    lo.per_user_us(small.n) / 1e6,
                    TARGET_LINEAR,
                    f"per user at {small.n:,}",
                    _cycle_note(lo, hi),
                )
            )
    if big.naive_seconds:
        naive_rate = big.naive_users / big.naive_seconds
        rate = big.n / load.seconds
        ratio = rate / naive_rate
        rows.append(["Initial load vs naive per-row ORM loop (users/s)", f"{rate:,.0f}/s",
                     f"{naive_rate:,.0f}/s naive, {big.naive_users:,} users and sessions",
                     f"{ratio:.1f}x", f"≥ {TARGET_NAIVE:g}x",
                     "yes" if ratio >= TARGET_NAIVE else "NO", ""])  # fmt: skip
    if big.latency:
        one, flush = percentile(big.latency[1], 0.99), percentile(big.latency[0], 0.99)
        rows.append(["Batch of 1, p99 apply latency (PostgreSQL)", f"{one:.1f} ms",
                     f"{flush:.1f} ms p99 one-row INSERT, committed", f"{one / flush:.2f}x",
                     f"≤ {TARGET_P99_ONE_MS:g} ms", "yes" if one <= TARGET_P99_ONE_MS else "NO",
                     f"{big.n:,} users stored; commit included; after a CHECKPOINT"])  # fmt: skip
    rss_small, rss_big = small.median(small.pg, 0).maxrss_kb, load.maxrss_kb
    rows.append([f"Peak RSS of the initial load, {n} vs {small.n:,}",
                 f"{rss_big / 1024:.0f} MiB", f"{rss_small / 1024:.0f} MiB",
                 f"{rss_big / rss_small:.2f}x", "flat", "",
                 "the 1M vs 100k target is measured by bench/pull.py --only memory"])  # fmt: skip
    return rows


def _start_note(run: SizeRun, again: Proc) -> str:
    """How much of the re-pass is the process starting (context, not a target)."""
    if not run.start_floor:
        return ""
    rest = again.seconds - run.start_floor
    return (
        f"process start alone (`sync-worker backfill --help`, best of 3): "
        f"{_s(run.start_floor)} = {run.start_floor / run.read_floor:.2f}x the floor; "
        f"the pass after it: {_s(rest)} = {rest / run.read_floor:.2f}x"
    )


def _pairs(runs: list[tuple[Proc, Proc]], which: int, floors: list[float]) -> str:
    if len(runs) < 2:
        return ""
    ratios = [pair[which].seconds / f for pair, f in zip(runs, floors, strict=True)]
    return "pairs (a load, then its floor): " + " / ".join(f"{r:.2f}x" for r in ratios)


def _cycle_note(lo: Proc, hi: Proc) -> str:
    def ends(proc: Proc) -> str:
        if len(proc.cycles) < 4:
            return "—"
        k = max(1, len(proc.cycles) // 10)
        first, last = statistics.mean(proc.cycles[:k]), statistics.mean(proc.cycles[-k:])
        return f"{first * 1000:.0f}→{last * 1000:.0f} ms"

    return f"page cycle first→last tenth: {ends(lo)} (small), {ends(hi)} (large)"


def latency_table(run: SizeRun) -> str:
    rows: list[list[object]] = []
    for size, times in run.latency.items():
        name = f"{size}" if size else "floor: one-row INSERT, committed"
        per = f"{percentile(times, 0.5) / size:.2f} ms" if size else ""
        rows.append([name, f"{len(times)}", f"{percentile(times, 0.5):.1f} ms",
                     f"{percentile(times, 0.99):.1f} ms", per])  # fmt: skip
    return table(["changes per batch", "batches", "p50", "p99", "p50 per change"], rows)


def render(runs: Sequence[SizeRun], opts: argparse.Namespace, seconds: float) -> str:
    big = runs[-1]
    intro = (
        "Whole `sync-worker backfill --provider authjs --full` processes from an "
        "`@auth/pg-adapter` database (one account and one live session per user) into a "
        "fresh worker database, against floors and dlt measured in the same run. Figures are "
        f"the median of {opts.repeat} run(s) (the faster middle one of an even count); the "
        "initial load's ratio to its COPY floor is the median of each load's ratio to the "
        "floor measured right after it. The machine has 2 cores shared with other work "
        f"(load average {opts.load_before:.1f} at the start of this run, "
        f"{os.getloadavg()[0]:.1f} at its end): wall times run above the CPU times shown, "
        "and have varied by 2x from run to run."
    )
    parts = [
        "## Auth.js at scale (`bench/authjs_scale.py`)",
        intro,
        process_table(runs),
        table(
            ["Measurement", "Figure", "Baseline", "Ratio", "Target", "Met", "Notes"],
            target_rows(runs),
        ),
    ]
    if big.latency:
        parts += [
            f"Webhook-sized batches on PostgreSQL, {big.n:,} users stored; each batch renames "
            "k users (user, profile, identity and audit rows written), one transaction each:",
            latency_table(big),
        ]
    parts.append(f"_{'quick' if opts.quick else 'full'} run, {seconds:.0f} s_")
    return "\n\n".join(parts)


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    configure("warning")
    opts.load_before = os.getloadavg()[0]
    sizes: tuple[int, ...] = (2_000, 10_000) if opts.quick else (10_000, 100_000)
    if opts.sizes:
        sizes = tuple(int(s) for s in opts.sizes.split(","))
    started = time.perf_counter()
    runs = [bench_size(n, opts, last=i == len(sizes) - 1) for i, n in enumerate(sizes)]
    markdown = render(runs, opts, time.perf_counter() - started)
    print(markdown)
    if not opts.no_write:
        write_section("authjs-scale", markdown)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2,000 and 10,000 users")
    parser.add_argument("--sizes", help="comma-separated sizes, smallest first")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--naive-users", type=int, default=NAIVE_USERS)
    parser.add_argument("--skip-dlt", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
