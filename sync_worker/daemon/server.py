"""``sync-worker run``: the webhook server, the inbox drainer and the scheduler.

The drainer runs in a child process on PostgreSQL and in a thread on SQLite
(``drain_host``).

Start-up logs which providers' pulls and webhook endpoints are on. SIGTERM or SIGINT stops
accepting requests, lets requests in flight finish, lets the drainer finish the batch in
hand, stops the scheduler, and returns 0 within ``server.grace_seconds``; a second SIGINT
forces the HTTP server down at once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import FrameType

import structlog
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine

from providers import registry
from providers.webhook import WebhookReceiver
from sync_worker.config import Settings
from sync_worker.daemon.app import Health, create_app
from sync_worker.daemon.drain_host import DrainerHost, host_for
from sync_worker.daemon.metrics import Metrics
from sync_worker.daemon.scheduler import Scheduler

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Daemon:
    """The pieces of a running daemon, built from settings (``build``)."""

    app: FastAPI
    drainer: DrainerHost
    metrics: Metrics
    receivers: Mapping[str, WebhookReceiver]
    stop: threading.Event = field(default_factory=threading.Event)
    scheduler: Scheduler | None = None

    def start(self) -> None:
        """Start the background loops (drainer; scheduler)."""
        self.drainer.start()
        if self.scheduler is not None:
            self.scheduler.start()

    def shutdown(self, grace: float) -> None:
        """Stop the loops; each finishes what it holds, within ``grace`` seconds in all.

        Called once the HTTP server has stopped: deliveries it acknowledged while stopping
        are then drained too, as long as the grace period lasts (the rest stay stored and
        the next start applies them).
        """
        self.stop.set()
        deadline = time.monotonic() + grace
        if self.scheduler is not None:
            self.scheduler.shutdown(max(0.0, deadline - time.monotonic()))
        self.drainer.stop(deadline)


def build(settings: Settings, db: Engine, secrets: Mapping[str, str] | None = None) -> Daemon:
    """Wire the daemon; ``secrets`` are the generated local ones of the embedded default."""
    metrics = Metrics(db)
    receivers = registry.receivers(settings, local=secrets or {})
    drain = settings.drain
    stop = threading.Event()
    drainer = host_for(settings, db, metrics.applied)
    scheduler = Scheduler(
        db,
        settings,
        metrics.job_runs,
        stop=stop,
        wake_drainer=drainer.wake,
        heartbeat_seconds=min(5.0, drain.stale_after_seconds / 3),
    )

    def heartbeats() -> dict[str, float | None]:
        return {"drainer": drainer.heartbeat_age(), "scheduler": scheduler.heartbeat_age()}

    app = create_app(
        db,
        receivers,
        metrics,
        max_body_bytes=settings.server.max_body_bytes,
        on_stored=drainer.wake,
        health=Health(heartbeats=heartbeats, stale_after=drain.stale_after_seconds),
    )
    return Daemon(app, drainer, metrics, receivers, stop=stop, scheduler=scheduler)


def serve(daemon: Daemon, host: str, port: int, *, grace: float) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
    config = uvicorn.Config(
        daemon.app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=max(1, round(grace)),
    )
    server = _Server(config, daemon.stop)
    with ExitStack() as stack:
        stack.callback(daemon.shutdown, grace)
        daemon.start()
        log.info("daemon_listening", host=host, port=port)
        server.run()
    log.info("daemon_stopped")
    return 0


class _Server(uvicorn.Server):
    """uvicorn, with the signal handling a daemon wants: the first SIGTERM or SIGINT starts a
    graceful stop of everything (``stop``), a second SIGINT forces the HTTP server down, and
    the signal is not raised again afterwards (uvicorn's default), so the process exits 0."""

    def __init__(self, config: uvicorn.Config, stop: threading.Event) -> None:
        super().__init__(config)
        self.stop_event = stop

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, _frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        self.stop_event.set()
        log.info("daemon_stopping", signal=signal.Signals(sig).name)
