"""The run ledger and the jobs: claims, locks, the migration, and what each job does when
one tick runs it (``TickRunner``), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, insert, inspect, select

from db import ledger
from db.connect import make_engine
from db.ledger import TickStatus
from db.migrate import alembic_config, head_revision, upgrade
from db.runs import ABANDONED as ABANDONED_RUN
from db.runs import start_run
from db.tables import sync_audit, sync_inbox, user_sessions, users
from db.transaction import transaction
from sync_worker.changes import utcnow
from sync_worker.config import JobsSettings, Settings, settings_from_mapping
from sync_worker.daemon.metrics import Metrics
from sync_worker.jobs.base import JobStopped
from sync_worker.jobs.pulls import PullJob, ReconcileJob, StopBetweenPages
from sync_worker.jobs.registry import all_jobs
from sync_worker.jobs.retry import LEDGER_RETENTION, RetryJob
from sync_worker.jobs.ticks import PREVIOUS_RUNNING, TAKEN, TickRunner
from tests.conftest import SCHEMA
from tests.fakes.stack import StackFake
from tests.scheduler_helpers import Probe, runs, settings, ticks

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

# -- the ledger ------------------------------------------------------------------------------


def claim(db: Engine, job: str, provider: str | None, at: datetime, instance: str) -> bool:
    with transaction(db) as conn:
        return ledger.claim_tick(conn, job, provider, at, instance=instance, now=utcnow())


def test_each_tick_is_claimed_once(engine: Engine) -> None:
    assert claim(engine, "pull", "stack", T0, "a") is True
    assert claim(engine, "pull", "stack", T0, "b") is False
    assert claim(engine, "pull", "auth0", T0, "b") is True  # another provider: its own tick
    assert claim(engine, "pull", "stack", T0 + timedelta(minutes=5), "b") is True
    assert claim(engine, "retry", None, T0, "a") is True
    assert claim(engine, "retry", None, T0, "b") is False
    rows = {(t["job"], t["provider"], t["scheduled_at"]): t for t in ticks(engine, "pull")}
    assert rows[("pull", "stack", T0)]["instance"] == "a"
    assert rows[("pull", "stack", T0)]["status"] == "running"
    assert ticks(engine, "retry")[0]["provider"] == ""


def test_finish_and_last_ticks(engine: Engine) -> None:
    for minutes, instance in ((0, "a"), (5, "b")):
        assert claim(engine, "pull", "stack", T0 + timedelta(minutes=minutes), instance)
    assert claim(engine, "retry", None, T0, "a")
    with transaction(engine) as conn:
        assert ledger.finish_tick(
            conn,
            "pull",
            "stack",
            T0 + timedelta(minutes=5),
            instance="b",
            status=TickStatus.FAILED,
            now=T0 + timedelta(minutes=6),
            error="Boom:\n  line two",
        )
        # only the instance that claimed a tick records its end
        assert not ledger.finish_tick(
            conn, "retry", None, T0, instance="b", status=TickStatus.SUCCEEDED, now=T0
        )
        latest = ledger.last_ticks(conn)
        assert ledger.last_scheduled(conn, "pull") == T0 + timedelta(minutes=5)
        assert ledger.last_scheduled(conn, "reconcile") is None
    assert [(t.job, t.provider, t.scheduled_at, t.status) for t in latest] == [
        ("pull", "stack", T0 + timedelta(minutes=5), "failed"),
        ("retry", None, T0, "running"),
    ]
    assert latest[0].error == "Boom: line two"
    assert latest[0].finished_at == T0 + timedelta(minutes=6)


def test_old_ticks_are_purged(engine: Engine) -> None:
    for days in (40, 31, 29, 0):
        assert claim(engine, "retry", None, T0 - timedelta(days=days), "a")
    with transaction(engine) as conn:
        assert ledger.purge_ticks(conn, before=T0 - LEDGER_RETENTION) == 2
    assert [t["scheduled_at"] for t in ticks(engine, "retry")] == [
        T0 - timedelta(days=29),
        T0,
    ]


def test_the_job_lock_is_held_once(engine: Engine) -> None:
    with ledger.job_lock(engine, "pull", "stack") as first:
        assert first is True
        assert _from_another_thread(engine, "pull", "stack") is False
        assert _from_another_thread(engine, "pull", "auth0") is True
    assert _from_another_thread(engine, "pull", "stack") is True


def _from_another_thread(db: Engine, job: str, provider: str | None) -> bool:
    got: list[bool] = []

    def take() -> None:
        with ledger.job_lock(db, job, provider) as held:
            got.append(held)

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(10)
    return got[0]


def test_the_advisory_lock_spans_instances(pg_engine: Engine) -> None:
    """Another engine is another pool: another session, as another instance would hold."""
    other = make_engine(pg_engine.url.render_as_string(hide_password=False), schema=SCHEMA)
    try:
        with ledger.job_lock(pg_engine, "reconcile", "stack") as held:
            assert held
            with ledger.job_lock(other, "reconcile", "stack") as elsewhere:
                assert elsewhere is False
        with ledger.job_lock(other, "reconcile", "stack") as afterwards:
            assert afterwards is True
    finally:
        other.dispose()


def test_lock_keys_are_stable_and_apart() -> None:
    key = ledger.lock_key("identity", "pull", "stack")
    assert key == ledger.lock_key("identity", "pull", "stack")
    assert -(2**63) <= key < 2**63
    others = {
        ledger.lock_key("other", "pull", "stack"),
        ledger.lock_key("identity", "pull", "auth0"),
        ledger.lock_key("identity", "reconcile", "stack"),
        ledger.lock_key("identity", "retry", None),
    }
    assert key not in others
    assert len(others) == 4


def test_the_ledger_migration_round_trips(engine: Engine) -> None:
    config = alembic_config()
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0005")
        assert "sync_job_ticks" not in inspect(engine).get_table_names()
    finally:
        before, after = upgrade(engine, SCHEMA)
    assert (before, after) == ("0005", head_revision())
    assert "sync_job_ticks" in inspect(engine).get_table_names()


# -- one tick ------------------------------------------------------------------------------


def tick_runner(db: Engine, instance: str = "a", **kwargs: Any) -> TickRunner:
    config = kwargs.pop("config", None) or settings()
    metrics = kwargs.pop("metrics", None) or Metrics()
    return TickRunner(
        db, config, metrics.job_runs, instance=instance, stop=threading.Event(), **kwargs
    )


def test_a_tick_runs_once_and_the_loser_is_told(engine: Engine) -> None:
    probe = Probe()
    (won,) = tick_runner(engine, "a").run(probe, T0)
    (lost,) = tick_runner(engine, "b").run(probe, T0)
    assert (won.status, lost.status) == ("succeeded", TAKEN)
    assert probe.runs == [T0]
    (row,) = runs(engine, "probe")
    assert (row["id"], row["status"], row["counts"]) == (won.run_id, "succeeded", {"ran": 1})
    (tick,) = ticks(engine, "probe")
    assert (tick["run_id"], tick["status"], tick["instance"]) == (row["id"], "succeeded", "a")


def test_a_tick_whose_job_still_runs_is_skipped(engine: Engine) -> None:
    metrics = Metrics()
    with ledger.job_lock(engine, "probe", None):
        (outcome,) = tick_runner(engine, metrics=metrics).run(Probe(), T0)
    assert outcome.status == "skipped"
    assert runs(engine, "probe") == []
    assert [(t["status"], t["error"]) for t in ticks(engine, "probe")] == [
        ("skipped", PREVIOUS_RUNNING)
    ]
    assert 'job="probe",status="skipped"} 1.0' in metrics.render().decode()


def test_ticks_left_running_by_a_dead_process_are_failed_by_the_next_run(engine: Engine) -> None:
    """A run killed with its process (SIGKILL) leaves its tick 'running'; the job's next run,
    holding the lock, records it failed as abandoned. Other jobs', other providers' and
    later ticks are left alone."""
    assert claim(engine, "probe", None, T0, "dead")  # claimed, then the process died
    dead_run = start_run(engine, "probe", None)
    other_run = start_run(engine, "other", None)
    assert claim(engine, "other", None, T0, "dead")
    assert claim(engine, "pull", "stack", T0, "dead")
    assert claim(engine, "probe", None, T0 + timedelta(minutes=10), "later")
    (outcome,) = tick_runner(engine, "a").run(Probe(), T0 + timedelta(minutes=5))
    assert outcome.status == "succeeded"
    by_time = {t["scheduled_at"]: t for t in ticks(engine, "probe")}
    dead = by_time[T0]
    assert (dead["status"], dead["error"]) == ("failed", ledger.ABANDONED)
    assert dead["finished_at"] is not None
    assert by_time[T0 + timedelta(minutes=5)]["status"] == "succeeded"
    assert by_time[T0 + timedelta(minutes=10)]["status"] == "running"  # not before this one
    assert [t["status"] for t in ticks(engine, "other")] == ["running"]
    assert [t["status"] for t in ticks(engine, "pull")] == ["running"]
    statuses = {r["id"]: (r["status"], r["error"]) for r in runs(engine, "probe")}
    assert ledger.locks_across_processes(engine)  # PostgreSQL, or a SQLite file
    assert statuses[dead_run] == ("failed", ABANDONED_RUN)
    assert statuses[outcome.run_id] == ("succeeded", None)
    assert [r["status"] for r in runs(engine, "other") if r["id"] == other_run] == ["running"]


def test_a_skipped_tick_abandons_nothing(engine: Engine) -> None:
    """Without the lock the earlier run may be alive (another instance's): left running."""
    assert claim(engine, "probe", None, T0, "busy")
    with ledger.job_lock(engine, "probe", None):
        (outcome,) = tick_runner(engine).run(Probe(), T0 + timedelta(minutes=5))
    assert outcome.status == "skipped"
    assert ticks(engine, "probe")[0]["status"] == "running"


def test_an_unreachable_ledger_fails_the_tick_without_raising() -> None:
    nowhere = make_engine(
        "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1", schema=SCHEMA
    )
    metrics = Metrics()
    (outcome,) = tick_runner(nowhere, metrics=metrics).run(Probe(), T0)
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith("database unavailable")
    assert 'job="probe",status="failed"} 1.0' in metrics.render().decode()
    nowhere.dispose()


# -- the jobs --------------------------------------------------------------------------------


def test_every_configured_job_exists() -> None:
    jobs = all_jobs()
    assert set(jobs) == set(JobsSettings.model_fields) - {"misfire_grace"}
    assert all(job.name == name for name, job in jobs.items())


def inbox_row(**values: Any) -> dict[str, Any]:
    row = {
        "provider": "stack",
        "payload": {},
        "received_at": T0,
        "next_attempt_at": None,
        "claimed_by": None,
        "claimed_until": None,
    }
    return {**row, **values}


def test_retry_requeues_due_rows_buries_abandoned_ones_and_wakes_the_drainer(
    engine: Engine,
) -> None:
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(sync_inbox),
            [
                inbox_row(
                    event_id="due",
                    status="failed",
                    attempts=1,
                    next_attempt_at=now - timedelta(seconds=5),
                ),
                inbox_row(
                    event_id="later",
                    status="failed",
                    attempts=1,
                    next_attempt_at=now + timedelta(hours=1),
                ),
                inbox_row(
                    event_id="abandoned",
                    status="pending",
                    attempts=8,
                    claimed_by="gone",
                    claimed_until=now - timedelta(seconds=5),
                ),
            ],
        )
    assert claim(engine, "retry", None, now - LEDGER_RETENTION - timedelta(days=1), "old")
    woken: list[int] = []
    (outcome,) = tick_runner(engine, wake_drainer=lambda: woken.append(1)).run(RetryJob(), now)
    assert outcome.status == "succeeded"
    assert outcome.counts == {"requeued": 1, "buried": 1, "ticks_purged": 1}
    assert woken == [1]
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(sync_inbox.c.event_id, sync_inbox.c.status)).all())
    assert statuses == {"due": "pending", "later": "failed", "abandoned": "dead"}
    (row,) = runs(engine, "retry")
    assert row["counts"] == {"requeued": 1, "buried": 1, "ticks_purged": 1}
    assert [t["scheduled_at"] for t in ticks(engine, "retry")] == [now]


def test_retry_with_nothing_due_does_not_wake_the_drainer(engine: Engine) -> None:
    woken: list[int] = []
    tick_runner(engine, wake_drainer=lambda: woken.append(1)).run(RetryJob(), utcnow())
    assert woken == []


def test_the_maintenance_jobs_run_on_schedule_and_record_their_runs(engine: Engine) -> None:
    """backfill_profiles, session_cleanup and retention through the tick runner, on a
    database holding what each one cleans: their counts land in sync_runs."""
    old = utcnow() - timedelta(days=400)
    user_id = uuid.uuid4()
    with transaction(engine) as conn:  # a legacy user without a profile, an ended session
        conn.execute(insert(users).values(id=user_id, email="legacy@example.org",
                                          created_at=old, updated_at=old))  # fmt: skip
        conn.execute(insert(user_sessions).values(
            id=uuid.uuid4(), user_id=user_id, provider="auth0", external_session_id="s-old",
            created_at=old, expires_at=old + timedelta(days=1),
        ))  # fmt: skip
        conn.execute(insert(user_sessions).values(  # no expiry stated, unseen for 400 days
            id=uuid.uuid4(), user_id=user_id, provider="auth0", external_session_id="s-idle",
            created_at=old, last_seen_at=old,
        ))  # fmt: skip
        conn.execute(insert(sync_audit).values(
            occurred_at=old, source="pull", provider="auth0", external_id="x", action="updated",
        ))  # fmt: skip
    config = settings_from_mapping(
        {"database": {"url": "sqlite:///:memory:"}, "retention": {"sessions": "7d"}}
    )
    jobs = all_jobs()
    runner = tick_runner(engine, config=config)
    for name in ("backfill_profiles", "session_cleanup", "retention"):
        (outcome,) = runner.run(jobs[name], T0)
        assert outcome.status == "succeeded", outcome
    counts = {r["kind"]: r["counts"] for r in _all_runs(engine)}
    assert counts["backfill_profiles"]["created"] == 1
    assert counts["session_cleanup"]["deleted"] == 2  # the expired one and the idle one
    assert counts["retention"]["audit_deleted"] == 1
    (made,) = runs(engine, "backfill_profiles")
    with engine.connect() as conn:
        audited = conn.execute(
            select(sync_audit.c.run_id).where(sync_audit.c.action == "profile_created")
        ).scalar_one()
    assert audited == made["id"]


def _all_runs(db: Engine) -> list[dict[str, Any]]:
    return [
        r for kind in ("backfill_profiles", "session_cleanup", "retention") for r in runs(db, kind)
    ]


def stack_settings(fake: StackFake) -> Settings:
    return settings_from_mapping(
        {
            "database": {"url": "sqlite:///:memory:"},
            "providers": {
                "stack": {
                    "project_id": fake.project_id,
                    "secret_server_key": fake.secret_server_key,
                    "base_url": fake.url,
                }
            },
        }
    )


def test_pull_and_reconcile_run_per_provider_and_a_refused_guard_fails(engine: Engine) -> None:
    metrics = Metrics()
    with StackFake() as fake:
        fake.seed(5)
        config = stack_settings(fake)
        assert PullJob().providers(config) == ["stack"]
        runner = tick_runner(engine, config=config, metrics=metrics)
        (pulled,) = runner.run(PullJob(), T0)
        assert pulled.status == "succeeded", pulled.error
        assert pulled.counts["created"] == 5
        for user_id in list(fake.users)[:3]:  # most users gone: the guard refuses
            fake.delete_user(user_id)
        (reconciled,) = runner.run(ReconcileJob(), T0)
    assert reconciled.status == "failed"
    assert reconciled.error is not None
    assert reconciled.error.startswith("ReconcileRefused: reconcile refused: 3 of 5 stack users")
    by_job = {t["job"]: t for t in ticks(engine, "pull") + ticks(engine, "reconcile")}
    assert by_job["pull"]["provider"] == "stack"
    full_runs = {r["id"]: r for r in runs(engine, "full")}
    assert full_runs[by_job["pull"]["run_id"]]["status"] == "succeeded"
    assert full_runs[by_job["reconcile"]["run_id"]]["status"] == "failed"
    assert by_job["reconcile"]["status"] == "failed"
    text = metrics.render().decode()
    assert 'sync_worker_job_runs_total{job="reconcile",status="failed"} 1.0' in text
    assert 'sync_worker_job_runs_total{job="pull",status="succeeded"} 1.0' in text


def test_pull_and_reconcile_of_one_provider_never_overlap(engine: Engine) -> None:
    config = settings_from_mapping(
        {
            "database": {"url": "sqlite:///:memory:"},
            "providers": {"stack": {"project_id": "p", "secret_server_key": "k"}},
        }
    )
    assert ReconcileJob.lock == PullJob.lock
    with ledger.job_lock(engine, PullJob.lock, "stack"):  # a pull of stack is going
        (outcome,) = tick_runner(engine, config=config).run(ReconcileJob(), T0)
    assert (outcome.status, outcome.error) == ("skipped", PREVIOUS_RUNNING)
    assert runs(engine, "full") == []


def test_a_pull_stops_between_pages_once_stop_is_set() -> None:
    stop = threading.Event()
    progress = StopBetweenPages(stop)
    progress.advance(10, 0)
    stop.set()
    with pytest.raises(JobStopped, match="between pages"):
        progress.advance(10, 0)


def test_no_provider_means_no_pull() -> None:
    assert PullJob().providers(settings()) == []
    assert ReconcileJob().providers(settings()) == []
    assert RetryJob().providers(settings()) == [None]
