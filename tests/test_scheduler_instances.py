"""Several instances on one database: each tick runs exactly once, an overrunning job is
never started twice, and when one instance stops the others carry on.

Two schedulers in this process (separate sessions: on PostgreSQL the advisory lock and the
ledger are all they share), then two real ``sync-worker run`` processes on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from db.connect import make_engine
from db.migrate import upgrade
from sync_worker.changes import utcnow
from sync_worker.daemon.scheduler import Scheduler
from sync_worker.jobs.base import Job
from sync_worker.jobs.ticks import PREVIOUS_RUNNING, TAKEN, Outcome
from tests.conftest import SCHEMA, sqlalchemy_url
from tests.scheduler_helpers import Probe, every, runs, scheduler, ticks, wait_until
from tests.test_scheduler import assert_no_overlap

Fired = list[tuple[str, datetime, str]]  # (instance, tick, status)


def spy(monkeypatch: pytest.MonkeyPatch, instance: Scheduler, fired: Fired) -> None:
    """Record every tick the instance fires and what became of it there."""
    original = instance.ticks.run
    guard = threading.Lock()

    def run(job: Job, scheduled_at: datetime) -> list[Outcome]:
        outcomes = original(job, scheduled_at)
        with guard:
            fired.extend((instance.instance, o.scheduled_at, o.status) for o in outcomes)
        return outcomes

    monkeypatch.setattr(instance.ticks, "run", run)


def test_two_instances_run_each_tick_once(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    fired: Fired = []
    a = scheduler(engine, every(1, Probe()))
    b = scheduler(engine, every(1, Probe()))
    for instance in (a, b):
        spy(monkeypatch, instance, fired)
        instance.start()
    try:
        assert wait_until(lambda: len(_contended(fired)) >= 3, timeout=20)
    finally:
        a.shutdown(grace=5)
    stopped = utcnow()
    try:
        assert wait_until(lambda: len(_after(ticks(engine, "probe"), stopped)) >= 2, timeout=20)
    finally:
        b.shutdown(grace=5)

    # Each tick was claimed by one instance (the other found it taken), in the ledger too.
    ledger_rows = ticks(engine, "probe")
    status_of = {t["scheduled_at"]: t["status"] for t in ledger_rows}
    claimed: dict[datetime, list[str]] = defaultdict(list)
    for _, tick, status in fired:
        if status != TAKEN:
            claimed[tick].append(status)
    assert claimed == {tick: [status] for tick, status in status_of.items()}
    for tick, statuses in _contended(fired).items():
        assert sorted(statuses) == sorted([status_of[tick], TAKEN]), tick
    # One sync_runs row per tick run ("skipped": the other instance's run was still going).
    ran = [t for t in ledger_rows if t["status"] != "skipped"]
    assert {t["status"] for t in ran} == {"succeeded"}
    done = runs(engine, "probe")
    assert sorted(str(r["id"]) for r in done) == sorted(str(t["run_id"]) for t in ran)
    # Once A stopped, B ran every tick.
    assert {t["instance"] for t in _after(ledger_rows, stopped)} == {b.instance}


def _contended(fired: Fired) -> dict[datetime, list[str]]:
    """The ticks both instances fired, with each one's outcome."""
    by_tick: dict[datetime, dict[str, str]] = defaultdict(dict)
    for instance, tick, status in fired:
        by_tick[tick][instance] = status
    return {tick: list(seen.values()) for tick, seen in by_tick.items() if len(seen) == 2}


def _after(rows: list[dict[str, Any]], moment: datetime) -> list[dict[str, Any]]:
    return [t for t in rows if t["scheduled_at"] > moment]


def test_an_overrunning_job_is_not_started_twice_across_instances(engine: Engine) -> None:
    """Runs of 2.5 s every second on two instances: a tick claimed while the other instance
    still runs the job is skipped, and no two runs ever overlap."""
    a = scheduler(engine, every(1, Probe(name="slow", sleep=2.5)))
    b = scheduler(engine, every(1, Probe(name="slow", sleep=2.5)))
    a.start()
    b.start()

    def skipped() -> list[dict[str, Any]]:
        return [t for t in ticks(engine, "slow") if t["status"] == "skipped"]

    try:
        assert wait_until(lambda: len(runs(engine, "slow")) >= 2 and bool(skipped()), timeout=25)
    finally:
        a.shutdown(grace=5)
        b.shutdown(grace=5)
    done = runs(engine, "slow")
    assert_no_overlap(done)
    ran = [t for t in ticks(engine, "slow") if t["status"] == "succeeded"]
    assert len(ran) == len(done)
    assert {t["error"] for t in skipped()} == {PREVIOUS_RUNNING}


# -- two real daemons ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """``sync-worker run`` in a process of its own, its JSON log lines in a file."""

    def __init__(self, config: Path, url: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._stderr = log.open("w")
        env = {**os.environ, "DATABASE_URL": url, "SYNC_WORKER_PORT": str(self.port)}
        for name in ("AUTH0_DOMAIN", "STACK_PROJECT_ID", "AUTHJS_DATABASE_URL"):
            env.pop(name, None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sync_worker", "--config", str(config), "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._stderr.close()


CONFIG = """\
database: {url: "sqlite:///unused.db"}
logging: {level: debug, format: json}
server: {port: "${SYNC_WORKER_PORT}", grace_seconds: 5}
jobs:
  retry: {every: 1s}
"""
OFF = ("pull", "reconcile", "backfill_profiles", "session_cleanup", "retention")


@pytest.mark.postgres
def test_two_daemons_share_the_ticks_and_one_carries_on_alone(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    url = make_pg_database()
    db = make_engine(sqlalchemy_url(url), schema=SCHEMA)
    upgrade(db, SCHEMA)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG + "".join(f"  {n}: {{every: 1h, enabled: false}}\n" for n in OFF))
    a = Daemon(config, url, tmp_path / "a.log")
    b = Daemon(config, url, tmp_path / "b.log")
    try:
        # Both up: each answers /readyz (its scheduler's heartbeat is fresh).
        up = wait_until(lambda: a.ready() and b.ready(), timeout=60, step=0.3)
        assert up, a.log.read_text()[-2000:] + b.log.read_text()[-2000:]
        both_up = utcnow()
        assert wait_until(lambda: len(_after(ticks(db, "retry"), both_up)) >= 4, timeout=20)
        assert a.stop() == 0
        a_gone = utcnow()
        assert wait_until(lambda: len(_after(ticks(db, "retry"), a_gone)) >= 3, timeout=20)
        assert b.stop() == 0
    finally:
        a.kill()
        b.kill()
    ledger_rows = ticks(db, "retry")
    done = runs(db, "retry")
    db.dispose()

    # Exactly once: one sync_runs row for each tick, none for a tick run twice.
    assert [t["status"] for t in ledger_rows] == ["succeeded"] * len(ledger_rows)
    assert sorted(str(r["id"]) for r in done) == sorted(str(t["run_id"]) for t in ledger_rows)
    # The logs agree: no tick finished in both processes, and the two contended for ticks.
    finished = {
        pid: {e["tick"] for e in d.events("job_finished")} for pid, d in (("a", a), ("b", b))
    }
    taken = {
        pid: {e["tick"] for e in d.events("job_tick_taken")} for pid, d in (("a", a), ("b", b))
    }
    assert not finished["a"] & finished["b"]
    assert (taken["a"] & finished["b"]) or (taken["b"] & finished["a"])
    assert {datetime.fromisoformat(t) for t in finished["a"] | finished["b"]} == {
        t["scheduled_at"] for t in ledger_rows
    }
    # After A stopped, B ran every tick, each once.
    after = _after(ledger_rows, a_gone)
    assert len({t["instance"] for t in after}) == 1
    assert {t["instance"].split(":")[1] for t in after} == {str(b.process.pid)}
