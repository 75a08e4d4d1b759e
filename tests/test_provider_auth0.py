"""Auth0 adapter against the fake tenant over real HTTP, plus table tests of the pure parts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from providers.auth0 import EXPORT_FIELDS, Auth0Provider, plan_logs, to_change
from providers.base import Page
from providers.http import HttpPolicy, HttpStatusError
from sync_worker.changes import IDP_FIELDS, ChangeKind, parse_timestamp
from sync_worker.config import Auth0Settings
from sync_worker.errors import (
    ConfigError,
    ProviderAuthError,
    UpstreamDataError,
    UpstreamUnavailable,
)
from tests.fakes.auth0 import FakeAuth0

DATA = Path(__file__).parent / "data" / "auth0"
FAST = HttpPolicy(backoff_base=0.001, backoff_max=0.01, max_attempts=4, max_retry_seconds=2)
USER_PATH = r"/api/v2/users/[^/]+"


def cases(name: str) -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = json.loads((DATA / name).read_text())
    return loaded


@pytest.fixture
def fake() -> Iterator[FakeAuth0]:
    with FakeAuth0() as server:
        yield server


def settings_for(fake: FakeAuth0, **overrides: Any) -> Auth0Settings:
    values = {
        "domain": fake.domain,
        "base_url": fake.url,
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        **overrides,
    }
    return Auth0Settings(**values)


def make_provider(
    fake: FakeAuth0, *, settings: Auth0Settings | None = None, **kwargs: Any
) -> Auth0Provider:
    options = {"policy": FAST, "poll_interval": 0.001, "batch_size": 5, **kwargs}
    return Auth0Provider(settings or settings_for(fake), **options)


@pytest.fixture
def provider(fake: FakeAuth0) -> Iterator[Auth0Provider]:
    adapter = make_provider(fake)
    yield adapter
    adapter.close()


def full_sync(provider: Auth0Provider) -> list[Page]:
    return list(provider.iter_changes(None))


def cursor_after_full(provider: Auth0Provider) -> dict[str, Any]:
    return dict(full_sync(provider)[-1].cursor or {})


def token_requests(fake: FakeAuth0) -> int:
    return len(fake.requests_to("/oauth/token"))


# -- pure mapping -------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("users.json"), ids=lambda c: c["name"])
def test_to_change(case: dict[str, Any]) -> None:
    change = to_change(case["raw"])
    expected = case["expected"]
    assert change.provider == "auth0"
    assert change.kind is ChangeKind.UPSERT
    assert change.external_id == expected["external_id"]
    assert change.version == parse_timestamp(expected["version"])
    attributes = asdict(change.attributes) if change.attributes else {}
    # Auth0 states every IdP-owned field; a missing role or tenant leaves the stored one:
    # app_metadata is the app's to fill.
    assert attributes.pop("stated") == frozenset(IDP_FIELDS)
    for key in ("last_login_at", "created_at"):
        expected["attributes"][key] = parse_timestamp(expected["attributes"][key])
    assert attributes == expected["attributes"]
    assert [asdict(i) for i in change.linked] == expected["linked"]


def test_to_change_keeps_no_idp_tokens_and_hashes_without_login_noise() -> None:
    raw = cases("users.json")[2]["raw"]
    before = json.dumps(raw)
    change = to_change(raw)
    assert "SECRET" not in json.dumps(change.raw)
    assert json.dumps(raw) == before  # a pure mapping: the input is left as it was
    relogged = to_change({**raw, "last_login": "2027-01-01T00:00:00Z", "logins_count": 99})
    assert to_change({**raw, "logins_count": 3}).content_hash() == change.content_hash()
    assert relogged.content_hash() != change.content_hash()  # last_login_at is an attribute


@pytest.mark.parametrize("case", cases("invalid.json"), ids=lambda c: c["name"])
def test_to_change_rejects_unusable_records(case: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case names its own cause
        to_change(case["raw"])


@pytest.mark.parametrize("case", cases("logs.json"), ids=lambda c: c["name"])
def test_plan_logs(case: dict[str, Any]) -> None:
    plan = plan_logs(case["logs"])
    assert {k: v["log_id"] for k, v in plan.fetch.items()} == case["fetch"]
    assert {k: v["log_id"] for k, v in plan.delete.items()} == case["delete"]
    assert [e["log_id"] for e in plan.logins] == case["logins"]
    assert plan.skipped == case["skipped"]


# -- configuration ------------------------------------------------------------------------


def test_audience_names_the_domain_even_with_a_base_url_override(fake: FakeAuth0) -> None:
    fake.seed_users(1)
    with closing(make_provider(fake)) as adapter:
        assert adapter.fetch_user(next(iter(fake.users))) is not None
    form = fake.requests_to("/oauth/token")[0].form()
    assert form["audience"] == f"https://{fake.domain}/api/v2/"
    assert form["grant_type"] == "client_credentials"
    assert form["client_secret"] == fake.client_secret


def test_audience_falls_back_to_the_base_url(fake: FakeAuth0) -> None:
    fake.audience = f"{fake.url}/api/v2/"  # a tenant known only by its base URL
    settings = settings_for(fake, domain=None)
    with closing(make_provider(fake, settings=settings)) as adapter:
        assert adapter.fetch_user("auth0|missing") is None
    assert fake.requests_to("/oauth/token")[0].form()["audience"] == f"{fake.url}/api/v2/"


def test_missing_credentials_are_a_config_error(fake: FakeAuth0) -> None:
    with pytest.raises(ConfigError, match="client_secret"):
        Auth0Provider(settings_for(fake, client_secret=None))


# -- token --------------------------------------------------------------------------------


def test_token_is_cached_and_reused(fake: FakeAuth0, provider: Auth0Provider) -> None:
    fake.seed_users(12)
    full_sync(provider)
    for user_id in list(fake.users)[:3]:
        provider.fetch_user(user_id)
    assert token_requests(fake) == 1
    bearer = {r.header("Authorization") for r in fake.requests if r.path.startswith("/api/")}
    assert len(bearer) == 1
    header = bearer.pop()
    assert header is not None
    assert header.startswith("Bearer ey")


def test_token_is_refreshed_shortly_before_expiry(fake: FakeAuth0) -> None:
    skew = [0.0]
    fake.token_ttl = 3600
    fake.seed_users(2)
    user_id = next(iter(fake.users))
    with closing(make_provider(fake, clock=lambda: time.monotonic() + skew[0])) as adapter:
        adapter.fetch_user(user_id)
        skew[0] = 3600 - 30  # inside the token's life, past its safety margin
        adapter.fetch_user(user_id)
        adapter.fetch_user(user_id)
    assert token_requests(fake) == 2


def test_token_is_refreshed_on_401(fake: FakeAuth0, provider: Auth0Provider) -> None:
    fake.seed_users(2)
    user_id = next(iter(fake.users))
    provider.fetch_user(user_id)
    fake.expire_tokens()
    assert provider.fetch_user(user_id) is not None
    assert token_requests(fake) == 2
    statuses = [r.path for r in fake.requests_to(USER_PATH)]
    assert len(statuses) == 3  # ok, 401, ok after the refresh


def test_rejected_credentials_raise_auth_error(fake: FakeAuth0) -> None:
    settings = settings_for(fake, client_secret="wrong")
    adapter = make_provider(fake, settings=settings)
    with closing(adapter), pytest.raises(ProviderAuthError):
        adapter.fetch_user("auth0|x")
    assert token_requests(fake) == 1


def test_wrong_audience_is_an_auth_error(fake: FakeAuth0) -> None:
    settings = settings_for(fake, audience="https://example.org/api/v2/jobs")
    adapter = make_provider(fake, settings=settings)
    with closing(adapter), pytest.raises(ProviderAuthError):
        adapter.fetch_user("auth0|x")


def test_token_endpoint_429_is_retried(fake: FakeAuth0, provider: Auth0Provider) -> None:
    fake.fail_next("/oauth/token", status=429, headers={"Retry-After": "0.01"})
    assert provider.fetch_user("auth0|missing") is None
    assert token_requests(fake) == 2


# -- retries ------------------------------------------------------------------------------


def test_5xx_and_429_are_retried_honouring_retry_after(
    fake: FakeAuth0, provider: Auth0Provider
) -> None:
    fake.seed_users(1)
    fake.fail_next(USER_PATH, status=503)
    fake.fail_next(USER_PATH, status=429, headers={"Retry-After": "0.02"})
    started = time.monotonic()
    assert provider.fetch_user(next(iter(fake.users))) is not None
    assert time.monotonic() - started >= 0.02
    assert len(fake.requests_to(USER_PATH)) == 3
    assert provider.http.stats.retries == 2


def test_404_is_not_retried(fake: FakeAuth0, provider: Auth0Provider) -> None:
    assert provider.fetch_user("auth0|gone") is None
    assert len(fake.requests_to(USER_PATH)) == 1


def test_400_is_not_retried(fake: FakeAuth0, provider: Auth0Provider) -> None:
    fake.fail_next(USER_PATH, status=400)
    with pytest.raises(HttpStatusError) as info:
        provider.fetch_user("auth0|bad")
    assert info.value.status == 400
    assert len(fake.requests_to(USER_PATH)) == 1


def test_total_retry_time_is_bounded(fake: FakeAuth0) -> None:
    policy = HttpPolicy(backoff_base=0.05, backoff_max=0.1, max_attempts=100, max_retry_seconds=0.3)
    fake.fail_next(USER_PATH, status=503, times=1000)
    started = time.monotonic()
    adapter = make_provider(fake, policy=policy)
    with closing(adapter), pytest.raises(UpstreamUnavailable):
        adapter.fetch_user("auth0|x")
    assert time.monotonic() - started < 1.0
    assert 2 <= len(fake.requests_to(USER_PATH)) < 100


# -- full sync ----------------------------------------------------------------------------


def test_full_sync_streams_the_export_in_pages(fake: FakeAuth0, provider: Auth0Provider) -> None:
    users = fake.seed_users(23)
    newest = fake.logs[-1]["log_id"]
    pages = full_sync(provider)
    # The cursor and completeness come last, on a page of their own, once the file is read.
    assert [len(p.changes) for p in pages] == [5, 5, 5, 5, 3, 0]
    assert [p.cursor for p in pages[:-1]] == [None] * 5
    assert [p.complete for p in pages] == [False] * 5 + [True]
    assert pages[-1].cursor == {"log_id": newest}
    assert [i for p in pages for i in p.seen_ids] == [u["user_id"] for u in users]
    assert all(c.kind is ChangeKind.UPSERT and c.version for p in pages for c in p.changes)
    assert not any(p.errors for p in pages)


def test_full_sync_asks_for_explicit_fields_and_downloads_without_credentials(
    fake: FakeAuth0, provider: Auth0Provider
) -> None:
    fake.seed_users(3)
    full_sync(provider)
    job = fake.requests_to("/api/v2/jobs/users-exports")[0].json()
    assert job["format"] == "json"
    assert [f["name"] for f in job["fields"]] == list(EXPORT_FIELDS)
    assert "connection_id" not in job  # every connection
    assert len(fake.requests_to(r"/api/v2/jobs/job_\w+")) == fake.job_polls + 1
    download = fake.cdn.requests[0]
    assert download.header("Authorization") is None
    assert not fake.requests_to(r"/api/v2/users.*")  # never pages the capped search


def test_full_sync_reads_the_log_position_before_the_export(
    fake: FakeAuth0, provider: Auth0Provider
) -> None:
    fake.seed_users(4)
    full_sync(provider)
    order = [r.path for r in fake.requests if r.path.startswith("/api/v2/")]
    assert order[0] == "/api/v2/logs"
    assert order[1] == "/api/v2/jobs/users-exports"


def test_full_sync_ending_on_a_page_boundary_yields_no_empty_data_page(
    fake: FakeAuth0, provider: Auth0Provider
) -> None:
    fake.seed_users(10)
    pages = full_sync(provider)
    assert [(len(p.changes), p.complete) for p in pages] == [(5, False), (5, False), (0, True)]


def test_full_sync_of_an_empty_tenant(fake: FakeAuth0, provider: Auth0Provider) -> None:
    pages = full_sync(provider)
    assert len(pages) == 1
    assert pages[0].complete
    assert pages[0].changes == ()
    assert pages[0].cursor == {"log_id": None}


def test_malformed_export_line_is_isolated(fake: FakeAuth0, provider: Auth0Provider) -> None:
    fake.seed_users(12)
    fake.corrupt_next_export(6)
    pages = full_sync(provider)
    errors = [e for p in pages for e in p.errors]
    assert len(errors) == 1
    assert "line 7" in errors[0].reason
    assert sum(len(p.changes) for p in pages) == 11
    assert pages[-1].complete


def test_unmappable_export_record_is_a_record_error(
    fake: FakeAuth0, provider: Auth0Provider
) -> None:
    fake.seed_users(3)
    fake.corrupt_next_export(1, b'{"user_id": "auth0|odd", "identities": "github"}')
    pages = full_sync(provider)
    assert [e.external_id for p in pages for e in p.errors] == ["auth0|odd"]
    assert "auth0|odd" in pages[0].seen_ids


def test_truncated_gzip_raises_before_any_complete_page(
    fake: FakeAuth0, provider: Auth0Provider
) -> None:
    fake.seed_users(40)
    fake.truncate_next_export()
    seen: list[Page] = []
    with pytest.raises(UpstreamDataError):
        seen.extend(provider.iter_changes(None))
    assert not any(p.complete or p.cursor for p in seen)


def test_download_cut_by_the_network_raises(fake: FakeAuth0, provider: Auth0Provider) -> None:
    fake.seed_users(40)
    fake.cdn.fail_next(r"/exports/.*", status=None, truncate=300)
    seen: list[Page] = []
    with pytest.raises(UpstreamDataError):
        seen.extend(provider.iter_changes(None, full=True))
    assert not any(p.complete for p in seen)


def test_export_is_streamed_not_downloaded_whole(fake: FakeAuth0, provider: Auth0Provider) -> None:
    """Pages come out while the download is still arriving: a cut half way through the
    file is noticed only after the pages read before it."""
    fake.seed_users(400, signup_logs=False)
    fake.cdn.fail_next(r"/exports/.*", status=None, truncate=20_000)
    seen: list[Page] = []
    with pytest.raises(UpstreamDataError):
        seen.extend(provider.iter_changes(None))
    assert len(seen) >= 10
    assert not any(p.complete or p.cursor for p in seen)


class VirtualTime:
    """A clock that moves only when the adapter sleeps, shared with the fake's jobs."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def vtime() -> VirtualTime:
    return VirtualTime()


@pytest.fixture
def timed_fake(vtime: VirtualTime) -> Iterator[FakeAuth0]:
    with FakeAuth0(clock=vtime.clock) as server:
        server.seed_users(3, signup_logs=False)
        yield server


def export_sleeps(
    fake: FakeAuth0, vtime: VirtualTime, *, poll_interval: float = 1.0, **settings: Any
) -> list[float]:
    """The sleeps of one full sync polling the fake's export job, on virtual time."""
    adapter = make_provider(
        fake,
        settings=settings_for(fake, **settings),
        poll_interval=poll_interval,
        sleep=vtime.sleep,
        clock=vtime.clock,
    )
    with closing(adapter):
        assert sum(len(p.changes) for p in full_sync(adapter)) == len(fake.users)
    return vtime.sleeps


def job_polls(fake: FakeAuth0) -> int:
    return len(fake.requests_to(r"/api/v2/jobs/job_\w+"))


def test_export_poll_sleeps_as_long_as_the_job_says(
    timed_fake: FakeAuth0, vtime: VirtualTime
) -> None:
    timed_fake.export_seconds = 7
    assert export_sleeps(timed_fake, vtime) == [7.0]  # one poll on arrival, not 1+2+4
    assert job_polls(timed_fake) == 2


def test_export_poll_hint_is_clamped_to_the_poll_bounds(
    timed_fake: FakeAuth0, vtime: VirtualTime
) -> None:
    timed_fake.export_seconds = 33.2
    # 33 s left: capped at 15 twice; then 3; then a hint of 0 ("almost") waits poll_interval.
    assert export_sleeps(timed_fake, vtime, poll_interval=2.0) == [15.0, 15.0, 3.0, 2.0]


def test_export_poll_estimate_from_a_poll_counted_job(
    timed_fake: FakeAuth0, vtime: VirtualTime
) -> None:
    timed_fake.job_polls = 3
    with capture_logs() as logs:
        sleeps = export_sleeps(timed_fake, vtime)
    # Elapsed time scaled by the work left: nothing to go on at first, then ~1 s per poll
    # left, so the poller keeps its 1 s pace instead of backing off past completion.
    hints = [e["time_left_seconds"] for e in logs if e["event"] == "auth0_export_poll"]
    assert hints == [0.0, 1.0, 1.0]
    assert sleeps == [1.0, 1.0, 1.0]


def test_export_poll_backs_off_by_half_without_a_hint(
    timed_fake: FakeAuth0, vtime: VirtualTime
) -> None:
    timed_fake.report_time_left = False
    timed_fake.job_polls = 9
    sleeps = export_sleeps(timed_fake, vtime)
    assert sleeps == pytest.approx([1.5**n for n in range(7)] + [15.0, 15.0])


class BadHintAuth0(FakeAuth0):
    """Sends an unusable time_left_seconds while the job runs."""

    hint: object = None

    def _job_view(self, job: Any) -> dict[str, Any]:
        view = super()._job_view(job)
        return view if "location" in view else {**view, "time_left_seconds": self.hint}


@pytest.mark.parametrize("hint", [-5, "12", True, None, 1e300])
def test_export_poll_ignores_an_unusable_hint(vtime: VirtualTime, hint: object) -> None:
    with BadHintAuth0(clock=vtime.clock, job_polls=3) as fake:
        fake.hint = hint
        sleeps = export_sleeps(fake, vtime)
    # 1e300 is a usable (huge) number, so the cap applies. (Infinity is not JSON at all: the
    # poll's body would be an UpstreamDataError.)
    assert sleeps == ([15.0] * 3 if hint == 1e300 else [1.0, 1.5, 2.25])


def test_export_poll_logs_progress(timed_fake: FakeAuth0, vtime: VirtualTime) -> None:
    timed_fake.export_seconds = 5
    with capture_logs() as logs:
        export_sleeps(timed_fake, vtime)
    polls = [e for e in logs if e["event"] == "auth0_export_poll"]
    assert [(e["log_level"], e["status"], e["percentage_done"]) for e in polls] == [
        ("info", "processing", 0.0)
    ]
    assert polls[0]["time_left_seconds"] == 5.0
    assert polls[0]["sleep"] == 5.0


def test_export_poll_stops_at_the_deadline_with_a_hint(
    timed_fake: FakeAuth0, vtime: VirtualTime
) -> None:
    timed_fake.export_seconds = 10_000
    with pytest.raises(UpstreamUnavailable, match="still processing at deadline"):
        export_sleeps(timed_fake, vtime, export_poll_max_seconds=60)
    assert vtime.sleeps == [15.0] * 4  # never sleeps past the deadline
    assert job_polls(timed_fake) == 5


def test_export_poll_stops_at_the_deadline_without_a_hint(
    timed_fake: FakeAuth0, vtime: VirtualTime
) -> None:
    timed_fake.report_time_left = False
    timed_fake.job_polls = 10_000
    with pytest.raises(UpstreamUnavailable, match="deadline"):
        export_sleeps(timed_fake, vtime, export_poll_max_seconds=10)
    assert vtime.sleeps == pytest.approx([1.0, 1.5, 2.25, 3.375])  # 8.125 s; 5.06 more > 10
    assert vtime.now <= 10


def test_export_poll_is_bounded_in_real_time(fake: FakeAuth0) -> None:
    fake.job_polls = 10_000
    fake.report_time_left = False
    settings = settings_for(fake, export_poll_max_seconds=0.05)
    adapter = make_provider(fake, settings=settings)
    with closing(adapter), pytest.raises(UpstreamUnavailable, match="deadline"):
        full_sync(adapter)
    assert 2 <= job_polls(fake) < 20


def test_failed_export_job_raises(vtime: VirtualTime) -> None:
    class FailingAuth0(FakeAuth0):
        def _job_view(self, job: Any) -> dict[str, Any]:
            view = super()._job_view(job)
            return {**view, "status": "failed"} if job.polls >= 2 else view

    with FailingAuth0(clock=vtime.clock, job_polls=5) as fake:
        fake.seed_users(1)
        with pytest.raises(UpstreamUnavailable, match="failed"):
            export_sleeps(fake, vtime)
        assert job_polls(fake) == 2


# -- incremental --------------------------------------------------------------------------


def test_incremental_resolves_logs_to_changes(fake: FakeAuth0, provider: Auth0Provider) -> None:
    ids = [u["user_id"] for u in fake.seed_users(8)]
    cursor = cursor_after_full(provider)
    fake.update_user(ids[0], name="Renamed One")
    fake.login(ids[1])
    fake.delete_user(ids[2])
    fake.update_user(ids[3], log_type="sce", email="new3@example.org")
    fake.update_user(ids[3], log_type="sv", email_verified=True)
    fake.login(ids[3])
    fake.update_user(ids[4], log_type="sce", email="gone@example.org")
    fake.delete_user(ids[4], log_type="sapi")
    created = fake.create_user()["user_id"]
    fetched_before = len(fake.requests_to(USER_PATH))

    pages = list(provider.iter_changes(cursor))

    assert len(pages) == 1
    by_kind = {(c.kind, c.external_id): c for c in pages[0].changes}
    assert set(by_kind) == {
        (ChangeKind.UPSERT, ids[0]),
        (ChangeKind.LOGIN, ids[1]),
        (ChangeKind.DELETE, ids[2]),
        (ChangeKind.UPSERT, ids[3]),
        (ChangeKind.LOGIN, ids[3]),
        (ChangeKind.DELETE, ids[4]),
        (ChangeKind.UPSERT, created),
    }
    renamed = by_kind[(ChangeKind.UPSERT, ids[0])]
    verified = by_kind[(ChangeKind.UPSERT, ids[3])]
    assert renamed.attributes is not None
    assert renamed.attributes.name == "Renamed One"
    assert verified.attributes is not None
    assert verified.attributes.email_verified
    # Deduped: one GET per user needing a re-read; deleted users are not fetched.
    assert len(fake.requests_to(USER_PATH)) - fetched_before == 3
    assert pages[0].cursor == {"log_id": fake.logs[-1]["log_id"]}


def test_login_and_delete_changes_carry_the_log_details(
    fake: FakeAuth0, provider: Auth0Provider
) -> None:
    ids = [u["user_id"] for u in fake.seed_users(2)]
    cursor = cursor_after_full(provider)
    event = fake.login(ids[0], ip="198.51.100.7")
    fake.delete_user(ids[1])
    [page] = provider.iter_changes(cursor)
    changes = page.changes
    login = next(c for c in changes if c.kind is ChangeKind.LOGIN)
    assert login.session is not None
    assert login.session.external_session_id == event["log_id"]
    assert login.session.ip == "198.51.100.7"
    assert login.session.created_at == parse_timestamp(event["date"]) == login.version
    deleted = next(c for c in changes if c.kind is ChangeKind.DELETE)
    assert deleted.version == parse_timestamp(fake.logs[-1]["date"])
    assert deleted.event_id == fake.logs[-1]["log_id"]


def test_user_missing_on_fetch_becomes_a_delete(fake: FakeAuth0, provider: Auth0Provider) -> None:
    fake.seed_users(1)
    cursor = cursor_after_full(provider)
    fake.add_log("sce", "auth0|already-gone")
    [page] = provider.iter_changes(cursor)
    changes = page.changes
    assert [(c.kind, c.external_id) for c in changes] == [(ChangeKind.DELETE, "auth0|already-gone")]


def test_unmappable_fetched_user_is_a_record_error(
    fake: FakeAuth0, provider: Auth0Provider
) -> None:
    ids = [u["user_id"] for u in fake.seed_users(3)]
    cursor = cursor_after_full(provider)
    fake.update_user(ids[0], email=42)
    fake.update_user(ids[1], name="Fine")
    [page] = provider.iter_changes(cursor)
    assert [e.external_id for e in page.errors] == [ids[0]]
    assert [c.external_id for c in page.changes] == [ids[1]]


def test_each_page_cursor_is_its_last_log_id(fake: FakeAuth0) -> None:
    ids = [u["user_id"] for u in fake.seed_users(3)]
    with closing(make_provider(fake, settings=settings_for(fake, page_size=4))) as adapter:
        cursor = cursor_after_full(adapter)
        start = len(fake.logs)
        for i in range(10):
            fake.login(ids[i % 3])
        pages = list(adapter.iter_changes(cursor))
    new_ids = [e["log_id"] for e in fake.logs[start:]]
    assert [p.cursor for p in pages] == [{"log_id": new_ids[i]} for i in (3, 7, 9)]
    assert [len(p.changes) for p in pages] == [4, 4, 2]
    log_requests = fake.requests_to("/api/v2/logs")[1:]  # after the full sync's position read
    expected_from = [cursor["log_id"], new_ids[3], new_ids[7], new_ids[9]]
    assert [r.arg("from") for r in log_requests] == expected_from


def test_link_to_the_public_domain_is_followed_through_the_base_url(fake: FakeAuth0) -> None:
    ids = [u["user_id"] for u in fake.seed_users(2)]
    fake.link_base = "https://tenant.invalid"  # never resolves: the client must not go there
    with closing(make_provider(fake, settings=settings_for(fake, page_size=2))) as adapter:
        cursor = cursor_after_full(adapter)
        for i in range(5):
            fake.login(ids[i % 2])
        pages = list(adapter.iter_changes(cursor))
    assert [len(p.changes) for p in pages] == [2, 2, 1]


def test_token_endpoint_outage_is_bounded(fake: FakeAuth0, provider: Auth0Provider) -> None:
    fake.fail_next("/oauth/token", status=503, times=100)
    with pytest.raises(UpstreamUnavailable):
        provider.fetch_user("auth0|x")
    assert token_requests(fake) == FAST.max_attempts
    assert not fake.requests_to(USER_PATH)


def test_no_new_logs_yields_nothing(fake: FakeAuth0, provider: Auth0Provider) -> None:
    fake.seed_users(2)
    cursor = cursor_after_full(provider)
    assert list(provider.iter_changes(cursor)) == []


def test_failing_logs_page_raises_and_cursors_never_pass_it(fake: FakeAuth0) -> None:
    ids = [u["user_id"] for u in fake.seed_users(2)]
    with closing(make_provider(fake, settings=settings_for(fake, page_size=2))) as adapter:
        cursor = cursor_after_full(adapter)
        start = len(fake.logs)
        for i in range(6):
            fake.login(ids[i % 2])
        # Queued before the pass: its next page is read ahead while the first is handed out,
        # so a fault queued after next() could come too late (the test raced under load).
        fake.fail_next("/api/v2/logs", status=500, times=100, after=1)
        pages = adapter.iter_changes(cursor)
        first = next(pages)
        with pytest.raises(UpstreamUnavailable):
            next(pages)
    assert first.cursor == {"log_id": fake.logs[start + 1]["log_id"]}


def test_pacing_keeps_a_run_under_the_limit(fake: FakeAuth0) -> None:
    ids = [u["user_id"] for u in fake.seed_users(30)]
    fake.set_limit("users", 4, 200.0)
    fake.set_limit("logs", 2, 100.0)
    settings = settings_for(fake, page_size=5)
    with closing(make_provider(fake, policy=HttpPolicy(), settings=settings)) as adapter:
        cursor = cursor_after_full(adapter)
        for user_id in ids:
            fake.update_user(user_id, log_type="sce", email=f"{user_id[-6:]}@example.org")
        pages = list(adapter.iter_changes(cursor))
    assert sum(len(p.changes) for p in pages) == 30
    assert fake.throttled <= 1
    assert adapter.http.stats.waited_seconds > 0
