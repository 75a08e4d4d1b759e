"""Engine benchmark: bulk sync throughput against a naive ORM loop and a COPY floor.

Run: ``.venv/bin/python bench/engine.py [--users N] [--dialect postgresql|sqlite|both]
[--batch-size 500]``. PostgreSQL runs in a throwaway database ``sw_bench_<random>`` on
127.0.0.1:5432 (dropped afterwards); SQLite in temporary files.

Records are Auth0-shaped users (~1 KB of JSON each) mapped by the real adapter
(``providers.auth0.to_change``), streamed in batches by a generator: nothing holds all N.
Timings count ``SyncEngine.apply`` only; generating and mapping the records is reported
apart. Phases, all in one run:

1. initial load (users + profiles + identities + audit), in a child process so that its peak
   RSS can be compared with a second child loading N/4 users (memory must be flat in N);
2. re-apply of the same records (must write nothing: asserted);
3. a full pass in which 10% of the users changed (asserted: exactly those are updated);
4. baseline A, the naive way: per user, query by id, create or update through the ORM,
   commit (on a subset, in a separate empty schema or file);
5. baseline B, the floor: the same final rows bulk-copied into empty tables (PostgreSQL
   ``COPY FROM STDIN``; SQLite has no COPY, so ``executemany`` in one transaction).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import Engine, func, select  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session  # noqa: E402

from bench.results import apply_batch, table, write_section  # noqa: E402
from db.connect import make_engine  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from db.tables import profiles, sync_audit, user_identities, user_sessions, users  # noqa: E402
from providers.auth0 import to_change  # noqa: E402
from sync_worker.changes import Source, UserChange, utcnow  # noqa: E402
from sync_worker.engine import PlanSettings, SyncEngine  # noqa: E402
from sync_worker.logging import configure  # noqa: E402
from sync_worker.runtime import allow_collector_pauses, tune_gc  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SCHEMA = "identity"
CHANGED_EVERY = 10  # every 10th user changes in phase 3
FLOOR_TABLES = ("users", "profiles", "user_identities", "sync_audit")
COUNTED = (users, profiles, user_identities, user_sessions, sync_audit)
MEMORY_FLAT = 1.25  # peak RSS at N over peak at N/4 counts as flat below this

# -- realistic records -------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)
GIVEN = ["María", "James", "Aiko", "Olu", "Priya", "Lars", "Chen", "Fatima", "Noah", "Zoë",
         "Mateo", "Ingrid", "Kwame", "Sofia", "Arjun", "Elif", "Liam", "Yuki", "Amara",
         "Tomás"]  # fmt: skip
FAMILY = ["López", "Smith", "Tanaka", "Adeyemi", "Sharma", "Nilsson", "Wang", "Haddad",
          "Müller", "Dubois", "Rossi", "Kowalski", "Okafor", "Silva", "Novak", "Kim"]  # fmt: skip
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "America/Sao_Paulo",
         "Africa/Lagos", "Asia/Kolkata", "Australia/Sydney"]  # fmt: skip
LOCALES = ["en-US", "es-ES", "de-DE", "ja-JP", "pt-BR", "fr-FR", "hi-IN", "sv-SE"]
CONNECTIONS = [("auth0", "Username-Password-Authentication", False),
               ("google-oauth2", "google-oauth2", True), ("github", "github", True),
               ("windowslive", "windowslive", True)]  # fmt: skip


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def raw_user(i: int, revision: int = 0) -> dict[str, Any]:
    """An Auth0 user object (~1 KB as JSON), the same for the same ``(i, revision)``."""
    rng = random.Random(i)
    given, family = rng.choice(GIVEN), rng.choice(FAMILY)
    provider, connection, social = CONNECTIONS[i % len(CONNECTIONS)]
    sub = f"{rng.getrandbits(96):024x}" if provider == "auth0" else str(rng.getrandbits(64))
    created = T0 - timedelta(days=rng.randint(30, 900), seconds=rng.randint(0, 86_400))
    updated = created + timedelta(days=rng.randint(1, 29)) + timedelta(days=revision)
    nick = f"{given}.{family}{i}".lower()
    identities = [{"provider": provider, "connection": connection, "user_id": sub,
                   "isSocial": social}]  # fmt: skip
    if i % 7 == 0:  # some users linked a second (GitHub) account
        github = {"email": f"{nick}@users.noreply.github.com"}
        identities.append(
            {
                "provider": "github",
                "connection": "github",
                "user_id": str(rng.getrandbits(40)),
                "isSocial": True,
                "profileData": github,
            }
        )
    return {
        "user_id": f"{provider}|{sub}",
        "email": f"{nick}@example.org",
        "email_verified": i % 11 != 0,
        "name": f"{given} {family}" + (" Jr." if revision else ""),
        "given_name": given,
        "family_name": family,
        "nickname": nick,
        "picture": f"https://s.gravatar.com/avatar/{rng.getrandbits(128):032x}?s=480&r=pg&d=https%3A%2F%2Fcdn.auth0.com%2Favatars%2F{given[:2].lower()}.png",
        "identities": identities,
        "user_metadata": {
            "locale": rng.choice(LOCALES),
            "timezone": rng.choice(ZONES),
            "newsletter": rng.random() < 0.3,
            "theme": ("dark", "light", "system")[(i + revision) % 3],
            "onboarding": {"completed": True, "steps": ["profile", "team", "billing"]},
        },
        "app_metadata": {
            "tenant_id": f"t_{rng.randint(1, 5000)}",
            "roles": [rng.choice(["member", "editor", "admin"])],
            "plan": rng.choice(["free", "pro", "team"]),
            "feature_flags": ["new-dashboard", "beta-export"][: rng.randint(0, 2)],
        },
        "created_at": _iso(created),
        "updated_at": _iso(updated),
        "last_login": _iso(updated - timedelta(minutes=5)),
        "last_ip": f"203.0.113.{rng.randint(1, 254)}",
        "logins_count": rng.randint(1, 400),
        "blocked": False,
    }


def change_batches(
    start: int, stop: int, size: int, *, changed_every: int = 0
) -> Iterator[list[UserChange]]:
    """Users ``start..stop`` in batches; with ``changed_every`` every k-th user is revised."""
    for first in range(start, stop, size):
        yield [
            to_change(raw_user(i, int(changed_every > 0 and i % changed_every == 0)))
            for i in range(first, min(first + size, stop))
        ]


# -- databases ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where one set of worker tables lives: a PostgreSQL schema or a SQLite file."""

    dialect: str
    url: str  # SQLAlchemy URL
    schema: str = SCHEMA

    def engine(self) -> Engine:
        return make_engine(self.url, schema=self.schema)

    def migrated(self) -> Engine:
        engine = self.engine()
        upgrade(engine, self.schema)
        return engine


@dataclass(slots=True)
class Place:
    """One dialect's scratch space: named targets for the engine, memory, naive and floor runs."""

    dialect: str
    libpq: str = ""  # PostgreSQL database URL (for COPY through psycopg)
    folder: Path | None = None

    def target(self, name: str) -> Target:
        if self.dialect == "postgresql":
            url = self.libpq.replace("postgresql://", "postgresql+psycopg://", 1)
            return Target("postgresql", url, SCHEMA if name == "engine" else f"bench_{name}")
        assert self.folder is not None
        return Target("sqlite", f"sqlite:///{self.folder / name}.db")


@contextmanager
def scratch(dialect: str) -> Iterator[Place]:
    if dialect == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="sw-bench-"))
        try:
            yield Place("sqlite", folder=folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    name = f"sw_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield Place("postgresql", libpq=PG_ADMIN.rpartition("/")[0] + f"/{name}")
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def row_counts(engine: Engine) -> dict[str, Any]:
    """Row counts plus the newest write stamps: any write at all moves one of them."""
    with engine.connect() as conn:
        out: dict[str, Any] = {t.name: conn.execute(select(func.count()).select_from(t)).scalar()
                               for t in COUNTED}  # fmt: skip
        out["users.updated_at"] = conn.execute(select(func.max(users.c.updated_at))).scalar()
        out["profiles.updated_at"] = conn.execute(select(func.max(profiles.c.updated_at))).scalar()
        out["identities.last_synced_at"] = conn.execute(
            select(func.max(user_identities.c.last_synced_at))
        ).scalar()
    return out


# -- timing the engine -------------------------------------------------------------------


@dataclass(slots=True)
class Phase:
    users: int
    seconds: float  # inside SyncEngine.apply only
    gen_seconds: float = 0.0  # generating and mapping the records
    counts: Counter[str] = field(default_factory=Counter)
    maxrss_kb: int = 0

    @property
    def rate(self) -> float:
        return self.users / self.seconds if self.seconds else float("inf")


def run_engine(engine: Engine, batches: Iterator[list[UserChange]], source: Source) -> Phase:
    sync = SyncEngine(PlanSettings())
    phase = Phase(users=0, seconds=0.0)
    mark = time.perf_counter()
    for batch in batches:
        started = time.perf_counter()
        phase.gen_seconds += started - mark
        result = apply_batch(engine, sync, batch, source)
        mark = time.perf_counter()
        phase.seconds += mark - started
        phase.users += len(batch)
        phase.counts.update(result.counts)
    return phase


def child_load(url: str, schema: str, n: int, batch_size: int) -> None:
    """Initial load in this (fresh) process; prints the phase and the peak RSS as JSON."""
    engine = Target("", url, schema).engine()
    phase = run_engine(engine, change_batches(0, n, batch_size), Source.BACKFILL)
    engine.dispose()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"users": phase.users, "seconds": phase.seconds,
                      "gen_seconds": phase.gen_seconds, "counts": phase.counts,
                      "maxrss_kb": maxrss}))  # fmt: skip


def load_in_child(target: Target, n: int, batch_size: int) -> Phase:
    args = [sys.executable, __file__, "--child-load", target.url, target.schema,
            str(n), str(batch_size)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"initial load failed:\n{done.stderr[-4000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Phase(data["users"], data["seconds"], data["gen_seconds"],
                 Counter(data["counts"]), data["maxrss_kb"])  # fmt: skip


# -- baseline A: the naive ORM loop ------------------------------------------------------


class Base(DeclarativeBase):
    pass


# Columns come from the Core tables (``__table__``); the annotations only type the attributes.
class User(Base):
    __table__ = users

    id: Mapped[uuid.UUID]
    email: Mapped[str | None]
    email_verified: Mapped[bool]
    name: Mapped[str | None]
    given_name: Mapped[str | None]
    family_name: Mapped[str | None]
    phone: Mapped[str | None]
    avatar_url: Mapped[str | None]
    role: Mapped[str]
    tenant_id: Mapped[str | None]
    blocked: Mapped[bool]
    last_login_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    deleted_at: Mapped[datetime | None]


class Profile(Base):
    __table__ = profiles

    id: Mapped[uuid.UUID]
    user_id: Mapped[uuid.UUID]
    display_name: Mapped[str | None]
    avatar_url: Mapped[str | None]
    timezone: Mapped[str]
    currency: Mapped[str]
    locale: Mapped[str]
    settings: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Identity(Base):
    __table__ = user_identities

    provider: Mapped[str]
    external_id: Mapped[str]
    user_id: Mapped[uuid.UUID]
    email: Mapped[str | None]
    upstream_updated_at: Mapped[datetime | None]
    content_hash: Mapped[str | None]
    raw: Mapped[dict[str, Any] | None]
    first_seen_at: Mapped[datetime]
    last_synced_at: Mapped[datetime]
    deleted_at: Mapped[datetime | None]


class Audit(Base):
    __table__ = sync_audit

    id: Mapped[int]
    occurred_at: Mapped[datetime]
    run_id: Mapped[uuid.UUID | None]
    source: Mapped[str]
    provider: Mapped[str]
    external_id: Mapped[str | None]
    user_id: Mapped[uuid.UUID | None]
    action: Mapped[str]
    changes: Mapped[dict[str, Any] | None]
    event_id: Mapped[str | None]
    error: Mapped[str | None]


_USER_FIELDS = ("email", "email_verified", "name", "given_name", "family_name", "phone",
                "avatar_url", "blocked", "last_login_at")  # fmt: skip


def naive_apply(session: Session, change: UserChange) -> None:
    """What the apps' sync code does: look the user up, create or update, commit."""
    attrs, now = change.attributes, utcnow()
    assert attrs is not None
    found = session.scalars(
        select(Identity).where(
            Identity.provider == change.provider, Identity.external_id == change.external_id
        )
    ).one_or_none()
    fields = {f: getattr(attrs, f) for f in _USER_FIELDS}
    user: User | None
    if found is None:
        user = naive_create(session, change, fields, now)
        action = "created"
    else:
        user = session.get(User, found.user_id)
        assert user is not None  # the identity's user_id is a foreign key to users
        for name, value in fields.items():
            setattr(user, name, value)
        user.updated_at = now
        found.raw, found.last_synced_at = dict(change.raw or {}), now
        action = "updated"
    audit = Audit(occurred_at=now, source="backfill", provider=change.provider,
                  external_id=change.external_id, user_id=user.id, action=action)  # fmt: skip
    session.add(audit)
    session.commit()


def naive_create(
    session: Session, change: UserChange, fields: dict[str, Any], now: datetime
) -> User:
    attrs = change.attributes
    assert attrs is not None
    user = User(id=uuid.uuid4(), role=attrs.role or "member", tenant_id=attrs.tenant_id,
                created_at=attrs.created_at or now, updated_at=now, **fields)  # fmt: skip
    session.add(user)
    session.flush()  # the user row first, as the apps do, then what hangs off it
    app = attrs.profile
    profile = Profile(id=uuid.uuid4(), user_id=user.id, display_name=attrs.name,
                      avatar_url=attrs.avatar_url, timezone=app.get("timezone", "UTC"),
                      currency="USD", locale=app.get("locale", "en"), settings={},
                      created_at=now, updated_at=now)  # fmt: skip
    identity = Identity(provider=change.provider, external_id=change.external_id,
                        user_id=user.id, email=attrs.email, upstream_updated_at=change.version,
                        raw=dict(change.raw or {}), first_seen_at=now,
                        last_synced_at=now)  # fmt: skip
    session.add_all([profile, identity])
    return user


def run_naive(engine: Engine, n: int) -> Phase:
    phase = Phase(users=0, seconds=0.0)
    with Session(engine) as session:
        for batch in change_batches(0, n, 500):
            started = time.perf_counter()
            for change in batch:
                naive_apply(session, change)
            phase.seconds += time.perf_counter() - started
            phase.users += len(batch)
    return phase


# -- baseline B: the bulk-copy floor -----------------------------------------------------


def export_pg(place: Place, folder: Path) -> None:
    """Dump the engine's rows after the initial load (untimed), in COPY's binary format."""
    with psycopg.connect(place.libpq) as conn, conn.cursor() as cur:
        for name in FLOOR_TABLES:
            with (
                (folder / f"{name}.copy").open("wb") as out,
                cur.copy(f'COPY "{SCHEMA}".{name} TO STDOUT (FORMAT BINARY)') as copy,
            ):
                for block in copy:
                    out.write(block)


def floor_pg(place: Place, folder: Path) -> float:
    """Time COPY FROM STDIN of those files into empty tables, in one transaction."""
    place.target("floor").migrated().dispose()
    with psycopg.connect(place.libpq) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        for name in FLOOR_TABLES:
            with (
                (folder / f"{name}.copy").open("rb") as src,
                cur.copy(f"COPY bench_floor.{name} FROM STDIN (FORMAT BINARY)") as copy,
            ):
                while block := src.read(1 << 20):
                    copy.write(block)
        conn.commit()
        return time.perf_counter() - started


def floor_sqlite(place: Place) -> float:
    """Time executemany of the engine's rows into empty tables, in one transaction."""
    place.target("floor").migrated().dispose()
    assert place.folder is not None
    src = sqlite3.connect(place.folder / "engine.db")
    dst = sqlite3.connect(place.folder / "floor.db", isolation_level=None)
    for pragma in ("foreign_keys = ON", "journal_mode = WAL", "synchronous = NORMAL"):
        dst.execute(f"PRAGMA {pragma}")
    seconds = 0.0
    dst.execute("BEGIN")
    for name in FLOOR_TABLES:
        cursor = src.execute(f"SELECT * FROM {name}")
        marks = ",".join("?" * len(cursor.description))
        while rows := cursor.fetchmany(5000):
            started = time.perf_counter()
            dst.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)
            seconds += time.perf_counter() - started
    started = time.perf_counter()
    dst.execute("COMMIT")
    seconds += time.perf_counter() - started
    src.close()
    dst.close()
    return seconds


# -- one dialect, all phases -------------------------------------------------------------


@dataclass(slots=True)
class Report:
    dialect: str
    n: int
    load: Phase
    small: Phase
    reapply: Phase
    changed: Phase
    naive: Phase
    floor_seconds: float
    rows: dict[str, Any]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def bench_dialect(dialect: str, n: int, batch_size: int, naive_n: int) -> Report:
    with scratch(dialect) as place:
        engine_t, mem_t = place.target("engine"), place.target("memory")
        engine_t.migrated().dispose()
        mem_t.migrated().dispose()
        say(f"{dialect}: initial load of {n:,} users (child process)")
        load = load_in_child(engine_t, n, batch_size)
        assert load.counts == Counter(created=n), load.counts
        say(f"{dialect}: initial load of {n // 4:,} users (memory comparison)")
        small = load_in_child(mem_t, n // 4, batch_size)
        folder = Path(tempfile.mkdtemp(prefix="sw-bench-copy-"))
        try:
            if dialect == "postgresql":
                export_pg(place, folder)
            engine = engine_t.engine()
            reapply, changed, rows = _resync(engine, n, batch_size)
            engine.dispose()
            say(f"{dialect}: baseline A, naive ORM loop on {naive_n:,} users")
            naive_engine = place.target("naive").migrated()
            naive = run_naive(naive_engine, naive_n)
            naive_engine.dispose()
            say(f"{dialect}: baseline B, bulk-copy floor")
            floor = floor_pg(place, folder) if dialect == "postgresql" else floor_sqlite(place)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return Report(dialect, n, load, small, reapply, changed, naive, floor, rows)


def _resync(engine: Engine, n: int, batch_size: int) -> tuple[Phase, Phase, dict[str, Any]]:
    before = row_counts(engine)
    assert before["users"] == n, before
    assert before["sync_audit"] == n, before
    say("re-apply of the same records")
    reapply = run_engine(engine, change_batches(0, n, batch_size), Source.PULL)
    after = row_counts(engine)
    assert after == before, f"re-apply wrote something: {before} -> {after}"
    assert reapply.counts == Counter(unchanged=n), reapply.counts
    say("full pass with 10% of the users changed")
    changed = run_engine(
        engine, change_batches(0, n, batch_size, changed_every=CHANGED_EVERY), Source.PULL
    )
    revised = len(range(0, n, CHANGED_EVERY))
    final = row_counts(engine)
    assert changed.counts == Counter(unchanged=n - revised, updated=revised), changed.counts
    assert final["sync_audit"] == before["sync_audit"] + revised, final
    return reapply, changed, before


# -- reporting ---------------------------------------------------------------------------


FLOOR_METHOD = {
    "postgresql": "COPY FROM STDIN, binary format",
    "sqlite": "executemany in one transaction (SQLite has no COPY)",
}


def dialect_table(r: Report, batch_size: int) -> str:
    def line(phase: str, users: int, seconds: float, note: str) -> list[object]:
        return [phase, f"{users:,}", f"{seconds:.2f}", f"{users / seconds:,.0f}", note]

    mapped = f"{r.rows['user_identities']:,} identities; mapping took {r.load.gen_seconds:.1f} s"
    rows = [
        line("1. initial load (user+profile+identity+audit)", r.n, r.load.seconds, mapped),
        line("2. re-apply unchanged", r.n, r.reapply.seconds,
             "asserted: no audit rows, counts and write stamps unchanged"),
        line("3. full pass, 10% changed", r.n, r.changed.seconds,
             f"{r.changed.counts['updated']:,} updated"),
        line("4. baseline A: naive ORM, commit per user", r.naive.users, r.naive.seconds,
             "subset, separate empty tables"),
        line(f"5. baseline B: {FLOOR_METHOD[r.dialect]}", r.n, r.floor_seconds,
             "final rows of phase 1, into empty indexed tables"),
    ]  # fmt: skip
    head = f"**{r.dialect}**, N = {r.n:,}, batch size {batch_size}"
    mem = (f"Peak RSS of the initial load: {r.load.maxrss_kb / 1024:,.0f} MiB at N, "
           f"{r.small.maxrss_kb / 1024:,.0f} MiB at N/4.")  # fmt: skip
    return "\n\n".join([head, table(["phase", "users", "seconds", "users/s", "note"], rows), mem])


def ratios(r: Report) -> list[tuple[str, float, str, bool]]:
    vs_naive = r.load.rate / r.naive.rate
    vs_floor = r.load.seconds / r.floor_seconds
    reapply = r.reapply.rate / r.load.rate
    memory = r.load.maxrss_kb / r.small.maxrss_kb
    return [
        ("initial load vs baseline A (users/s)", vs_naive, "≥ 25x", vs_naive >= 25),
        ("initial load time / COPY floor time", vs_floor, "≤ 3x", vs_floor <= 3),
        ("re-apply speed / initial load speed", reapply, "≥ 3x", reapply >= 3),
        ("peak RSS at N / at N/4", memory, f"flat (< {MEMORY_FLAT})", memory < MEMORY_FLAT),
    ]


def ratio_table(reports: list[Report]) -> str:
    names = [name for name, *_ in ratios(reports[0])]
    rows: list[list[object]] = []
    for index, name in enumerate(names):
        row: list[object] = [name]
        target = ""
        for r in reports:
            _, value, target, met = ratios(r)[index]
            row.append(f"{value:.2f}x ({'met' if met else 'MISSED'})")
        rows.append([*row, target])
    return table(["ratio", *[r.dialect for r in reports], "target"], rows)


def render(reports: list[Report], batch_size: int) -> str:
    note = (
        "Times count `SyncEngine.apply` only (mapping the Auth0-shaped ~1 KB records "
        "through `providers.auth0.to_change` is listed apart). One batch, one transaction."
    )
    parts = ["## Engine (bench/engine.py)", note]
    parts += [dialect_table(r, batch_size) for r in reports]
    parts.append(ratio_table(reports))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tune_gc()  # as the console script does
    allow_collector_pauses()  # as its one-shot commands do
    configure("warning")
    if args.child_load:
        url, schema, n, size = args.child_load
        child_load(url, schema, int(n), int(size))
        return
    dialects = ["postgresql", "sqlite"] if args.dialect == "both" else [args.dialect]
    naive_n = min(args.naive_users, args.users)
    reports = [bench_dialect(d, args.users, args.batch_size, naive_n) for d in dialects]
    markdown = render(reports, args.batch_size)
    print(markdown)
    if not args.no_write:
        write_section("engine", markdown)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--dialect", choices=["postgresql", "sqlite", "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--naive-users", type=int, default=5_000)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--child-load", nargs=4, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
