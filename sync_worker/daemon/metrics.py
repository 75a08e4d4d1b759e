"""The daemon's Prometheus metrics (names and labels fixed by the project's contract).

Counters and the histogram are updated where things happen; the inbox gauges are read from
the database at scrape time, so every instance on one PostgreSQL reports the same inbox.
Each daemon has its own registry (no process-global state: tests run several). Labels
carry provider names, statuses and actions only: never an id, an email or a secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from db import inbox
from db.transaction import transaction
from sync_worker.changes import utcnow
from sync_worker.errors import StoreError

log = structlog.get_logger(__name__)

# The per-series *_created samples double every counter's lines and nobody alarms on them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# One webhook batch is usually one to a hundred changes: milliseconds, up to a second.
_APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, db: Engine | None = None, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.webhook_requests = Counter(
            "sync_worker_webhook_requests_total",
            "Webhook requests by provider and HTTP status.",
            ["provider", "status"],
            registry=self.registry,
        )
        self.last_delivery = Gauge(
            "sync_worker_last_delivery_timestamp_seconds",
            "Unix time of the last delivery stored per provider (alarm when a sender goes quiet).",
            ["provider"],
            registry=self.registry,
        )
        self.changes_applied = Counter(
            "sync_worker_changes_applied_total",
            "Changes applied by the engine, by provider and outcome.",
            ["provider", "action"],
            registry=self.registry,
        )
        self.apply_seconds = Histogram(
            "sync_worker_apply_seconds",
            "Seconds to apply one batch (one transaction).",
            buckets=_APPLY_BUCKETS,
            registry=self.registry,
        )
        self.job_runs = Counter(
            "sync_worker_job_runs_total",
            "Scheduled job runs by job and final status.",
            ["job", "status"],
            registry=self.registry,
        )
        if db is not None:
            self.registry.register(_InboxCollector(db, clock))
        self._accepted: dict[str, tuple[Counter, Gauge]] = {}

    def delivered(self, provider: str) -> None:
        """A delivery of ``provider`` was stored (answered 200)."""
        accepted = self._accepted.get(provider)
        if accepted is None:  # a labelled child, looked up once per provider, not per request
            accepted = self._accepted[provider] = (
                self.webhook_requests.labels(provider=provider, status="200"),
                self.last_delivery.labels(provider=provider),
            )
        requests, last = accepted
        requests.inc()
        last.set(time.time())

    def applied(self, counts: Mapping[tuple[str, str], int], seconds: float) -> None:
        """One batch applied: its changes by (provider, action), and its latency."""
        self.apply_seconds.observe(seconds)
        for (provider, action), n in counts.items():
            self.changes_applied.labels(provider=provider, action=action).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InboxCollector(Collector):
    """``sync_worker_inbox_rows{status}`` and ``..._oldest_pending_seconds``, read per scrape."""

    def __init__(self, db: Engine, clock: Callable[[], datetime]) -> None:
        self.db, self.clock = db, clock

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families({}, None))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with transaction(self.db, rollback=True) as conn:
                counts = inbox.counts(conn)
                oldest = inbox.oldest_pending_age(conn, now=self.clock())
        except StoreError as exc:  # the scrape goes on without them; /readyz tells why
            log.warning("metrics_inbox_unavailable", error=str(exc))
            return iter(())
        return iter(self._families(counts, oldest))

    @staticmethod
    def _families(counts: dict[str, int], oldest: float | None) -> list[GaugeMetricFamily]:
        rows = GaugeMetricFamily(
            "sync_worker_inbox_rows", "Inbox rows by status.", labels=["status"]
        )
        for status, count in sorted(counts.items()):
            rows.add_metric([status], count)
        age = GaugeMetricFamily(
            "sync_worker_inbox_oldest_pending_seconds",
            "Age of the oldest pending inbox row (0 when none is pending).",
        )
        age.add_metric([], oldest or 0.0)
        return [rows, age]
