"""The README's first command, as a new user meets it: ``sync-worker run --migrate`` on the
embedded SQLite default (the drainer a thread), ``simulate`` for each provider from another
process with the generated local secrets, ``status`` showing the users, SIGTERM exiting 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.daemon_process import DaemonProcess, wait_until


def cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync_worker", *args],
        cwd=daemon.workdir,
        env=daemon.environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def users_in_status(daemon: DaemonProcess) -> int:
    shown = cli(daemon, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    total: int = json.loads(shown.stdout)["users"]["total"]
    return total


def test_run_simulate_status_on_the_embedded_default(tmp_path: Path) -> None:
    database = tmp_path / "var" / "sync-worker.db"
    daemon = DaemonProcess(f"sqlite:///{database}", tmp_path / "daemon", secrets={})
    daemon.start()
    try:
        for provider, event in (
            ("stack", "user.created"),
            ("authjs", "createUser"),
            ("auth0", "user.created"),
        ):
            sent = cli(daemon, "simulate", provider, event, "--url", daemon.base_url,
                       "--email", f"{provider}@example.org")  # fmt: skip
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert "-> 200" in sent.stdout
        wait_until(lambda: users_in_status(daemon) == 3, timeout=20, what="three users")
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    events = [e.get("event") for e in daemon.log_events()]
    assert "drainer_started" in events
    assert "drainer_process_started" not in events  # SQLite: a thread, one writer
