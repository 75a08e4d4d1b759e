"""The scheduler: tick arithmetic (tables), APScheduler's options, catch-up after downtime,
misfire grace, failing and slow jobs, shutdown, the daemon's readiness and ``status``.

Interval jobs run every second or so; every wait has a deadline, so a loaded machine makes
a test slower, not wrong.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apscheduler.triggers.cron import CronTrigger
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from db import ledger
from db.transaction import transaction
from sync_worker.changes import utcnow
from sync_worker.cli import main
from sync_worker.daemon.metrics import Metrics
from sync_worker.daemon.server import build
from sync_worker.jobs.registry import Planned, plan
from sync_worker.jobs.schedule import (
    Schedule,
    catch_up_tick,
    duration_text,
    interval_tick,
    next_interval_tick,
)
from sync_worker.status import render, with_jobs
from tests.scheduler_helpers import Probe, every, runs, scheduler, settings, ticks, wait_until


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


S = timedelta(seconds=1)
M = timedelta(minutes=1)
H = timedelta(hours=1)

# -- tick arithmetic (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "step", "tick"),
    [
        ("2026-11-28 12:03:17", 5 * M, "2026-11-28 12:00:00"),
        ("2026-11-28 12:05:00", 5 * M, "2026-11-28 12:05:00"),  # on a tick: that tick
        ("2026-11-28 12:04:59.999999", 5 * M, "2026-11-28 12:00:00"),
        ("2026-11-28 12:00:31", 30 * S, "2026-11-28 12:00:30"),
        ("2026-11-28 12:00:02.2", 1.5 * S, "2026-11-28 12:00:01.5"),  # epoch-aligned
        # 7 min does not divide an hour: 12:00 is 1795867200 s after the epoch, 120 s past a tick
        ("2026-11-28 12:00:00", 7 * M, "2026-11-28 11:58:00"),
        ("2026-11-28 23:59:59", 24 * H, "2026-11-28 00:00:00"),
    ],
)
def test_interval_ticks_are_aligned_to_the_epoch(now: str, step: timedelta, tick: str) -> None:
    assert interval_tick(at(now), step) == at(tick)
    assert next_interval_tick(at(now), step) == at(tick) + step


@pytest.mark.parametrize("step", [S, 1.5 * S, 7 * M, 5 * M, 24 * H])
def test_instances_started_apart_fire_at_the_same_ticks(step: timedelta) -> None:
    """The trigger an instance schedules fires at the ticks every instance computes,
    whenever the instance started."""
    trigger = Schedule(every=step).trigger()
    for started in (at("2026-11-28 12:00:00.3"), at("2026-11-28 12:03:41.123456")):
        fire = trigger.get_next_fire_time(None, started)
        assert fire == next_interval_tick(started, step)
        for _ in range(3):
            fire = trigger.get_next_fire_time(fire, fire)
            assert interval_tick(fire, step) == fire


@pytest.mark.parametrize(
    ("latest_due", "last_claimed", "now", "grace", "expected"),
    [
        # never run, a tick due a minute ago: run it now
        ("12:00", None, "12:01", H, "12:00"),
        # down for several intervals: one run, for the latest tick only
        ("12:00", "11:10", "12:03", H, "12:00"),
        # the latest tick ran (here or in another instance): nothing to catch up
        ("12:00", "12:00", "12:03", H, None),
        ("12:00", "12:05", "12:06", H, None),
        # older than the misfire grace: wait for the next tick
        ("03:17", "03:17", "12:00", H, None),
        ("03:17", None, "12:00", H, None),
        ("11:17", "10:17", "12:00", H, "11:17"),
        # no tick within the grace at all
        (None, None, "12:00", H, None),
    ],
)
def test_catch_up_decision(
    latest_due: str | None,
    last_claimed: str | None,
    now: str,
    grace: timedelta,
    expected: str | None,
) -> None:
    def day(t: str | None) -> datetime | None:
        return None if t is None else at(f"2026-11-28 {t}")

    got = catch_up_tick(day(latest_due), day(last_claimed), day(now) or at("2026-11-28"), grace)
    assert got == day(expected)


@pytest.mark.parametrize(
    ("schedule", "now", "within", "latest", "following"),
    [
        (Schedule(cron="17 3 * * *"), "03:30", H, "03:17", "2026-11-29 03:17"),
        (Schedule(cron="17 3 * * *"), "03:17", H, "03:17", "2026-11-29 03:17"),
        (Schedule(cron="17 3 * * *"), "05:00", H, None, "2026-11-29 03:17"),
        (Schedule(cron="17 3 * * *"), "05:00", 2 * H, "03:17", "2026-11-29 03:17"),
        (Schedule(cron="*/15 * * * *"), "12:14", H, "12:00", "2026-11-28 12:15"),
        (Schedule(every=5 * M), "12:07", H, "12:05", "2026-11-28 12:10"),
        (Schedule(every=24 * H), "12:07", H, None, "2026-11-29 00:00"),
    ],
)
def test_latest_and_next_tick(
    schedule: Schedule, now: str, within: timedelta, latest: str | None, following: str
) -> None:
    when = at(f"2026-11-28 {now}")
    expected = None if latest is None else at(f"2026-11-28 {latest}")
    assert schedule.latest_tick(when, within=within) == expected
    assert schedule.next_tick(when) == at(following)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30, "30s"), (300, "5m"), (5400, "90m"), (3600, "1h"), (86400, "1d"), (1.5, "1.5s")],
)
def test_durations_read_as_config_writes_them(seconds: float, text: str) -> None:
    assert duration_text(timedelta(seconds=seconds)) == text


def test_a_schedule_has_exactly_one_of_every_and_cron() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Schedule()
    with pytest.raises(ValueError, match="exactly one"):
        Schedule(every=M, cron="* * * * *")
    assert isinstance(Schedule(cron="17 3 * * *").trigger(), CronTrigger)


# -- APScheduler's options ----------------------------------------------------------------


@pytest.mark.parametrize(("grace", "seconds"), [(None, 3600), ("2m", 120), ("90s", 90)])
def test_every_job_sets_its_options_explicitly(
    engine: Engine, grace: str | None, seconds: int
) -> None:
    config = settings(**({} if grace is None else {"misfire_grace": grace}))
    instance = scheduler(engine, every(3600, Probe()), config=config)
    instance.start()
    try:
        job = instance.aps.get_job("probe")
        assert (job.misfire_grace_time, job.coalesce, job.max_instances) == (seconds, True, 1)
        assert str(job.trigger.timezone) == "UTC"
    finally:
        instance.shutdown(grace=1)


def test_the_plan_follows_the_config() -> None:
    config = settings(pull={"every": "1m"}, retention={"cron": "5 1 * * *", "enabled": False})
    planned = {p.job.name: p for p in plan(config)}
    assert list(planned) == [
        "pull",
        "reconcile",
        "backfill_profiles",
        "session_cleanup",
        "retention",
        "retry",
    ]
    assert planned["pull"].schedule == Schedule(every=M)
    assert planned["retention"].schedule == Schedule(cron="5 1 * * *")
    assert not planned["retention"].enabled
    assert planned["retry"].schedule == Schedule(every=30 * S)


# -- catch-up and misfire grace ----------------------------------------------------------


def away_from_ticks(step: timedelta, margin: float) -> datetime:
    """Now, once at least ``margin`` seconds past a tick and before the next one."""
    now = utcnow()
    since = (now - interval_tick(now, step)).total_seconds()
    until = (next_interval_tick(now, step) - now).total_seconds()
    if since < margin or until < margin + 15:
        time.sleep(max(0.0, margin - since) if since < margin else until + margin)
    return utcnow()


def seed_tick(db: Engine, job: str, scheduled_at: datetime) -> None:
    with transaction(db) as conn:
        assert ledger.claim_tick(conn, job, None, scheduled_at, instance="earlier", now=utcnow())
        ledger.finish_tick(
            conn,
            job,
            None,
            scheduled_at,
            instance="earlier",
            status=ledger.TickStatus.SUCCEEDED,
            now=utcnow(),
        )


def test_after_downtime_of_several_intervals_one_catch_up_run(engine: Engine) -> None:
    """Hourly job, last run five hours ago: one run at start, for the latest tick (some
    seconds late: APScheduler's default misfire grace of 1 s would drop it)."""
    now = away_from_ticks(H, margin=3)
    latest = interval_tick(now, H)
    seed_tick(engine, "probe", latest - 5 * H)
    probe = Probe()
    instance = scheduler(engine, every(3600, probe))
    instance.start()
    try:
        assert wait_until(lambda: len(runs(engine, "probe")) >= 1, timeout=15)
        time.sleep(1.5)  # room for a wrong second run
    finally:
        instance.shutdown(grace=5)
    assert probe.runs == [latest]
    assert [(t["scheduled_at"], t["status"]) for t in ticks(engine, "probe")] == [
        (latest - 5 * H, "succeeded"),
        (latest, "succeeded"),
    ]
    assert [r["status"] for r in runs(engine, "probe")] == ["succeeded"]


def test_no_catch_up_when_the_latest_tick_already_ran(engine: Engine) -> None:
    now = away_from_ticks(H, margin=1)
    seed_tick(engine, "probe", interval_tick(now, H))
    probe = Probe()
    instance = scheduler(engine, every(3600, probe))
    instance.start()
    time.sleep(2)
    instance.shutdown(grace=5)
    assert probe.runs == []
    assert runs(engine, "probe") == []


@pytest.mark.parametrize(("grace", "runs_it"), [("1h", True), ("2s", False)])
def test_a_late_fire_runs_within_the_misfire_grace_only(
    engine: Engine, grace: str, runs_it: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The instance believes it starts 1 s after the tick and schedules a catch-up; the fire
    comes several seconds after the tick, which the misfire grace decides about."""
    real = away_from_ticks(H, margin=5)
    tick = interval_tick(real, H)
    probe = Probe()
    instance = scheduler(
        engine,
        every(3600, probe),
        config=settings(misfire_grace=grace),
        clock=lambda: tick + timedelta(seconds=1),
    )
    instance.start()
    try:
        if runs_it:
            assert wait_until(lambda: bool(probe.runs), timeout=15)
        else:  # APScheduler says it dropped the fire
            assert wait_until(lambda: "was missed by" in caplog.text, timeout=15)
    finally:
        instance.shutdown(grace=5)
    assert probe.runs == ([tick] if runs_it else [])
    assert len(ticks(engine, "probe")) == (1 if runs_it else 0)


# -- failures, overruns, shutdown ---------------------------------------------------------


def test_a_failing_job_is_recorded_failed_and_the_scheduler_goes_on(engine: Engine) -> None:
    metrics = Metrics()
    steady = Probe(name="steady")
    instance = scheduler(
        engine, every(1, Probe(name="boom", fail="kaput")), every(1, steady), metrics=metrics
    )
    instance.start()
    try:
        assert wait_until(lambda: len(runs(engine, "boom")) >= 2, timeout=20)
        failures = len(runs(engine, "boom"))
        assert wait_until(lambda: len(steady.runs) >= failures + 1, timeout=10)
        age = instance.heartbeat_age()
        assert age is not None
        assert age < 2
    finally:
        instance.shutdown(grace=5)
    failed = runs(engine, "boom")
    assert {(r["status"], r["error"]) for r in failed} == {("failed", "RuntimeError: kaput")}
    assert all(r["finished_at"] is not None for r in failed)
    assert {t["status"] for t in ticks(engine, "boom")} == {"failed"}
    assert {r["status"] for r in runs(engine, "steady")} == {"succeeded"}
    text = metrics.render().decode()
    counted = _sample(text, 'sync_worker_job_runs_total{job="boom",status="failed"}')
    assert counted == len(failed)
    assert _sample(text, 'sync_worker_job_runs_total{job="steady",status="succeeded"}') >= 1


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the metrics")


def test_a_job_slower_than_its_interval_is_not_started_twice(engine: Engine) -> None:
    slow = Probe(name="slow", sleep=2.5)
    instance = scheduler(engine, every(1, slow))
    instance.start()
    try:
        assert wait_until(lambda: len(runs(engine, "slow")) >= 2, timeout=20)
    finally:
        instance.shutdown(grace=5)
    done = runs(engine, "slow")
    assert_no_overlap(done)
    # The ticks fired meanwhile were dropped, not queued: none is in the ledger.
    assert len(ticks(engine, "slow")) == len(done)


def assert_no_overlap(done: list[dict[str, Any]]) -> None:
    spans = sorted((r["started_at"], r["finished_at"] or utcnow()) for r in done)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, spans


def test_shutdown_waits_for_a_run_only_as_long_as_the_grace(engine: Engine) -> None:
    stuck = Probe(name="stuck", sleep=30)
    instance = scheduler(engine, every(1, stuck))
    instance.start()
    try:
        assert wait_until(lambda: bool(stuck.runs), timeout=10)
        began = time.monotonic()
        assert instance.shutdown(grace=1) is False
        assert time.monotonic() - began < 3
        assert instance.heartbeat_age() is None
    finally:
        # The run it gave up on ends here, not in a later test (whose output it would
        # join: its log line once broke a test that reads its own stderr).
        stuck.release.set()
        assert wait_until(lambda: all(r["finished_at"] for r in runs(engine, "stuck")), timeout=10)


def test_a_run_that_watches_stop_ends_at_shutdown(engine: Engine) -> None:
    patient = Probe(name="patient", sleep=60, stoppable=True)
    instance = scheduler(engine, every(1, patient))
    instance.start()
    assert wait_until(lambda: len(ticks(engine, "patient")) == 1, timeout=10)
    began = time.monotonic()
    assert instance.shutdown(grace=20) is True
    assert time.monotonic() - began < 5
    assert [t["status"] for t in ticks(engine, "patient")] == ["succeeded"]


# -- the daemon and status ------------------------------------------------------------------


def test_the_daemon_runs_the_scheduler_and_readyz_watches_it(engine: Engine) -> None:
    config = settings(retry={"every": "1s"}, **_all_off("retry"))
    daemon = build(config, engine)
    client = TestClient(daemon.app)
    before = client.get("/readyz").json()
    assert "scheduler: not running" in before["problems"]
    daemon.start()
    try:
        assert wait_until(lambda: client.get("/readyz").status_code == 200, timeout=10)
        assert wait_until(lambda: len(runs(engine, "retry")) >= 1, timeout=15)
    finally:
        daemon.shutdown(grace=5)
    assert "scheduler: not running" in client.get("/readyz").json()["problems"]
    text = client.get("/metrics").text
    assert 'sync_worker_job_runs_total{job="retry",status="succeeded"}' in text


def _all_off(*keep: str) -> dict[str, dict[str, object]]:
    names = ("pull", "reconcile", "backfill_profiles", "session_cleanup", "retention", "retry")
    return {n: {"every": "1h", "enabled": False} for n in names if n not in keep}


def test_status_shows_schedules_last_and_next_runs() -> None:
    planned = [
        Planned(Probe(name="retry"), Schedule(every=30 * S)),
        Planned(Probe(name="reconcile"), Schedule(cron="17 3 * * *")),
        Planned(Probe(name="retention"), Schedule(cron="41 4 * * *"), enabled=False),
    ]
    tick = {
        "job": "retry",
        "provider": None,
        "scheduled_at": "2026-11-28T12:00:00+00:00",
        "started_at": "2026-11-28T12:00:00+00:00",
        "finished_at": "2026-11-28T12:00:01+00:00",
        "status": "failed",
        "instance": "a",
        "run_id": None,
        "counts": {"requeued": 2},
        "error": "StoreUnavailable: gone",
    }
    base = {
        "users": {"total": 0, "deleted": 0},
        "profiles": 0,
        "identities": {},
        "inbox": {"failed": 1},
        "cursors": [],
        "runs": [],
        "ticks": [tick],
    }
    report = with_jobs(base, planned, at("2026-11-28 12:00:10"))
    assert "ticks" not in report
    assert [(j["job"], j["schedule"], j["next_run"]) for j in report["jobs"]] == [
        ("retry", "every 30s", "2026-11-28T12:00:30+00:00"),
        ("reconcile", "cron 17 3 * * *", "2026-11-29T03:17:00+00:00"),
        ("retention", "cron 41 4 * * *", None),
    ]
    text = render(report).splitlines()
    assert "inbox      failed=1" in text
    assert "  retry             every 30s          next 2026-11-28T12:00:30+00:00" in text
    assert (
        "    last 2026-11-28T12:00:00+00:00  -       failed    requeued=2  "
        "error: StoreUnavailable: gone"
    ) in text
    assert "  retention         cron 41 4 * * *    disabled" in text
    assert text.count("    last never") == 2


def test_status_command_reads_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AUTH0_DOMAIN", "STACK_PROJECT_ID", "AUTHJS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    config = tmp_path / "config.yaml"
    config.write_text("database: {url: sqlite:///x.db}\njobs:\n  retry: {every: 10s}\n")
    assert main(["--config", str(config), "migrate"]) == 0
    from db.connect import make_engine

    db = make_engine(url, schema="identity")
    instance = scheduler(db, every(1, Probe(name="retry")))
    instance.start()
    assert wait_until(lambda: len(ticks(db, "retry")) >= 1, timeout=10)
    instance.shutdown(grace=5)
    ticks_of_retry = [t["scheduled_at"].isoformat() for t in ticks(db, "retry")]
    db.dispose()
    capsys.readouterr()
    assert main(["--config", str(config), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    jobs = {j["job"]: j for j in report["jobs"]}
    assert jobs["retry"]["schedule"] == "every 10s"
    (tick,) = jobs["retry"]["last"]
    assert (tick["status"], tick["counts"]) == ("succeeded", {"ran": 1})
    assert tick["scheduled_at"] == ticks_of_retry[-1]
    assert datetime.fromisoformat(jobs["retry"]["next_run"]) > utcnow() - timedelta(seconds=1)
    assert jobs["pull"]["last"] == []
    assert main(["--config", str(config), "status"]) == 0
    out = capsys.readouterr().out
    assert "  retry             every 10s          next " in out
    assert f"    last {tick['scheduled_at']}  -       succeeded ran=1" in out
