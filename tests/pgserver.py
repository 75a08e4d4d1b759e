"""Finding (or starting) a real PostgreSQL for the tests.

Order: ``$TEST_POSTGRES_URL``; the local server on 127.0.0.1:5432; a temporary cluster
started from the installed binaries (``initdb``/``pg_ctl``). If none works the PostgreSQL tests
are skipped with a loud reason, except under ``CI=true`` where that is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _can_connect(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


@contextmanager
def temporary_cluster() -> Iterator[str]:
    """Start a throwaway cluster in a temp dir; yields its admin URL."""
    bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL binaries (pg_ctl) installed")
    workdir = Path(tempfile.mkdtemp(prefix="sw-pg-"))
    as_root = os.geteuid() == 0
    prefix: list[str] = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(workdir, "postgres")
    data, port = workdir / "data", _free_port()

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(
        str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(workdir / "log"),
        "-o", f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off", "start",
    )  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def postgres_admin_url() -> Iterator[str]:
    """Yield the admin URL of a reachable server, starting a temporary one if needed."""
    url = os.environ.get("TEST_POSTGRES_URL", DEFAULT_URL)
    if _can_connect(url):
        yield url
        return
    with temporary_cluster() as temp_url:
        deadline = time.monotonic() + 30
        while not _can_connect(temp_url):
            if time.monotonic() > deadline:
                raise RuntimeError("temporary PostgreSQL cluster did not accept connections")
            time.sleep(0.2)
        yield temp_url


def with_database(admin_url: str, name: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


def create_database(admin_url: str, prefix: str = "sw_test") -> str:
    """Create an empty throwaway database; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    name = url.rpartition("/")[2]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- stopping and starting a private cluster (for outage tests) ------------------------


@dataclass(frozen=True, slots=True)
class ClusterHandle:
    """What ``pg_ctl`` needs to stop and start again a running private cluster."""

    data_dir: Path
    port: int
    socket_dir: str


def cluster_handle(admin_url: str) -> ClusterHandle:
    """Ask a running cluster (e.g. one of ``temporary_cluster``) where it lives."""
    with psycopg.connect(admin_url, connect_timeout=5, autocommit=True) as conn:

        def show(name: str) -> str:
            row = conn.execute(f"SHOW {name}").fetchone()
            assert row is not None
            return str(row[0])

        data, port, sockets = show("data_directory"), show("port"), show("unix_socket_directories")
    return ClusterHandle(Path(data), int(port), sockets.split(",")[0].strip())


def stop_cluster(cluster: ClusterHandle, mode: str = "fast") -> None:
    """``pg_ctl stop -m MODE``: waits until the server is down. Never the shared server:
    only a cluster of ``temporary_cluster`` (its data dir is in a temp dir)."""
    if not cluster.data_dir.parent.name.startswith("sw-pg-"):
        raise RuntimeError(f"refusing to stop a cluster not started by the tests: {cluster}")
    _pg_ctl(cluster, "-m", mode, "stop")


def start_cluster(cluster: ClusterHandle) -> None:
    """Start a stopped private cluster again, as ``temporary_cluster`` started it."""
    options = (
        f"-p {cluster.port} -k {cluster.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
    )
    _pg_ctl(cluster, "-l", str(cluster.data_dir.parent / "log"), "-o", options, "start")


def _pg_ctl(cluster: ClusterHandle, *args: str) -> None:
    bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL binaries (pg_ctl) installed")
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    command = [*prefix, str(bindir / "pg_ctl"), "-D", str(cluster.data_dir), "-w", "-t", "60"]
    subprocess.run([*command, *args], check=True, capture_output=True, timeout=90)
