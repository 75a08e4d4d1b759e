"""Where the daemon's drainer runs: a thread beside the receiver, or a child process.

On PostgreSQL the drainer runs in a child process. In one process its CPU-bound batches
hold the GIL the receiver's event loop needs: every request then waits out the
interpreter's switch interval several times, and under load the receiver's p99 grew from
tens of milliseconds to over a second (bench/RESULTS.md, ingest). In a child the two use
separate cores. On SQLite (the embedded default: one writer at a time) it stays a thread.

The child process, and how the two talk:

- wake pipe, daemon -> child: a byte when a delivery was stored since the child's last
  claim began (non-blocking: a full pipe already says "wake"). A shared flag, ``wanted``,
  says a byte is on its way: the child clears it just before each claim, the daemon sets it
  and writes only when it was clear. Any commit the claim cannot see ends after the clear,
  so it finds the flag clear (or set by a later commit that wrote) and a byte follows; the
  rest need none. Under load that is one write and one wake-up of the child per claim
  instead of per commit group (the write was 4-8% of the receiving process's samples).
  Its end of file — the daemon closed it at shutdown, or died, even by
  SIGKILL — tells the child to stop: it finishes the batch in hand, drains what is left
  until the deadline the daemon set in shared memory (or its own grace period when the
  daemon died), and exits. No orphan drains on for ever.
- report pipe, child -> daemon: per applied batch, its outcome counts and latency, for the
  daemon's Prometheus metrics; the child's loop heartbeat is in shared memory for /readyz.
- The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C and systemd's stop reach the
  whole process group): the daemon decides when it stops, after the HTTP server has
  stopped, so what was acknowledged while stopping is drained too.
- A child that dies unexpectedly (a crash, the OOM killer) is started again after a pause;
  meanwhile /readyz reports the drainer not running. Its claimed rows come back when their
  lease runs out.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Protocol

import structlog
from sqlalchemy import Engine

from db.connect import make_engine
from providers import registry
from sync_worker.config import Settings
from sync_worker.daemon.drainer import Drainer, DrainSettings
from sync_worker.engine import BatchResult, SyncEngine
from sync_worker.errors import StoreError

log = structlog.get_logger(__name__)

#: Applied changes of one batch by (provider, action), and the batch's seconds.
Counts = Mapping[tuple[str, str], int]
Report = Callable[[Counts, float], None]
#: Seconds before a child that died is started again.
RESTART_PAUSE = 2.0


class DrainerHost(Protocol):
    def start(self) -> None: ...
    def wake(self) -> None: ...
    def heartbeat_age(self) -> float | None:
        """Seconds since the drainer's loop last turned; None when it is not running."""
        ...

    def stop(self, deadline: float) -> None:
        """Finish the batch in hand and drain what is left until ``deadline`` (monotonic)."""
        ...


def counts_of(result: BatchResult) -> Counts:
    return Counter((o.provider, str(o.action)) for o in result.outcomes)


def build_drainer(
    settings: Settings, db: Engine, report: Report, *, claiming: Callable[[], None] = lambda: None
) -> Drainer:
    return Drainer(
        db,
        SyncEngine.from_settings(settings),
        registry.decoders(settings),
        registry.lookups(settings),
        DrainSettings.from_config(settings.drain),
        observe=lambda result, seconds: report(counts_of(result), seconds),
        claiming=claiming,
    )


def host_for(settings: Settings, db: Engine, report: Report) -> DrainerHost:
    if db.dialect.name == "postgresql":
        return DrainerProcess(settings, db.url.render_as_string(hide_password=False), report)
    return DrainerThread(build_drainer(settings, db, report))


# -- a thread -----------------------------------------------------------------------------


class DrainerThread:
    def __init__(self, drainer: Drainer) -> None:
        self.drainer = drainer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.drainer.run, args=(self._stop,), name="inbox-drainer", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        self.drainer.wake()

    def heartbeat_age(self) -> float | None:
        if self._thread is None or not self._thread.is_alive():
            return None
        return time.monotonic() - self.drainer.heartbeat

    def stop(self, deadline: float) -> None:
        self._stop.set()
        self.drainer.wake()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("shutdown_thread_still_running", thread=self._thread.name)
                return
        _drain_rest(self.drainer, deadline)
        self.drainer.close()


def _drain_rest(drainer: Drainer, deadline: float) -> None:
    try:
        drained = drainer.drain_until(deadline)
    except StoreError as exc:
        log.warning("shutdown_drain_failed", error=str(exc))
    else:
        log.info("shutdown_drained", rows=drained)


# -- a child process ----------------------------------------------------------------------


class DrainerProcess:
    def __init__(self, settings: Settings, url: str, report: Report) -> None:
        self.settings, self._url, self._report = settings, url, report
        self._ctx = multiprocessing.get_context("spawn")  # never fork a threaded process
        # Shared doubles without a lock: one writer each, and a torn read cannot happen.
        self._heartbeat: ctypes.c_double = self._ctx.RawValue(ctypes.c_double, 0.0)
        self._deadline: ctypes.c_double = self._ctx.RawValue(ctypes.c_double, 0.0)
        self._wanted: ctypes.c_bool = self._ctx.RawValue(ctypes.c_bool, False)
        self._lock = threading.Lock()
        self._wake_end: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="drainer-monitor", daemon=True)
        self._monitor.start()

    def wake(self) -> None:
        if self._wanted.value:  # a byte is on its way and the child has not claimed since
            return
        with self._lock:  # the monitor swaps the pipe when it restarts the child
            if self._wake_end is None:
                return
            self._wanted.value = True
            # Full: a wake-up is pending anyway. Gone: the monitor is restarting the child.
            with contextlib.suppress(OSError):
                os.write(self._wake_end.fileno(), b"w")

    def heartbeat_age(self) -> float | None:
        process = self._process
        if process is None or not process.is_alive() or self._heartbeat.value == 0.0:
            return None
        return time.monotonic() - self._heartbeat.value

    def stop(self, deadline: float) -> None:
        self._stopping.set()
        self._deadline.value = deadline  # CLOCK_MONOTONIC: one clock for the whole machine
        with self._lock:
            if self._wake_end is not None:
                self._wake_end.close()  # end of file: the child stops
                self._wake_end = None
        process = self._process
        if process is not None:
            process.join(max(0.0, deadline - time.monotonic()) + 1.0)
            if process.is_alive():  # its batch rolls back; its claims come back by lease
                log.warning("drainer_process_killed", pid=process.pid)
                process.kill()
                process.join(5)
        if self._monitor is not None:
            self._monitor.join(5)

    # The child's pipes: wake (daemon writes) and report (child writes). Each side closes
    # the ends it does not use, so a closed or dead peer shows as end of file.
    def _spawn(self) -> None:
        wake_read, wake_write = self._ctx.Pipe(duplex=False)
        report_read, report_write = self._ctx.Pipe(duplex=False)
        self._heartbeat.value = 0.0
        self._wanted.value = False
        process = self._ctx.Process(
            target=child_main,
            args=(self.settings, self._url, wake_read, report_write),
            kwargs={
                "heartbeat": self._heartbeat,
                "deadline": self._deadline,
                "wanted": self._wanted,
            },
            name="sync-worker-drainer",
        )
        process.start()
        wake_read.close()
        report_write.close()
        os.set_blocking(wake_write.fileno(), False)
        with self._lock:
            self._wake_end = wake_write
        self._process, self._reports = process, report_read
        log.info("drainer_process_started", pid=process.pid)

    def _watch(self) -> None:
        while True:
            try:
                counts, seconds = self._reports.recv()
            except (EOFError, OSError):
                self._reports.close()
                process = self._process
                if process is not None:
                    process.join(5)
                if self._stopping.is_set():
                    return
                code = process.exitcode if process is not None else None
                log.error("drainer_process_died", exitcode=code, restart_in=RESTART_PAUSE)
                with self._lock:
                    if self._wake_end is not None:
                        self._wake_end.close()
                        self._wake_end = None
                if self._stopping.wait(RESTART_PAUSE):
                    return
                self._spawn()
                continue
            self._report(counts, seconds)


def child_main(
    settings: Settings,
    url: str,
    wake: Connection,
    reports: Connection,
    *,
    heartbeat: ctypes.c_double,
    deadline: ctypes.c_double,
    wanted: ctypes.c_bool,
) -> None:
    """The drainer process: drain until the daemon closes the wake pipe (see the module)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from sync_worker.logging import configure

    configure(settings.logging.level, settings.logging.format)
    database = settings.database
    db = make_engine(
        url,
        schema=database.schema_,
        pool_size=1,
        echo=database.echo,
        prepared_statements=database.prepared_statements,
    )

    def report(counts: Counts, seconds: float) -> None:
        with contextlib.suppress(OSError):  # the daemon died: its metrics died with it
            reports.send((counts, seconds))

    def claiming() -> None:
        wanted.value = False

    drainer = build_drainer(settings, db, report, claiming=claiming)
    stop = threading.Event()
    listener = threading.Thread(
        target=_listen, args=(wake, drainer, stop, heartbeat), name="wake-listener", daemon=True
    )
    listener.start()
    try:
        drainer.run(stop)
        # The daemon set its deadline before closing the pipe; a daemon that died set none.
        ends = deadline.value or time.monotonic() + settings.server.grace_seconds
        _drain_rest(drainer, ends)
    finally:
        drainer.close()
        db.dispose()
        reports.close()


def _listen(
    wake: Connection, drainer: Drainer, stop: threading.Event, heartbeat: ctypes.c_double
) -> None:
    """Turn bytes on the wake pipe into wake-ups and its end into stop; relay the heartbeat."""
    fd = wake.fileno()
    while True:
        heartbeat.value = drainer.heartbeat
        readable, _, _ = select.select([fd], [], [], 1.0)
        if not readable:
            continue
        if not os.read(fd, 4096):  # end of file: the daemon stopped, or died
            stop.set()
            drainer.wake()
            return
        drainer.wake()
