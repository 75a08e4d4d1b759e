"""The shared HTTP policy against a real loopback server: retries, errors, pacing."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import pytest
import requests
from structlog.testing import capture_logs

from providers.http import (
    HttpClient,
    HttpPolicy,
    HttpStatusError,
    UpstreamStatusError,
    UpstreamUnreachable,
)
from sync_worker.config import HttpSettings
from sync_worker.errors import (
    ProviderAuthError,
    RateLimitedError,
    UpstreamDataError,
    UpstreamUnavailable,
)
from tests.fakes.http_server import FakeServer, Request, Response, TokenBucket

FAST = HttpPolicy(backoff_base=0.001, backoff_max=0.01, max_attempts=5, max_retry_seconds=5)


class FakeTime:
    """A monotonic clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer() as server:
        server.route("GET", "/thing", lambda r: Response.json({"ok": True}))
        server.route("GET", "/text", lambda r: Response(body=b"<html>oops"))
        yield server


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def client(fake: FakeServer, fake_time: FakeTime, **kwargs: Any) -> HttpClient:
    kwargs = {"policy": FAST, "sleep": fake_time.sleep, "clock": fake_time.clock, **kwargs}
    return HttpClient(fake.url, provider="test", **kwargs)


def test_policy_from_settings() -> None:
    policy = HttpPolicy.from_settings(HttpSettings(read_timeout=7, max_attempts=3))
    assert (policy.read_timeout, policy.max_attempts, policy.backoff_base) == (7, 3, 0.5)


def test_retries_5xx_then_succeeds_and_logs_without_secrets(
    fake: FakeServer, fake_time: FakeTime
) -> None:
    fake.fail_next("/thing", status=503, times=2)
    http = client(fake, fake_time, auth=lambda: {"Authorization": "Bearer s3cret"})
    with capture_logs() as logs:
        assert http.get_json("/thing", params={"token": "q-s3cret"}) == {"ok": True}
    retries = [e for e in logs if e["event"] == "http_retry"]
    assert [(e["status"], e["attempt"], e["path"]) for e in retries] == [
        (503, 1, "/thing"),
        (503, 2, "/thing"),
    ]
    assert "s3cret" not in repr(logs)
    assert http.stats.requests == 3
    assert http.stats.retries == 2
    assert len(fake_time.sleeps) == 2


def test_429_honours_retry_after_seconds(fake: FakeServer, fake_time: FakeTime) -> None:
    fake.fail_next("/thing", status=429, headers={"Retry-After": "0.25"})
    http = client(fake, fake_time)
    assert http.get_json("/thing") == {"ok": True}
    assert fake_time.sleeps == [0.25]
    assert http.stats.throttled_429 == 1


def test_429_honours_retry_after_http_date(fake: FakeServer, fake_time: FakeTime) -> None:
    fake.fail_next(
        "/thing", status=429, headers={"Retry-After": formatdate(1_000_002, usegmt=True)}
    )
    http = client(fake, fake_time, wall_clock=lambda: 1_000_000.0)
    http.get_json("/thing")
    assert fake_time.sleeps == [2.0]


def test_429_waits_for_ratelimit_reset_without_retry_after(
    fake: FakeServer, fake_time: FakeTime
) -> None:
    reset = {
        "x-ratelimit-limit": "10",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1000003",
    }
    fake.fail_next("/thing", status=429, headers=reset)
    http = client(fake, fake_time, wall_clock=lambda: 1_000_000.0)
    http.get_json("/thing")
    assert fake_time.sleeps[0] == 3.0


@pytest.mark.parametrize("status", [400, 404, 409, 422])
def test_no_retry_on_other_4xx(fake: FakeServer, fake_time: FakeTime, status: int) -> None:
    fake.fail_next("/thing", status=status)
    with pytest.raises(HttpStatusError) as info:
        client(fake, fake_time).get_json("/thing")
    assert info.value.status == status
    assert len(fake.requests) == 1
    assert fake_time.sleeps == []


def test_status_in_ok_is_returned(fake: FakeServer, fake_time: FakeTime) -> None:
    response = client(fake, fake_time).request("GET", "/missing", ok=(200, 404))
    assert response.status_code == 404


def test_401_refreshes_once_then_succeeds(fake: FakeServer, fake_time: FakeTime) -> None:
    tokens = iter(["old", "new"])
    current = {"token": next(tokens)}

    def refresh() -> None:
        current["token"] = next(tokens)

    fake.fail_next("/thing", status=401)
    http = client(
        fake,
        fake_time,
        auth=lambda: {"Authorization": f"Bearer {current['token']}"},
        on_unauthorized=refresh,
    )
    assert http.get_json("/thing") == {"ok": True}
    assert [r.header("Authorization") for r in fake.requests] == ["Bearer old", "Bearer new"]


def test_401_twice_is_an_auth_error(fake: FakeServer, fake_time: FakeTime) -> None:
    calls: list[str] = []
    fake.fail_next("/thing", status=401, times=2)
    http = client(fake, fake_time, on_unauthorized=lambda: calls.append("refresh"))
    with pytest.raises(ProviderAuthError):
        http.get_json("/thing")
    assert calls == ["refresh"]
    assert len(fake.requests) == 2


def test_403_is_an_auth_error_without_refresh(fake: FakeServer, fake_time: FakeTime) -> None:
    calls: list[str] = []
    fake.fail_next("/thing", status=403)
    http = client(fake, fake_time, on_unauthorized=lambda: calls.append("refresh"))
    with pytest.raises(ProviderAuthError):
        http.get_json("/thing")
    assert calls == []


def test_exhausted_429_is_rate_limited(fake: FakeServer, fake_time: FakeTime) -> None:
    fake.fail_next("/thing", status=429, times=10, headers={"Retry-After": "0.5"})
    with pytest.raises(RateLimitedError) as info:
        client(fake, fake_time).get_json("/thing")
    assert info.value.retry_after == 0.5
    assert len(fake.requests) == FAST.max_attempts


def test_exhausted_5xx_is_unavailable(fake: FakeServer, fake_time: FakeTime) -> None:
    fake.fail_next("/thing", status=502, times=10)
    with pytest.raises(UpstreamStatusError) as info:
        client(fake, fake_time).get_json("/thing")
    assert info.value.status == 502
    assert isinstance(info.value, UpstreamUnavailable)
    assert len(fake.requests) == FAST.max_attempts


def test_total_retry_time_is_bounded(fake: FakeServer, fake_time: FakeTime) -> None:
    policy = HttpPolicy(backoff_base=1, backoff_max=4, max_attempts=100, max_retry_seconds=10)
    fake.fail_next("/thing", status=503, times=100)
    with pytest.raises(UpstreamUnavailable):
        client(fake, fake_time, policy=policy).get_json("/thing")
    assert sum(fake_time.sleeps) <= 10
    assert 3 <= len(fake.requests) < 10


def test_retry_after_beyond_the_budget_gives_up_at_once(
    fake: FakeServer, fake_time: FakeTime
) -> None:
    fake.fail_next("/thing", status=429, times=5, headers={"Retry-After": "3600"})
    with pytest.raises(RateLimitedError) as info:
        client(fake, fake_time).get_json("/thing")
    assert info.value.retry_after == 3600
    assert fake_time.sleeps == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused_names_the_url_and_the_reason_once_retried(
    fake_time: FakeTime,
) -> None:
    """A refused connection is a wrong URL or a service that is down: a few quick attempts,
    then one message naming where (without credentials or query) and why."""
    port = closed_port()
    http = HttpClient(
        f"http://robot:s3cret@127.0.0.1:{port}/base",
        provider="test",
        policy=FAST,
        sleep=fake_time.sleep,
        clock=fake_time.clock,
    )
    with pytest.raises(UpstreamUnreachable) as info:
        http.get_json("/thing", params={"token": "q-s3cret"})
    assert isinstance(info.value, UpstreamUnavailable)
    assert http.stats.requests == FAST.unreachable_attempts == 3
    waited = sum(fake_time.sleeps)
    assert str(info.value) == (
        f"test: GET http://127.0.0.1:{port}/base/thing: connection refused "
        f"(after 3 attempts over {waited:.1f} s)"
    )


def test_unreachable_attempts_is_the_policys(fake_time: FakeTime) -> None:
    policy = HttpPolicy(backoff_base=0.001, backoff_max=0.01, unreachable_attempts=1)
    http = HttpClient(
        f"http://127.0.0.1:{closed_port()}", provider="test", policy=policy, sleep=fake_time.sleep
    )
    with pytest.raises(UpstreamUnreachable) as info:
        http.get_json("/thing")
    assert http.stats.requests == 1
    assert str(info.value).endswith("/thing: connection refused")  # no retry, nothing to count


def test_exhausted_5xx_names_the_host_status_and_attempts(
    fake: FakeServer, fake_time: FakeTime
) -> None:
    fake.fail_next("/thing", status=503, times=10)
    with pytest.raises(UpstreamStatusError) as info:
        client(fake, fake_time).get_json("/thing", params={"sig": "q-s3cret"})
    message = str(info.value)
    assert message.startswith(f"test: GET {fake.url}/thing: HTTP 503 (after 5 attempts over ")
    assert "s3cret" not in message


def test_read_timeout_is_retried(fake: FakeServer, fake_time: FakeTime) -> None:
    fake.fail_next("/thing", status=None, delay=0.3)
    policy = HttpPolicy(read_timeout=0.05, backoff_base=0.001, backoff_max=0.01)
    assert client(fake, fake_time, policy=policy).get_json("/thing") == {"ok": True}
    assert len(fake_time.sleeps) == 1


def test_an_exhausted_read_timeout_says_so(fake: FakeServer, fake_time: FakeTime) -> None:
    fake.fail_next("/thing", status=None, delay=0.3, times=5)
    policy = HttpPolicy(read_timeout=0.05, backoff_base=0.001, backoff_max=0.01, max_attempts=2)
    with pytest.raises(UpstreamUnavailable) as info:
        client(fake, fake_time, policy=policy).get_json("/thing")
    assert not isinstance(info.value, UpstreamUnreachable)  # the full budget: it may recover
    assert str(info.value).startswith(
        f"test: GET {fake.url}/thing: read timed out (after 2 attempts over "
    )


def test_truncated_body_is_retried(fake: FakeServer, fake_time: FakeTime) -> None:
    fake.fail_next("/thing", status=None, truncate=3)
    assert client(fake, fake_time).get_json("/thing") == {"ok": True}
    assert len(fake.requests) == 2


def test_a_body_of_several_read_chunks_arrives_whole(fake: FakeServer, fake_time: FakeTime) -> None:
    items = [{"id": n, "pad": "x" * 100} for n in range(30_000)]  # ~3.5 MB, > 1 MiB reads
    fake.route("GET", "/big", lambda r: Response.json({"items": items}))
    http = client(fake, fake_time)
    assert http.get_json("/big") == {"items": items}
    assert http.request("GET", "/thing").json() == {"ok": True}


def test_a_truncated_large_body_is_retried(fake: FakeServer, fake_time: FakeTime) -> None:
    items = list(range(400_000))
    fake.route("GET", "/big", lambda r: Response.json(items))
    fake.fail_next("/big", status=None, truncate=1_500_000)
    assert client(fake, fake_time).get_json("/big") == items
    assert len(fake.requests_to("/big")) == 2


def test_invalid_json_is_a_data_error(fake: FakeServer, fake_time: FakeTime) -> None:
    with pytest.raises(UpstreamDataError):
        client(fake, fake_time).get_json("/text")


def test_credentials_never_leave_the_provider_origin(fake: FakeServer, fake_time: FakeTime) -> None:
    with FakeServer() as other:
        other.route("GET", "/file", lambda r: Response(body=b"data"))
        http = client(fake, fake_time, auth=lambda: {"Authorization": "Bearer s3cret"})
        assert http.request("GET", f"{other.url}/file?sig=x").content == b"data"
        http.get_json("/thing")
    assert other.requests[0].header("Authorization") is None
    assert fake.requests[0].header("Authorization") == "Bearer s3cret"


def test_static_rate_cap_spaces_requests(fake: FakeServer, fake_time: FakeTime) -> None:
    http = client(fake, fake_time, policy=HttpPolicy(requests_per_second=4))
    for _ in range(4):
        http.get_json("/thing")
    assert fake_time.sleeps == pytest.approx([0.25, 0.25, 0.25])


def test_pacing_waits_for_reset_when_the_bucket_is_empty(
    fake: FakeServer, fake_time: FakeTime
) -> None:
    limits = {
        "x-ratelimit-limit": "10",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1000002",
    }
    fake.fail_next("/thing", status=None, headers=limits)
    http = client(fake, fake_time, wall_clock=lambda: 1_000_000.0)
    http.get_json("/thing")
    http.get_json("/thing")
    assert fake_time.sleeps == [2.0]


def test_pacing_is_per_endpoint_group(fake: FakeServer, fake_time: FakeTime) -> None:
    limits = {
        "x-ratelimit-limit": "10",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1000002",
    }
    fake.fail_next("/thing", status=None, headers=limits)
    fake.route("GET", "/other", lambda r: Response.json([]))
    http = client(fake, fake_time, wall_clock=lambda: 1_000_000.0)
    http.get_json("/thing")
    http.get_json("/other")
    assert fake_time.sleeps == []


def limited_server(bucket: TokenBucket) -> FakeServer:
    server = FakeServer()

    def handler(request: Request) -> Response:
        allowed, headers = bucket.take()
        if not allowed:
            return Response.json({"statusCode": 429}, status=429, headers=headers)
        return Response.json({"ok": True}, headers=headers)

    server.route("GET", "/limited", handler)
    return server


def test_pacing_stays_under_an_enforced_limit() -> None:
    with limited_server(TokenBucket(capacity=4, per_second=100)) as server:
        http = HttpClient(server.url, provider="test", policy=FAST)
        started = time.monotonic()
        for _ in range(30):
            http.get_json("/limited")
        elapsed = time.monotonic() - started
    assert http.stats.throttled_429 == 0
    # 26 requests beyond the burst at 100/s take at least ~0.26 s: the client really waited.
    assert elapsed >= 0.2
    assert http.stats.waited_seconds > 0


def test_an_unpaced_burst_would_be_throttled() -> None:
    """Guards the test above: the bucket does reject a client that ignores the headers. Its
    refill is slow here so that a loaded machine, whose requests are slow too, cannot keep
    under it by accident (30 requests would need 13 s)."""
    with limited_server(TokenBucket(capacity=4, per_second=2)) as server, requests.Session() as s:
        statuses = [s.get(f"{server.url}/limited").status_code for _ in range(30)]
    assert 429 in statuses
