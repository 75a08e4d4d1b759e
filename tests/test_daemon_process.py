"""The real daemon as a process: ``sync-worker run`` served over real sockets, stopped by
signals, killed with SIGKILL, cut off from its database, fed an oversized body.

Each test starts ``python -m sync_worker run --migrate`` (``tests.daemon_process``) against
a throwaway PostgreSQL database and talks to it with ``requests`` or a raw socket, on
127.0.0.1 only. Deliveries are signed by the IdPs' own libraries (``sync_worker.simulate``).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, func
from sqlalchemy import select as sql_select

from db.connect import make_engine
from db.tables import profiles, sync_audit, sync_inbox, user_identities, users
from tests import pgserver
from tests.conftest import IN_CI
from tests.daemon_process import (
    FAST_DRAIN,
    HOST,
    DaemonProcess,
    Delivery,
    Sender,
    Sent,
    delivery,
    wait_until,
)

pytestmark = pytest.mark.postgres

SCHEMA = "identity"
GRACE = 10.0  # server.grace_seconds of these daemons
MiB = 1024 * 1024

Daemons = Callable[..., DaemonProcess]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """Factory of daemon processes; all are killed at the end, and their stderr printed
    (pytest shows it when the test failed)."""
    made: list[DaemonProcess] = []

    def make(database_url: str, **kwargs: Any) -> DaemonProcess:
        config = {"drain": dict(FAST_DRAIN), "server": {"grace_seconds": GRACE}}
        config.update(kwargs.pop("config", {}))
        daemon = DaemonProcess(
            database_url, tmp_path / f"daemon{len(made)}", config=config, **kwargs
        )
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()
        print(f"--- {daemon.workdir.name} (port {daemon.port}) stderr ---")
        print(daemon.stderr_tail(60))


# -- reading the database ------------------------------------------------------------------


@contextmanager
def database(url: str) -> Iterator[Engine]:
    engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://", 1),
                         schema=SCHEMA, pool_size=1)  # fmt: skip
    try:
        yield engine
    finally:
        engine.dispose()


def inbox_rows(url: str) -> list[dict[str, Any]]:
    t = sync_inbox.c
    query = sql_select(t.provider, t.event_id, t.status, t.claimed_by, t.last_error)
    with database(url) as db, db.connect() as conn:
        return [dict(r) for r in conn.execute(query.order_by(t.id)).mappings()]


def audit_per_event(url: str) -> Counter[str]:
    query = sql_select(sync_audit.c.event_id, func.count()).group_by(sync_audit.c.event_id)
    with database(url) as db, db.connect() as conn:
        return Counter({str(e): int(n) for e, n in conn.execute(query)})


def state(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """The rows that matter of users, profiles and identities: no ids, no timestamps, but
    whether deleted_at is set; sorted lists, so a duplicate shows."""
    u, p, i = users.c, profiles.c, user_identities.c
    with database(url) as db, db.connect() as conn:
        people = conn.execute(
            sql_select(u.email, u.email_verified, u.name, u.given_name, u.family_name,
                       u.phone, u.avatar_url, u.role, u.tenant_id, u.deleted_at.is_(None))
        ).all()  # fmt: skip
        profile = conn.execute(
            sql_select(u.email, p.display_name, p.avatar_url, p.timezone, p.currency,
                       p.locale, p.settings).join_from(profiles, users, p.user_id == u.id)
        ).all()  # fmt: skip
        identity = conn.execute(
            sql_select(i.provider, i.external_id, i.email, u.email, i.content_hash, i.raw,
                       i.deleted_at.is_(None)).join_from(user_identities, users,
                                                         i.user_id == u.id)
        ).all()  # fmt: skip
    as_text = json.dumps  # JSON columns compared as sorted text
    return {
        "users": sorted(tuple(r) for r in people),
        "profiles": sorted((*r[:-1], as_text(r[-1], sort_keys=True)) for r in profile),
        "identities": sorted((*r[:5], as_text(r[5], sort_keys=True), r[6]) for r in identity),
    }


def live_emails(url: str) -> list[str]:
    with database(url) as db, db.connect() as conn:
        found = conn.execute(sql_select(users.c.email).where(users.c.deleted_at.is_(None)))
        return sorted(str(e) for e in found.scalars())


def settled(url: str) -> bool:
    """Nothing left to drain: no row pending, failed or under a lease."""
    return all(r["status"] in ("done", "ignored", "dead") for r in inbox_rows(url))


def assert_applied_once(url: str, acked: Sequence[Sent]) -> None:
    """Each acknowledged delivery is one done inbox row with exactly one audit row."""
    rows = inbox_rows(url)
    stored = Counter((r["provider"], r["event_id"]) for r in rows)
    status = {(r["provider"], r["event_id"]): r["status"] for r in rows}
    audits = audit_per_event(url)
    for sent in acked:
        key = (sent.delivery.provider, sent.delivery.event_id)
        assert stored[key] == 1, f"{key} stored {stored[key]} times"
        assert status[key] == "done", f"{key} is {status[key]}"
        assert audits[sent.delivery.event_id] == 1, f"{key}: {audits[key[1]]} audit rows"


# -- the drainer's child process ----------------------------------------------------------


def drainer_pids(daemon: DaemonProcess) -> list[int]:
    """Pids of the drainer processes the daemon started, in order (from its log)."""
    return [e["pid"] for e in daemon.log_events() if e.get("event") == "drainer_process_started"]


def running(pid: int) -> bool:
    try:  # a zombie (dead, not yet reaped) counts as ended
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


class TestDrainerProcess:
    def test_a_drainer_that_dies_is_started_again_and_its_applies_reach_metrics(
        self, make_pg_database: Callable[[], str], daemons: Daemons
    ) -> None:
        url = make_pg_database()
        daemon = daemons(url)
        daemon.start()
        [first] = drainer_pids(daemon)
        assert running(first)
        assert first != daemon.pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(drainer_pids(daemon)) == 2, timeout=30, what="a new drainer")
        daemon.wait_ready(30)
        sender = Sender(daemon.base_url)
        item = delivery("stack", "user.created", email="again@example.org", secrets=daemon.secrets)
        sender.send(item, deadline=time.monotonic() + 30)
        wait_until(lambda: live_emails(url) == ["again@example.org"], timeout=20, what="applied")
        metrics = requests.get(daemon.url("/metrics"), timeout=5).text
        assert 'sync_worker_changes_applied_total{action="created",provider="stack"} 1.0' in metrics
        assert daemon.stop() == 0
        assert not running(drainer_pids(daemon)[-1])

    def test_wake_ups_alone_apply_every_delivery_of_concurrent_bursts(
        self, make_pg_database: Callable[[], str], daemons: Daemons
    ) -> None:
        """The receiver writes a wake-up only when none is pending since the child's last
        claim: with a poll of a minute, a wake-up lost that way would leave rows pending."""
        url = make_pg_database()
        daemon = daemons(url, config={"drain": {**FAST_DRAIN, "poll_seconds": 60}})
        daemon.start()
        secrets = daemon.secrets

        def post_burst(worker: int, burst: int) -> list[Sent]:
            sender = Sender(daemon.base_url)
            emails = [f"w{worker}.b{burst}.{n}@example.org" for n in range(10)]
            items = [delivery("stack", "user.created", email=e, secrets=secrets) for e in emails]
            try:
                return [sender.send(item, deadline=time.monotonic() + 30) for item in items]
            finally:
                sender.close()

        acked: list[Sent] = []
        with ThreadPoolExecutor(8) as pool:
            for burst in range(4):
                for sent in pool.map(post_burst, range(8), [burst] * 8):
                    acked.extend(sent)
                time.sleep(random.uniform(0.0, 0.3))  # the drainer idle, or still busy
        assert all(s.acked for s in acked)
        wait_until(lambda: settled(url), timeout=10, what="every delivery applied")
        assert len(live_emails(url)) == len(acked) == 320
        assert_applied_once(url, acked)

    def test_the_drainer_ends_when_the_daemon_is_killed(
        self, make_pg_database: Callable[[], str], daemons: Daemons
    ) -> None:
        daemon = daemons(make_pg_database())
        daemon.start()
        [child] = drainer_pids(daemon)
        assert daemon.kill() == -signal.SIGKILL
        wait_until(lambda: not running(child), timeout=GRACE + 10, what="the drainer's end")


# -- 1. serve and stop ---------------------------------------------------------------------


class TestServeAndStop:
    def test_serves_each_provider_and_sigterm_exits_0_losing_nothing(
        self, make_pg_database: Callable[[], str], daemons: Daemons
    ) -> None:
        url = make_pg_database()
        daemon = daemons(url)
        daemon.start()
        secrets = daemon.secrets
        first = [
            delivery("stack", "user.created", email="stack.ada@example.org", secrets=secrets),
            delivery("authjs", "createUser", email="authjs.bob@example.org", secrets=secrets),
            delivery("auth0", "user.created", email="auth0.cy@example.org", secrets=secrets),
        ]
        sender = Sender(daemon.base_url)
        deadline = time.monotonic() + 30
        sent = [sender.send(item, deadline=deadline) for item in first]
        assert [s.answers for s in sent] == [[200], [200], [200]]
        emails = ["auth0.cy@example.org", "authjs.bob@example.org", "stack.ada@example.org"]
        wait_until(lambda: live_emails(url) == emails, timeout=20, what="the three users")
        wait_until(lambda: settled(url), timeout=20, what="inbox drained")
        assert_applied_once(url, sent)
        assert sorted(row[0] for row in state(url)["identities"]) == ["auth0", "authjs", "stack"]

        # SIGTERM while a burst of requests is in flight: each request either finished
        # (2xx, so stored) or found the port closed; none was cut off with a 5xx.
        burst = [
            delivery("stack", "user.created", email=f"burst{n}@example.org", secrets=secrets)
            for n in range(60)
        ]
        answered: list[Sent] = []

        def post_once(item: Delivery) -> Sent:
            one = Sender(daemon.base_url, timeout=GRACE + 5)
            try:
                result = one.post(item)
            finally:
                one.close()
            answered.append(result)
            return result

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post_once, item) for item in burst]
            wait_until(lambda: len(answered) >= 10, timeout=30, what="10 answers")
            started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            results = [f.result(timeout=60) for f in futures]
        code = daemon.wait_exit(GRACE + 5)
        elapsed = time.monotonic() - started
        assert code == 0, daemon.stderr_tail()
        assert elapsed < GRACE, f"exit took {elapsed:.1f}s, grace is {GRACE}s"
        events = [e["event"] for e in daemon.log_events()]
        assert {"daemon_stopping", "drainer_stopped", "daemon_stopped"} <= set(events)
        assert "shutdown_thread_still_running" not in events
        answers = Counter(s.answers[0] for s in results)
        assert set(answers) <= {200, None}, answers
        assert answers[200] >= 10
        acked = [s for s in results if s.acked]

        # Nothing lost: every 2xx is stored and, once the server stopped, drained before the
        # exit; no row is left leased, failed or pending.
        rows = {(r["provider"], r["event_id"]): r for r in inbox_rows(url)}
        for s in acked:
            row = rows[(s.delivery.provider, s.delivery.event_id)]
            assert row["status"] == "done", row
        assert all(r["claimed_by"] is None for r in rows.values())
        assert {r["status"] for r in rows.values()} == {"done"}
        assert "shutdown_drained" in events

        # After a restart the senders' retries of the rest are stored and applied once
        # each; SIGINT stops it with 0 too.
        daemon.start()
        retry = Sender(daemon.base_url)
        deadline = time.monotonic() + 30
        for s in results:
            if not s.acked:
                retry.send(s.delivery, deadline=deadline, sent=s)
        wait_until(lambda: settled(url), timeout=20, what="inbox drained after restart")
        assert_applied_once(url, [*sent, *results])
        assert len(live_emails(url)) == 3 + len(burst)
        assert daemon.stop(signal.SIGINT, timeout=GRACE + 5) == 0
        assert daemon.log_events()[-1]["event"] == "daemon_stopped"


# -- 2. kill -9 during a stream ------------------------------------------------------------

LANES = 6  # concurrent senders; each owns its users, so a user's events go in order
STACK_USERS, AUTHJS_USERS = 48, 32  # 252 deliveries
KILLS = 3


def stream(secrets: Mapping[str, str]) -> list[list[Delivery]]:
    """A few hundred deliveries, in lanes: Stack users created, renamed twice, some deleted;
    Auth.js users created and renamed twice. Every one changes something (one audit row)."""
    per_user: list[list[Delivery]] = []
    for n in range(STACK_USERS):
        email = f"stack.user{n}@example.org"
        events = [delivery("stack", "user.created", email=email, secrets=secrets)]
        for version in (1, 2):
            rename = _rename("data", f"Stack User {n} v{version}")
            events.append(
                delivery("stack", "user.updated", email=email, secrets=secrets, edit=rename)
            )
        if n % 4 == 0:
            events.append(delivery("stack", "user.deleted", email=email, secrets=secrets))
        per_user.append(events)
    for n in range(AUTHJS_USERS):
        email = f"authjs.user{n}@example.org"
        events = [delivery("authjs", "createUser", email=email, secrets=secrets)]
        for version in (1, 2):
            rename = _rename("user", f"Authjs User {n} v{version}")
            events.append(
                delivery("authjs", "updateUser", email=email, secrets=secrets, edit=rename)
            )
        per_user.append(events)
    # Round-robin over each lane's users, a user's events in order: creates and updates of
    # different users interleave, so a kill lands among both.
    lanes: list[list[Delivery]] = [[] for _ in range(LANES)]
    for lane in range(LANES):
        mine = per_user[lane::LANES]
        for step in range(max(len(e) for e in mine)):
            lanes[lane].extend(e[step] for e in mine if step < len(e))
    return lanes


def _rename(where: str, name: str) -> Callable[[dict[str, Any]], None]:
    def edit(document: dict[str, Any]) -> None:
        if where == "data":  # Stack: the user is the data
            document["data"]["display_name"] = name
        else:  # Auth.js: data.user
            document["data"]["user"]["name"] = name

    return edit


def run_lanes(
    base_url: str,
    lanes: Sequence[Sequence[Delivery]],
    *,
    timeout: float,
    acked: list[Sent],
    pause: float = 0.0,
) -> None:
    """Send every lane's deliveries in order, each retried until a 2xx (``acked`` grows as
    they are), ``pause`` seconds apart; raises the first sender's failure."""
    deadline = time.monotonic() + timeout

    def lane(items: Sequence[Delivery]) -> None:
        sender = Sender(base_url)
        try:
            for item in items:
                acked.append(sender.send(item, deadline=deadline))
                time.sleep(pause)
        finally:
            sender.close()

    with ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(lane, items) for items in lanes]:
            future.result(timeout=timeout + 10)


def reached(acked: list[Sent], mark: int, senders: threading.Thread) -> Callable[[], bool]:
    return lambda: len(acked) >= mark or not senders.is_alive()


class TestKill9:
    def test_sigkill_during_a_stream_loses_nothing_and_applies_each_once(
        self, make_pg_database: Callable[[], str], daemons: Daemons
    ) -> None:
        seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
        rng = random.Random(seed)
        url, clean_url = make_pg_database(), make_pg_database()
        daemon = daemons(url)
        # The clean run's daemon starts meanwhile (a start is seconds of imports).
        clean = daemons(clean_url, secrets=daemon.secrets)
        clean.start(wait=False)
        lanes = stream(daemon.secrets)
        total = sum(map(len, lanes))
        assert 200 <= total <= 300
        daemon.start()
        acked: list[Sent] = []
        failure: list[BaseException] = []

        def senders() -> None:
            try:
                # Paced (about 40 a second in all): the stream outlasts the kills and restarts,
                # however fast the daemon acknowledges.
                run_lanes(daemon.base_url, lanes, timeout=120, acked=acked, pause=0.15)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=senders, name="lanes")
        thread.start()
        killed_at: list[int] = []
        try:
            for mark in sorted(rng.sample(range(20, total - 20), KILLS)):
                wait_until(reached(acked, mark, thread), timeout=60, interval=0.01,
                           what=f"{mark} acks")  # fmt: skip
                time.sleep(rng.uniform(0, 0.05))  # somewhere in a request or a batch
                killed_at.append(len(acked))
                assert daemon.kill() == -signal.SIGKILL
                daemon.start()
        finally:
            thread.join(150)
        assert not failure, f"seed {seed}: {failure[0]!r}"
        assert len(acked) == total
        assert all(s.acked for s in acked)
        assert killed_at[-1] < total, f"seed {seed}: the kills came after the stream"
        retried = sum(len(s.answers) > 1 for s in acked)
        assert retried >= KILLS, f"seed {seed}: the senders never found the daemon down"
        wait_until(lambda: settled(url), timeout=30, what=f"inbox drained (seed {seed})")

        # Every 2xx delivery is stored once, done, and applied once; nothing else is stored.
        assert_applied_once(url, acked)
        assert len(inbox_rows(url)) == total
        assert set(audit_per_event(url)) == {s.delivery.event_id for s in acked}

        # The same deliveries into a fresh database, without kills, end in the same state.
        clean.wait_ready()
        clean_acked: list[Sent] = []
        run_lanes(clean.base_url, lanes, timeout=90, acked=clean_acked)
        wait_until(lambda: settled(clean_url), timeout=30, what="clean inbox drained")
        assert_applied_once(clean_url, clean_acked)
        expected = state(clean_url)
        assert len(expected["users"]) == STACK_USERS + AUTHJS_USERS
        assert sum(not live for *_, live in expected["users"]) == STACK_USERS // 4
        assert state(url) == expected, f"seed {seed}, killed at {killed_at}"
        assert daemon.stop(timeout=GRACE + 5) == 0
        print(f"seed {seed}: killed after {killed_at} acks; {retried} deliveries retried")


# -- 3. the database goes away and comes back -----------------------------------------------


class TestDatabaseOutage:
    def test_503_while_postgres_is_down_and_recovers_by_itself(self, daemons: Daemons) -> None:
        with ExitStack() as stack:
            try:
                admin_url = stack.enter_context(pgserver.temporary_cluster())
            except Exception as exc:  # no binaries: the shared server is never stopped
                if IN_CI:
                    raise
                pytest.skip(f"no private PostgreSQL cluster: {exc}")
            self._outage(admin_url, daemons)

    def _outage(self, admin_url: str, daemons: Daemons) -> None:
        cluster = pgserver.cluster_handle(admin_url)
        url = pgserver.create_database(admin_url)
        daemon = daemons(url)
        daemon.start()
        secrets = daemon.secrets
        sender = Sender(daemon.base_url)

        def users(prefix: str, count: int) -> list[Delivery]:
            return [
                delivery("stack", "user.created", email=f"{prefix}{n}@example.org",
                         secrets=secrets)
                for n in range(count)
            ]  # fmt: skip

        before = [sender.send(d, deadline=time.monotonic() + 20) for d in users("before", 5)]
        wait_until(lambda: settled(url), timeout=20, what="first deliveries applied")
        # A few more, and PostgreSQL stops right behind them: some are stored but maybe
        # not yet applied (or in the drainer's hands) when it goes.
        racing = [sender.send(d, deadline=time.monotonic() + 20) for d in users("racing", 10)]
        pgserver.stop_cluster(cluster, "fast")

        during = users("during", 6)
        outage: list[Sent] = []
        try:
            for item in during:
                outage.append(sender.post(item))
                ready = requests.get(daemon.url("/readyz"), timeout=10)
                assert ready.status_code == 503, ready.text
                assert any(p.startswith("database") for p in ready.json()["problems"])
                assert requests.get(daemon.url("/healthz"), timeout=10).status_code == 200
                time.sleep(0.3)
            assert daemon.alive
            # Never a 2xx for what could not be stored: 503 (with Retry-After), every time.
            assert [s.answers for s in outage] == [[503]] * len(during)
            metrics = requests.get(daemon.url("/metrics"), timeout=10)
            assert metrics.status_code == 200
            assert 'sync_worker_webhook_requests_total{provider="stack",status="503"}' in (
                metrics.text
            )
        finally:
            pgserver.start_cluster(cluster)

        wait_until(
            lambda: requests.get(daemon.url("/readyz"), timeout=10).status_code == 200,
            timeout=30, what="ready again",
        )  # fmt: skip
        assert daemon.alive
        # The senders retry what got a 503 (same ids), and new deliveries are accepted.
        deadline = time.monotonic() + 20
        for s in outage:
            sender.send(s.delivery, deadline=deadline, sent=s)
        after = [sender.send(d, deadline=deadline) for d in users("after", 3)]
        everything = [*before, *racing, *outage, *after]
        assert all(s.acked for s in everything)
        wait_until(lambda: settled(url), timeout=30, what="inbox drained after the outage")
        assert_applied_once(url, everything)
        assert len(live_emails(url)) == len(everything)
        assert daemon.stop(timeout=GRACE + 5) == 0


# -- 4. an oversized body on a real socket -------------------------------------------------


class TestOversizedBody:
    def test_64_mib_chunked_body_is_refused_early_and_stores_nothing(
        self, make_pg_database: Callable[[], str], daemons: Daemons
    ) -> None:
        url = make_pg_database()
        daemon = daemons(url, config={"server": {"max_body_bytes": MiB,
                                                 "grace_seconds": GRACE}})  # fmt: skip
        daemon.start()
        peak_before = daemon.memory_kib("VmHWM")
        offered = 64 * MiB
        # Over the limit (413), and a body never read at all: not JSON (415).
        for content_type, status in (("application/json", 413), ("text/plain", 415)):
            head = (
                "POST /webhooks/auth0 HTTP/1.1\r\n"
                f"Host: {HOST}:{daemon.port}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Authorization: {daemon.secrets['auth0']}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            with socket.create_connection((HOST, daemon.port), timeout=10) as sock:
                sock.sendall(head)
                answer, sent_at_answer, sent, refused = _stream_body(sock, offered)
            assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
            # Answered long before the body was all sent (kernel buffers hold a few MiB),
            # and the server stopped taking it: sending the rest failed.
            assert 0 <= sent_at_answer < 16 * MiB, sent_at_answer
            assert refused, f"the server accepted all {sent} bytes after its {status}"
            assert sent < offered
        peak_after = daemon.memory_kib("VmHWM")

        # Never buffered: the peak resident set did not grow by anything like the body.
        assert peak_after - peak_before < 16 * 1024, (peak_before, peak_after)
        assert inbox_rows(url) == []
        assert daemon.alive
        assert requests.get(daemon.url("/readyz"), timeout=10).status_code == 200
        metrics = requests.get(daemon.url("/metrics"), timeout=10).text
        for status in (413, 415):
            line = f'sync_worker_webhook_requests_total{{provider="auth0",status="{status}"}} 1.0'
            assert line in metrics


def _stream_body(sock: socket.socket, offered: int) -> tuple[bytes, int, int, bool]:
    """Send ``offered`` bytes in 64 KiB chunks, reading as soon as an answer comes, then
    keep sending until the server refuses (a reset or a broken pipe) or all is sent.
    Returns (answer, bytes sent when it came, bytes sent in all, refused)."""
    chunk = b" " * 65536
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    answer, sent, sent_at_answer = b"", 0, -1
    deadline = time.monotonic() + 40
    refused = False
    rest = memoryview(b"")  # what is left of the frame being sent (send may be partial)
    sock.setblocking(False)
    while (sent < offered or rest) and time.monotonic() < deadline:
        readable, writable, _ = select.select([sock], [sock], [], 1.0)
        if readable and sent_at_answer < 0:
            try:
                answer = _read_answer(sock, deadline)
            except ConnectionError:
                refused = True
                break
            sent_at_answer = sent
            continue
        if writable:
            if not rest:
                rest = memoryview(frame)
            try:
                n = sock.send(rest)
            except BlockingIOError:
                continue
            except ConnectionError:  # reset or broken pipe: the server stopped taking it
                refused = True
                break
            rest, sent = rest[n:], sent + n
    return answer, sent_at_answer, sent, refused


def _read_answer(sock: socket.socket, deadline: float) -> bytes:
    """The answer's head and body (it has a Content-Length), read without blocking."""
    data = b""
    while time.monotonic() < deadline:
        try:
            part = sock.recv(65536)
        except BlockingIOError:
            select.select([sock], [], [], 0.5)
            continue
        if not part:
            break
        data += part
        head, _, body = data.partition(b"\r\n\r\n")
        length = [
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ]  # fmt: skip
        if length and len(body) >= length[0]:
            break
    return data
