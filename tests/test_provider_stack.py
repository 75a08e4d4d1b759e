"""StackProvider against the fake Stack Auth server (real HTTP on loopback); to_change tables."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from providers.base import Page
from providers.http import HttpPolicy
from providers.stack import (
    HASH_EXCLUDE,
    LISTING_READ_AHEAD,
    TEAM_IDS_KEY,
    StackProvider,
    pick_tenant,
    server_headers,
    to_change,
)
from sync_worker.changes import ChangeKind, UserChange
from sync_worker.config import StackSettings
from sync_worker.errors import (
    ConfigError,
    ProviderAuthError,
    ProviderError,
    UpstreamDataError,
    UpstreamUnavailable,
)
from tests.fakes.stack import USERS_PATH, StackFake

DATA = Path(__file__).parent / "data" / "stack"
CASES = sorted(p for p in DATA.glob("*.json") if p.name != "invalid_records.json")
INVALID = json.loads((DATA / "invalid_records.json").read_text())["cases"]
FAST = HttpPolicy(
    connect_timeout=2.0,
    read_timeout=2.0,
    max_attempts=5,
    max_retry_seconds=5.0,
    backoff_base=0.001,
    backoff_max=0.005,
)


class Clock:
    """A wall clock the test moves: every read is one second after the previous one."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def fake() -> Iterator[StackFake]:
    server = StackFake()
    server.start()
    yield server
    server.stop()


def provider_for(fake: StackFake, *, page_size: int = 5, **kwargs: Any) -> StackProvider:
    batch_size = kwargs.pop("batch_size", 500)
    clock = kwargs.pop("clock", None) or Clock()
    read_ahead = kwargs.pop("listing_read_ahead", LISTING_READ_AHEAD)
    settings = StackSettings(
        project_id=kwargs.pop("project_id", fake.project_id),
        secret_server_key=kwargs.pop("secret_server_key", fake.secret_server_key),
        base_url=kwargs.pop("base_url", fake.url),
        header_prefix=kwargs.pop("header_prefix", fake.header_prefix),
        page_size=page_size,
        **kwargs,
    )
    return StackProvider(
        settings, policy=FAST, batch_size=batch_size, now=clock, listing_read_ahead=read_ahead
    )


def pull(provider: StackProvider, cursor: dict[str, Any] | None = None, **kw: Any) -> list[Page]:
    try:
        return list(provider.iter_changes(cursor, **kw))
    finally:
        provider.close()


def ids_of(pages: list[Page]) -> list[str]:
    return [c.external_id for page in pages for c in page.changes]


def by_id(pages: list[Page]) -> dict[str, UserChange]:
    return {c.external_id: c for page in pages for c in page.changes}


# -- to_change tables --------------------------------------------------------------------


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_to_change_maps_real_shaped_users(path: Path) -> None:
    case = json.loads(path.read_text())
    observed = datetime.fromisoformat(case["observed_at"])
    change = to_change(
        case["raw"], observed_at=observed, team_ids=case["team_ids"], tenant_id=case["tenant_id"]
    )
    expected = case["expected"]
    attributes = asdict(change.attributes) if change.attributes else {}
    for name, value in expected["attributes"].items():
        actual = attributes[name]
        assert (actual.isoformat() if isinstance(actual, datetime) else actual) == value, name
    assert [asdict(i) for i in change.linked] == expected["linked"]
    assert (change.provider, change.external_id) == ("stack", expected["external_id"])
    assert change.kind is ChangeKind.UPSERT
    assert change.version == observed
    assert change.hash_exclude == HASH_EXCLUDE
    assert (change.raw or {}).get(TEAM_IDS_KEY) == expected["raw_team_ids"]
    # With the memberships known, no tenant is a statement: it clears the stored one. Names,
    # phone and login time are not Stack's to state: a pass keeps what is stored.
    tenant = {"tenant_id"} if case["team_ids"] is not None else set()
    assert (
        attributes["stated"]
        == {"email", "email_verified", "name", "avatar_url", "blocked"} | tenant
    )


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c["why"])
def test_to_change_rejects_unusable_records(case: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - every unusable record is a plain ValueError
        to_change(case["raw"], observed_at=datetime(2026, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("selected", "teams", "personal", "expected"),
    [
        ("t-sel", ["t-old", "t-sel"], set(), "t-sel"),
        ("t-me", ["t-me", "t-old", "t-new"], {"t-me"}, "t-old"),
        ("t-me", ["t-me"], {"t-me"}, None),
        (None, ["t-me", "t-old"], {"t-me"}, "t-old"),
        (None, [], set(), None),
        ("t-fresh", [], set(), "t-fresh"),
    ],
)
def test_pick_tenant(
    selected: str | None, teams: list[str], personal: set[str], expected: str | None
) -> None:
    assert pick_tenant(selected, teams, personal) == expected


# -- listing -----------------------------------------------------------------------------


def test_full_pass_lists_every_user_exactly_once(fake: StackFake) -> None:
    fake.seed(23, anonymous_every=4, restricted_every=5)

    pages = pull(provider_for(fake, page_size=5))

    listed = ids_of(pages)
    assert sorted(listed) == sorted(fake.users)  # anonymous and restricted ones included
    assert len(listed) == len(set(listed)) == 23
    assert [p.complete for p in pages] == [False] * 4 + [True]
    assert all(set(p.cursor or {}) == {"next_cursor"} for p in pages[:-1])
    final = pages[-1]
    assert set(final.cursor or {}) == {"completed_at"}
    assert final.partial_pass is False
    assert sorted(i for p in pages for i in p.seen_ids) == sorted(fake.users)


def test_every_list_request_sends_an_explicit_limit(fake: StackFake) -> None:
    fake.seed(7, anonymous_every=2)

    pull(provider_for(fake, page_size=3))

    requests = fake.requests_to(USERS_PATH)
    assert len(requests) == 3
    for request in requests:
        assert request.arg("limit") == "3"
        assert request.arg("include_anonymous") == "true"
        assert request.arg("order_by") == "signed_up_at"
        assert request.arg("desc") == "false"
    order = ids_in_order(fake)
    assert [r.arg("cursor") for r in requests] == [None, order[3], order[6]]


def test_empty_project_is_one_complete_page(fake: StackFake) -> None:
    pages = pull(provider_for(fake))

    assert len(pages) == 1
    assert pages[0].complete
    assert pages[0].changes == ()


@pytest.mark.parametrize("prefix", ["x-stack", "x-hexclave"])
def test_server_headers_use_the_configured_prefix(prefix: str) -> None:
    server = StackFake(header_prefix=prefix)
    with server:
        server.seed(3)
        pages = pull(provider_for(server, header_prefix=prefix))
        request = server.requests_to(USERS_PATH)[0]
    assert len(ids_of(pages)) == 3
    assert request.header(f"{prefix}-access-type") == "server"
    assert request.header(f"{prefix}-project-id") == server.project_id
    assert request.header(f"{prefix}-secret-server-key") == server.secret_server_key


def test_server_headers_tolerate_a_trailing_dash() -> None:
    settings = StackSettings(project_id="p", secret_server_key="k", header_prefix="x-hexclave-")
    assert set(server_headers(settings)) == {
        "x-hexclave-access-type",
        "x-hexclave-project-id",
        "x-hexclave-secret-server-key",
    }


def test_rejected_key_raises_provider_auth_error(fake: StackFake) -> None:
    fake.seed(2)
    provider = provider_for(fake, secret_server_key="ssk_revoked")

    with pytest.raises(ProviderAuthError):
        pull(provider)


def test_missing_credentials_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="secret_server_key"):
        StackProvider(StackSettings(project_id="p"))


# -- rate limits and faults --------------------------------------------------------------


def test_429_with_and_without_retry_after_is_retried(fake: StackFake) -> None:
    fake.seed(6)
    fake.throttle(1, retry_after="0.01")
    fake.throttle(1, retry_after=None)
    provider = provider_for(fake, page_size=5)

    pages = pull(provider)

    assert sorted(ids_of(pages)) == sorted(fake.users)
    assert provider.http.stats.throttled_429 == 2
    assert len(fake.requests_to(USERS_PATH)) == 2 + 2


def test_windowed_rate_limit_is_survived(fake: StackFake) -> None:
    fake.seed(12)
    fake.limit_rate(3, per_seconds=0.05)
    provider = provider_for(fake, page_size=2)

    pages = pull(provider)

    assert sorted(ids_of(pages)) == sorted(fake.users)
    assert provider.http.stats.throttled_429 >= 1


def test_5xx_is_retried(fake: StackFake) -> None:
    fake.seed(4)
    fake.fail_next(USERS_PATH, status=503, times=2)
    fake.fail_next(r"/api/v1/teams", status=502)
    provider = provider_for(fake)

    pages = pull(provider)

    assert sorted(ids_of(pages)) == sorted(fake.users)
    assert provider.http.stats.retries == 3


def test_persistent_5xx_raises_upstream_unavailable(fake: StackFake) -> None:
    fake.seed(4)
    fake.fail_next(USERS_PATH, status=500, times=50)

    with pytest.raises(UpstreamUnavailable):
        pull(provider_for(fake))


def test_truncated_page_is_retried(fake: StackFake) -> None:
    fake.seed(4)
    fake.truncate_next(length=30)

    pages = pull(provider_for(fake))

    assert sorted(ids_of(pages)) == sorted(fake.users)
    assert len(fake.requests_to(USERS_PATH)) == 2


@pytest.mark.parametrize(
    "inject",
    [
        lambda fake: fake.malformed_next(),
        lambda fake: fake.fail_next(USERS_PATH, status=200, body={"items": []}),
        lambda fake: fake.fail_next(USERS_PATH, status=200, body={"users": [], "pagination": {}}),
    ],
    ids=["not-json", "no-pagination", "no-items"],
)
def test_malformed_page_stops_the_pass_at_the_last_good_cursor(
    fake: StackFake, inject: Any
) -> None:
    fake.seed(12)
    # No listing read ahead: the fault must hit the second page, not the third.
    pages = provider_for(fake, page_size=5, listing_read_ahead=0).iter_changes(None)
    first = next(pages)
    inject(fake)

    with pytest.raises(UpstreamDataError):
        next(pages)

    assert first.cursor == {"next_cursor": ids_in_order(fake)[5]}
    assert not first.complete


def test_a_bad_record_is_isolated_and_still_seen(fake: StackFake) -> None:
    fake.seed(4)
    bad = fake.add_user(oauth_providers=[{"id": "github", "account_id": None, "email": None}])

    pages = pull(provider_for(fake, page_size=10))

    assert len(ids_of(pages)) == 4
    (error,) = pages[-1].errors
    assert error.external_id == bad
    assert "account_id" in error.reason
    assert bad in pages[-1].seen_ids


def test_batch_size_splits_pages_and_only_the_last_batch_resumes(fake: StackFake) -> None:
    fake.seed(7)

    pages = pull(provider_for(fake, page_size=5, batch_size=2))

    assert [len(p.changes) for p in pages] == [2, 2, 1, 2]
    assert [p.cursor is not None for p in pages] == [False, False, True, True]
    assert sorted(ids_of(pages)) == sorted(fake.users)


# -- resuming ----------------------------------------------------------------------------


def ids_in_order(fake: StackFake) -> list[str]:
    return list(fake.listed_ids(include_anonymous=True))


def test_resume_from_next_cursor_is_a_partial_pass(fake: StackFake) -> None:
    fake.seed(12, anonymous_every=3)
    first = next(provider_for(fake, page_size=5).iter_changes(None))

    resumed = pull(provider_for(fake, page_size=5), dict(first.cursor or {}))

    assert ids_of(resumed) == ids_in_order(fake)[5:]
    assert resumed[-1].complete
    assert resumed[-1].partial_pass is True
    assert fake.requests_to(USERS_PATH)[-2].arg("cursor") == first.cursor["next_cursor"]  # type: ignore[index]


def test_full_ignores_the_cursor(fake: StackFake) -> None:
    fake.seed(7)
    cursor = {"next_cursor": ids_in_order(fake)[5]}

    pages = pull(provider_for(fake), cursor, full=True)

    assert sorted(ids_of(pages)) == sorted(fake.users)
    assert pages[-1].partial_pass is False


def test_completed_cursor_starts_a_new_full_pass(fake: StackFake) -> None:
    fake.seed(3)

    pages = pull(provider_for(fake), {"completed_at": "2026-03-01T00:00:00+00:00"})

    assert sorted(ids_of(pages)) == sorted(fake.users)
    assert pages[-1].partial_pass is False


def test_cursor_user_deleted_mid_pass_ends_a_partial_pass(fake: StackFake) -> None:
    fake.seed(12)
    # No listing read ahead: the second page must be asked for after the deletion.
    pages = provider_for(fake, page_size=5, listing_read_ahead=0).iter_changes(None)
    first = next(pages)
    fake.delete_user(first.cursor["next_cursor"])  # type: ignore[index]

    rest = list(pages)

    assert len(rest) == 1
    assert rest[0].complete
    assert rest[0].changes == ()
    assert rest[0].partial_pass is True


def test_the_listing_is_read_ahead_and_stops_with_the_pass(fake: StackFake) -> None:
    fake.seed(30)
    pages = provider_for(fake, page_size=5).iter_changes(None)
    assert isinstance(pages, Generator)  # the pass is a generator: it can be closed
    next(pages)
    deadline = time.monotonic() + 5
    while len(fake.requests_to(USERS_PATH)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fake.requests_to(USERS_PATH)) >= 2  # asked for while the first page was out
    pages.close()
    assert not [t for t in threading.enumerate() if t.name == "pull-read-ahead"]
    asked = len(fake.requests_to(USERS_PATH))
    time.sleep(0.1)
    assert len(fake.requests_to(USERS_PATH)) == asked  # nothing read after the close
    assert asked < 6


def test_anonymous_upgrade_mid_pass_is_not_missed(fake: StackFake) -> None:
    ids = fake.seed(10, anonymous_every=2)
    pages = provider_for(fake, page_size=3).iter_changes(None)
    seen = list(next(pages).seen_ids)
    # Upgrading resets signed_up_at to now: both users move to the end of the listing.
    fake.upgrade_anonymous(ids[1], "was-seen@example.com")
    fake.upgrade_anonymous(ids[7], "not-yet-seen@example.com")

    seen += [i for page in pages for i in page.seen_ids]

    assert set(seen) == set(ids)


# -- teams -> tenant -----------------------------------------------------------------------


@pytest.fixture
def company(fake: StackFake) -> dict[str, str]:
    """Users with personal teams (flagged), two company teams, and one unflagged personal team."""
    ada, bob, cy, dee = (fake.add_user(display_name=n) for n in ("Ada", "Bob", "Cy", "Dee"))
    names = {"ada": ada, "bob": bob, "cy": cy, "dee": dee}
    names["acme"] = fake.add_team("Acme", members=[ada, bob])
    names["beta"] = fake.add_team("Beta", members=[ada, bob])
    for who in ("ada", "bob", "cy"):
        names[f"{who}_personal"] = fake.add_personal_team(names[who])
    names["dee_personal"] = fake.add_personal_team(dee, flag_key=None)
    fake.select_team(bob, names["beta"])
    return names


def test_tenant_is_selected_team_else_oldest_non_personal_membership(
    fake: StackFake, company: dict[str, str]
) -> None:
    changes = by_id(pull(provider_for(fake)))

    def tenant(who: str) -> str | None:
        attributes = changes[company[who]].attributes
        return attributes.tenant_id if attributes else None

    assert tenant("ada") == company["acme"]  # selected is personal -> oldest membership
    assert tenant("bob") == company["beta"]  # selected, non-personal
    assert tenant("cy") is None  # only a personal team
    # Unflagged, a personal team is an ordinary team: the flag is the rule.
    assert tenant("dee") == company["dee_personal"]
    ada_teams = changes[company["ada"]].raw[TEAM_IDS_KEY]  # type: ignore[index]
    assert ada_teams == sorted([company["acme"], company["beta"], company["ada_personal"]])


def test_personal_teams_count_when_configured(fake: StackFake, company: dict[str, str]) -> None:
    changes = by_id(pull(provider_for(fake, include_personal_teams=True)))

    assert changes[company["ada"]].attributes.tenant_id == company["ada_personal"]  # type: ignore[union-attr]
    assert changes[company["cy"]].attributes.tenant_id == company["cy_personal"]  # type: ignore[union-attr]


def test_custom_personal_metadata_key(fake: StackFake) -> None:
    ada = fake.add_user()
    fake.add_personal_team(ada, flag_key="is_personal")

    changes = by_id(pull(provider_for(fake, personal_team_metadata_key="is_personal")))

    assert changes[ada].attributes.tenant_id is None  # type: ignore[union-attr]


def test_teams_and_memberships_are_read_once_per_pass(
    fake: StackFake, company: dict[str, str]
) -> None:
    fake.seed(10)

    pull(provider_for(fake, page_size=3))

    assert len(fake.requests_to(r"/api/v1/teams")) == 1
    assert len(fake.requests_to(r"/api/v1/team-member-profiles")) == 1


# -- content hash --------------------------------------------------------------------------


def test_content_hash_ignores_last_active(fake: StackFake, company: dict[str, str]) -> None:
    fake.seed(6)
    clock = Clock()
    before = by_id(pull(provider_for(fake, clock=clock)))
    for user_id in fake.users:
        fake.touch(user_id)

    after = by_id(pull(provider_for(fake, clock=clock)))

    for user_id, change in after.items():
        old = before[user_id]
        assert change.raw["last_active_at_millis"] != old.raw["last_active_at_millis"]  # type: ignore[index]
        assert change.version != old.version
        assert change.content_hash() == old.content_hash()


def test_content_hash_follows_real_changes(fake: StackFake, company: dict[str, str]) -> None:
    before = by_id(pull(provider_for(fake)))
    fake.update_user(company["cy"], display_name="Cy Young")
    fake.remove_member(company["beta"], company["bob"])

    after = by_id(pull(provider_for(fake)))

    changed = {i for i, c in after.items() if c.content_hash() != before[i].content_hash()}
    assert changed == {company["cy"], company["bob"]}


# -- fetch_user ----------------------------------------------------------------------------


def test_fetch_user_maps_user_and_tenant(fake: StackFake, company: dict[str, str]) -> None:
    provider = provider_for(fake)

    change = provider.fetch_user(company["ada"])

    assert change is not None
    assert change.external_id == company["ada"]
    assert change.attributes.tenant_id == company["acme"]  # type: ignore[union-attr]
    assert fake.requests_to(r"/api/v1/team-member-profiles")[-1].arg("user_id") == company["ada"]


def test_fetch_user_none_when_stack_says_user_not_found(fake: StackFake) -> None:
    provider = provider_for(fake)

    assert provider.fetch_user("8b0c5c1e-0000-4000-8000-000000000000") is None
    assert provider.fetch_user("not-a-uuid") is None
    assert len(fake.requests_to(r"/api/v1/users/.*")) == 1


def test_fetch_user_other_404_is_an_error_not_a_deletion(fake: StackFake) -> None:
    user = fake.add_user()
    provider = provider_for(fake, base_url=fake.url + "/wrong-prefix")

    with pytest.raises(ProviderError):
        provider.fetch_user(user)
