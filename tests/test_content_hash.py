"""UserChange.content_hash is stored (user_identities.content_hash): its value must not drift.

A changed digest would make every stored user look changed on the next full pass. The
pinned digests were computed by the original ``asdict``-based implementation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from providers.auth0 import to_change
from sync_worker.changes import LinkedIdentity, UserChange
from tests.factories import at, upsert

DATA = Path(__file__).parent / "data"


def flat_profile() -> UserChange:
    github = LinkedIdentity(provider="auth0:github", external_id="42", email="x@example.org")
    return upsert(
        "auth0|pinned",
        5,
        profile={"timezone": "Europe/Berlin", "locale": "de-DE"},
        last_login_at=at(4),
        created_at=at(-60),
        linked=(github,),
    )


def nested_profile() -> UserChange:
    return upsert(
        "auth0|nested",
        1,
        profile={"settings": {"theme": "dark", "tags": ["a", "b"]}, "seen": at(2)},
    )


def auth0_user() -> UserChange:
    cases = json.loads((DATA / "auth0" / "users.json").read_text())
    return to_change(cases[0]["raw"])


@pytest.mark.parametrize(
    ("build", "digest"),
    [
        (flat_profile, "c940352c41f77e3eabec074ef3833069ba56236ec3b6d76488f0fa376b6ef7d1"),
        (nested_profile, "48cfcedd91cdfd1261a217ffe65a4b3e22c58733fe2c6f885a468b905a2ce141"),
        (auth0_user, "3038d7fd135c42d8132402d4911e2c8ec83498a728eb4bdafc5e5f5b03665822"),
    ],
)
def test_digest_is_pinned(build: Callable[[], UserChange], digest: str) -> None:
    assert build().content_hash() == digest


def test_digest_follows_the_attributes() -> None:
    assert flat_profile().content_hash() != upsert("auth0|pinned", 5).content_hash()


@pytest.mark.parametrize("build", [flat_profile, nested_profile])
def test_a_stated_none_changes_the_digest(build: Callable[[], UserChange]) -> None:
    change = build()
    assert change.attributes is not None
    stated = replace(change.attributes, stated=frozenset({"tenant_id"}))
    assert replace(change, attributes=stated).content_hash() != change.content_hash()
