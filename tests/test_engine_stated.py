"""A field a provider does not state is kept: for every provider and every such field.

Each provider's real mapper builds the records. The unstated fields are first given values
(as a login, the app or another provider would), then a renamed record is applied: the
name follows the provider, every unstated field keeps its value, and the audit row names
only the name.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from db.tables import users
from providers import auth0, authjs, stack
from sync_worker.changes import IDP_FIELDS, OPTIONAL_FIELDS, Source, UserChange
from tests.factories import T0, BoundEngine, audit, rows

Build = Callable[[str, int], UserChange]  # (name, minutes after T0) -> change

KEPT: dict[str, Any] = {
    "given_name": "Kept",
    "family_name": "Given",
    "phone": "+15550100",
    "blocked": True,
    "last_login_at": T0 - timedelta(days=1),
    "role": "admin",
    "tenant_id": "acme",
}


def _authjs(name: str, minutes: int) -> UserChange:
    row = {"id": "u-1", "name": name, "email": "ada@example.org", "emailVerified": T0}
    return authjs.to_change(row, [], observed_at=T0 + timedelta(minutes=minutes))


def _stack(name: str, minutes: int) -> UserChange:
    raw = {
        "id": "0b6f3c1e-2d4a-4f5b-8c9d-0e1f2a3b4c5d",
        "primary_email": "ada@example.org",
        "primary_email_verified": True,
        "display_name": name,
        "signed_up_at_millis": 1704067200000,
    }
    return stack.to_change(raw, observed_at=T0 + timedelta(minutes=minutes))


def _auth0(name: str, minutes: int) -> UserChange:
    raw = {
        "user_id": "auth0|ada",
        "email": "ada@example.org",
        "email_verified": True,
        "name": name,
        "given_name": "Ada",
        "family_name": "Lovelace",
        "phone_number": "+15550199",
        "blocked": False,
        "last_login": (T0 - timedelta(days=1)).isoformat(),
        "updated_at": (T0 + timedelta(minutes=minutes)).isoformat(),
    }
    return auth0.to_change(raw)


CASES: dict[str, tuple[Build, frozenset[str]]] = {
    "authjs": (_authjs, frozenset({"given_name", "family_name", "phone", "blocked"})
               | {"last_login_at", *OPTIONAL_FIELDS}),
    "stack": (_stack, frozenset({"given_name", "family_name", "phone", "last_login_at"})
              | set(OPTIONAL_FIELDS)),
    "auth0": (_auth0, frozenset(OPTIONAL_FIELDS)),
}  # fmt: skip


@pytest.mark.parametrize("provider", sorted(CASES))
def test_unstated_fields_survive_a_rename(engine: Engine, provider: str) -> None:
    build, unstated = CASES[provider]
    sync = BoundEngine(engine)
    assert sync.apply([build("Ada", 0)], source=Source.PULL).counts == {"created": 1}
    kept = {f: KEPT[f] for f in unstated}
    with engine.begin() as conn:
        conn.execute(update(users).values(**kept))

    result = sync.apply([build("Ada Lovelace", 5)], source=Source.BACKFILL)

    assert result.counts == {"updated": 1}
    (user,) = rows(engine, "users")
    assert user["name"] == "Ada Lovelace"
    assert {f: user[f] for f in unstated} == kept
    assert audit(engine, action="updated")[0]["changes"] == {
        "name": ["Ada", "Ada Lovelace"],
        "profile.display_name": ["Ada", "Ada Lovelace"],
    }


@pytest.mark.parametrize("provider", sorted(CASES))
def test_the_mapper_states_exactly_what_the_record_carries(provider: str) -> None:
    build, unstated = CASES[provider]
    attributes = build("Ada", 0).attributes
    assert attributes is not None
    stated = {f for f in (*IDP_FIELDS, *OPTIONAL_FIELDS) if f in attributes.stated}
    assert stated == set(IDP_FIELDS + OPTIONAL_FIELDS) - unstated


def test_a_stated_none_clears_the_stored_value(engine: Engine) -> None:
    """Auth0 states every IdP field: a phone removed upstream is removed here."""
    sync = BoundEngine(engine)
    sync.apply([_auth0("Ada", 0)], source=Source.PULL)
    removed = dict(_auth0("Ada", 5).raw or {}, phone_number=None)
    sync.apply([auth0.to_change(removed)], source=Source.PULL)
    assert rows(engine, "users")[0]["phone"] is None
