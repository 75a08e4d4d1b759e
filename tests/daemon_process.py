"""The real daemon in a subprocess, for tests: ``sync-worker run --migrate`` on a free port.

``DaemonProcess`` starts ``python -m sync_worker run`` against a database URL with generated
webhook secrets in its environment (and a config file of its own, written from the repo's
``config.yaml`` plus overrides), waits until ``/readyz`` answers 200, stops it with a signal
or SIGKILL and keeps each run's stderr (structlog's JSON lines) in a file.

``Sender`` posts deliveries as Svix does: the same event id (the same signed body) again and
again, with a short backoff, until it gets a 2xx; every answer is recorded. ``delivery``
builds a delivery with ``sync_worker.simulate`` (really signed) and can edit its body, which
is then signed again with the same libraries the IdPs use.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import requests
import yaml

from sync_worker import simulate

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

#: The environment variable holding each provider's webhook secret (config.yaml reads them).
SECRET_ENV: Mapping[str, str] = {
    "stack": "STACK_WEBHOOK_SECRET",
    "authjs": "AUTHJS_WEBHOOK_SECRET",
    "auth0": "AUTH0_WEBHOOK_TOKEN",
}
#: Variables of the test runner's environment that must not reach the daemon: credentials
#: would switch pulls on (network calls), a config path or URL would point elsewhere.
_INHERITED_PREFIXES = ("AUTH0_", "STACK_", "AUTHJS_", "SYNC_WORKER_", "DATABASE_URL")

#: Short loops, so kills and outages resolve within a test's time: a lease that a killed
#: process held runs out in 2 s, a failed row is retried within a second or two.
FAST_DRAIN: Mapping[str, Any] = {
    "lease_seconds": 2,
    "backoff_seconds": 0.5,
    "backoff_max_seconds": 2,
    "poll_seconds": 0.2,
}


def generate_secrets() -> dict[str, str]:
    """Fresh webhook secrets: Svix and Standard Webhooks ``whsec_`` keys, an Auth0 token."""
    return {
        "stack": "whsec_" + base64.b64encode(os.urandom(32)).decode(),
        "authjs": "whsec_" + base64.b64encode(os.urandom(32)).decode(),
        "auth0": base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("="),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(path: Path, overrides: Mapping[str, Any]) -> Path:
    """The repo's config.yaml with ``overrides`` merged in (section by section)."""
    document: dict[str, Any] = yaml.safe_load((REPO / "config.yaml").read_text())
    for section, values in overrides.items():
        current = document.get(section)
        if isinstance(current, dict) and isinstance(values, Mapping):
            document[section] = {**current, **values}
        else:
            document[section] = values
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


class DaemonExited(RuntimeError):
    """The daemon process ended (or never became ready) when it should not have."""


@dataclass
class DaemonProcess:
    """One daemon, started and stopped any number of times on the same port and database."""

    database_url: str
    workdir: Path
    secrets: Mapping[str, str] = field(default_factory=generate_secrets)
    config: Mapping[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    runs: list[Path] = field(default_factory=list)  # one stderr file per start

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon was never started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}
        config = write_config(
            self.workdir / "config.yaml",
            {"logging": {"level": "info", "format": "json"}, **self.config},
        )
        env.update(
            DATABASE_URL=self.database_url,
            SYNC_WORKER_CONFIG=str(config),
            PYTHONUNBUFFERED="1",  # a SIGKILL loses no log line
            **{SECRET_ENV[p]: s for p, s in self.secrets.items()},
        )
        return env

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start the daemon (again); with ``wait``, until /readyz answers 200."""
        if self.alive:
            raise RuntimeError("the daemon is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        n = len(self.runs) + 1
        stderr = self.workdir / f"daemon-{n}.stderr"
        self.runs.append(stderr)
        command = [sys.executable, "-m", "sync_worker", "run", "--migrate",
                   "--host", HOST, "--port", str(self.port)]  # fmt: skip
        with (
            (self.workdir / f"daemon-{n}.stdout").open("wb") as out,
            stderr.open("wb") as err,
        ):
            # cwd: the workdir, so nothing the daemon writes lands in the repository.
            self.proc = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a Ctrl-C of the test run does not reach it
            )
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /readyz until it answers 200; DaemonExited if the process ends first."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive:
                raise DaemonExited(f"daemon exited ({self.returncode()}):\n{self.stderr_tail()}")
            try:
                answer = requests.get(self.url("/readyz"), timeout=2)
                if answer.status_code == 200:
                    return
                last = f"{answer.status_code} {answer.text}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            time.sleep(0.1)
        raise DaemonExited(f"not ready within {timeout}s ({last}):\n{self.stderr_tail()}")

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM, *, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code. A daemon still running
        after ``timeout`` is killed and DaemonExited raised."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DaemonExited(
                f"still running {timeout}s after {sig.name}:\n{self.stderr_tail()}"
            ) from None

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the process ends; DaemonExited if it still runs."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonExited(f"still running after {timeout}s:\n{self.stderr_tail()}") from None

    def kill(self) -> int:
        """SIGKILL and reap (no-op when not running); returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(30)

    def stderr(self) -> str:
        """Everything every run wrote on stderr, run by run."""
        return "".join(p.read_text(errors="replace") for p in self.runs if p.exists())

    def stderr_tail(self, lines: int = 40) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])

    def log_events(self) -> list[dict[str, Any]]:
        """The structured log lines of every run (lines that are not JSON are skipped)."""
        events: list[dict[str, Any]] = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events

    def memory_kib(self, field: str = "VmHWM") -> int:
        """A ``/proc/PID/status`` figure in KiB: VmHWM is the peak resident set so far."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
        raise KeyError(field)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


# -- deliveries --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One signed webhook request, sent byte for byte the same on every retry."""

    provider: str
    event_id: str
    headers: Mapping[str, str]
    body: bytes


_ids = itertools.count(1)


def delivery(
    provider: str,
    event: str,
    *,
    email: str,
    secrets: Mapping[str, str],
    event_id: str | None = None,
    now: datetime | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Delivery:
    """A delivery built and signed by ``simulate.build``; ``edit`` changes the parsed body
    (e.g. a new name), which is then signed again as the IdP signs."""
    when = now or datetime.now(UTC)
    event_id = event_id or f"msg_{provider}_{next(_ids):06d}_{os.urandom(4).hex()}"
    headers, body = simulate.build(
        provider, event, email=email, now=when, secret=secrets[provider], event_id=event_id
    )
    if edit is not None:
        document = json.loads(body)
        edit(document)
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = {**headers, **_signature(provider, event_id, body, secrets[provider], when)}
    return Delivery(provider, event_id, headers, body)


def _signature(
    provider: str, event_id: str, body: bytes, secret: str, when: datetime
) -> dict[str, str]:
    if provider == "stack":
        from svix.webhooks import Webhook as Svix

        return {"svix-signature": Svix(secret).sign(event_id, when, body.decode())}
    if provider == "authjs":
        from standardwebhooks.webhooks import Webhook as Standard

        return {"webhook-signature": Standard(secret).sign(event_id, when, body.decode())}
    return {}  # Auth0: a static token, no signature over the body


@dataclass
class Sent:
    """A delivery and every answer it got: an HTTP status, or None (no answer: refused,
    reset, timed out)."""

    delivery: Delivery
    answers: list[int | None] = field(default_factory=list)

    @property
    def acked(self) -> bool:
        return bool(self.answers) and _is_2xx(self.answers[-1])


def _is_2xx(status: int | None) -> bool:
    return status is not None and 200 <= status < 300


class Sender:
    """Posts deliveries like Svix: the same event id until a 2xx, short backoff between.

    Not thread-safe (one ``requests.Session``): one sender per thread.
    """

    def __init__(
        self,
        base_url: str,
        *,
        backoff: float = 0.05,
        max_backoff: float = 0.5,
        timeout: float = 5.0,
    ) -> None:
        self.base_url, self.timeout = base_url, timeout
        self.backoff, self.max_backoff = backoff, max_backoff
        self.session = requests.Session()

    def post(self, item: Delivery, sent: Sent | None = None) -> Sent:
        """One attempt; its answer is appended to ``sent``."""
        record = sent or Sent(item)
        try:
            answer = self.session.post(
                simulate.endpoint(self.base_url, item.provider),
                data=item.body,
                headers=dict(item.headers),
                timeout=self.timeout,
            )
            record.answers.append(answer.status_code)
        except requests.RequestException:
            record.answers.append(None)
            self.session.close()  # a pooled connection to a dead process is no use
        return record

    def send(self, item: Delivery, *, deadline: float, sent: Sent | None = None) -> Sent:
        """Retry until a 2xx; TimeoutError once ``deadline`` (monotonic) passes. ``sent``:
        the record of earlier attempts of the same delivery, to go on with."""
        record = sent or Sent(item)
        delay = self.backoff
        while True:
            self.post(item, record)
            if record.acked:
                return record
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"{item.provider} {item.event_id}: answers {record.answers}")
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    def close(self) -> None:
        self.session.close()


def wait_until(
    condition: Callable[[], bool], *, timeout: float, interval: float = 0.1, what: str = ""
) -> None:
    """Poll ``condition`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or condition}")
        time.sleep(interval)
