"""export-user against real databases: one person's data across linked identities, nothing
of anyone else, in JSON and CSV, as a function and as a command."""

from __future__ import annotations

import csv
import io
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from db import inbox
from db.tables import sync_audit, sync_runs
from db.transaction import transaction
from providers import registry
from providers.authjs import session_change, session_id
from sync_worker import simulate
from sync_worker.changes import LinkedIdentity, Source
from sync_worker.cli import main
from sync_worker.jobs.export import (
    AmbiguousUser,
    Selector,
    UserNotFound,
    counts,
    export_user,
    render_csv,
    render_json,
)
from tests.daemon_harness import SECRETS, settings_with_secrets
from tests.factories import BoundEngine, login, rows, upsert
from tests.webhook_cases import standard_headers, svix_headers

DECODERS = registry.decoders(settings_with_secrets())
ADA_EMAIL = "ada@example.org"
ADA_TOKEN = "0b6f6c1e-5d0a-4d1e-9d55-6a3f1f0c9a11"  # an Auth.js session token: never exported
STACK_ADA = "4f2c1a9e-8b7d-4e3f-9a6b-2c1d0e9f8a7b"


@dataclass(frozen=True)
class People:
    ada: uuid.UUID
    namesake: uuid.UUID  # same name, a similar email
    lookalike: uuid.UUID  # an email that contains Ada's


def user_of(engine: Engine, provider: str, external_id: str) -> uuid.UUID:
    [identity] = rows(engine, "user_identities", provider=provider, external_id=external_id)
    found: uuid.UUID = identity["user_id"]
    return found


def add_audit(engine: Engine, **values: Any) -> None:
    row = {"occurred_at": datetime.now(UTC), "source": "webhook", "action": "failed", **values}
    with engine.begin() as conn:
        conn.execute(insert(sync_audit).values(**row))


def populate(engine: Engine) -> People:
    """Ada signs in through Auth0, Stack and Auth.js (with GitHub): one person, linked by
    her verified email. Another Ada Lovelace and a look-alike email are other people."""
    sync = BoundEngine(engine)
    ada: dict[str, Any] = {"email": ADA_EMAIL, "email_verified": True, "name": "Ada Lovelace"}
    github = (LinkedIdentity(provider="authjs:github", external_id="42"),)
    sync.apply(
        [
            upsert("auth0|ada", 1, **ada),
            upsert("auth0|ada2", 1, email="ada.lovelace@example.org", name="Ada Lovelace"),
            upsert("auth0|other", 1, email="ada@example.org.uk", name="Zoë =1+2"),
        ],
        source=Source.PULL,
    )
    sync.apply([upsert(STACK_ADA, 2, provider="stack", **ada)], source=Source.PULL)
    sync.apply([upsert("17", 3, provider="authjs", linked=github, **ada)], source=Source.PULL)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    authjs_session = {"userId": 17, "sessionToken": ADA_TOKEN, "expires": now + timedelta(days=30)}
    sync.apply(
        [
            login("auth0|ada", "ada-session", 5),
            login("auth0|ada2", "namesake-session", 5),
            session_change(authjs_session, observed_at=now),
        ],
        source=Source.PULL,
    )
    people = People(
        ada=user_of(engine, "auth0", "auth0|ada"),
        namesake=user_of(engine, "auth0", "auth0|ada2"),
        lookalike=user_of(engine, "auth0", "auth0|other"),
    )
    # Records that failed before reaching a user: Ada's belongs to her export, the
    # namesake's does not, nor does a row about Ada's identity that names another user.
    add_audit(engine, provider="auth0", external_id="auth0|ada", error="ada's failure")
    add_audit(engine, provider="auth0", external_id="auth0|ada2", error="namesake's failure")
    add_audit(
        engine,
        provider="authjs:github",
        external_id="42",
        user_id=people.namesake,
        action="linked",
        error="another user's history",
    )
    return people


def test_export_by_email_is_one_person_across_linked_identities(engine: Engine) -> None:
    people = populate(engine)
    document = export_user(engine, Selector(email="ADA@Example.ORG"), DECODERS)

    assert list(document) == [
        "export", "user", "profile", "identities", "sessions", "audit", "inbox"
    ]  # fmt: skip
    assert document["inbox"] == []
    assert document["export"]["selected_by"] == "email"
    assert document["user"]["id"] == str(people.ada)
    assert document["user"]["email"] == ADA_EMAIL
    assert document["profile"]["user_id"] == str(people.ada)
    assert document["profile"]["timezone"] == "UTC"
    keys = {(i["provider"], i["external_id"]) for i in document["identities"]}
    assert keys == {
        ("auth0", "auth0|ada"),
        ("stack", STACK_ADA),
        ("authjs", "17"),
        ("authjs:github", "42"),
    }
    auth0 = next(i for i in document["identities"] if i["provider"] == "auth0")
    assert auth0["raw"]["email"] == ADA_EMAIL  # the raw upstream record comes along
    sessions = {s["external_session_id"] for s in document["sessions"]}
    assert sessions == {"ada-session", session_id(ADA_TOKEN)}
    assert {s["user_id"] for s in document["sessions"]} == {str(people.ada)}

    audit = document["audit"]
    assert {a["user_id"] for a in audit} == {str(people.ada), None}
    assert [a["error"] for a in audit if a["user_id"] is None] == ["ada's failure"]
    assert {"created", "linked", "login"} <= {a["action"] for a in audit}
    with engine.connect() as conn:
        own = conn.execute(select(sync_audit.c.id).where(sync_audit.c.user_id == people.ada))
        assert {a["id"] for a in audit} >= set(own.scalars())

    text = render_json(document).decode()
    for foreign in (people.namesake, people.lookalike):
        assert str(foreign) not in text
    for foreign_text in ("ada.lovelace@", "example.org.uk", "auth0|ada2", "namesake", "another"):
        assert foreign_text not in text
    assert ADA_TOKEN not in text


def deliver(engine: Engine, provider: str, event: str, user_id: str) -> str:
    """A real signed delivery of ``event`` about ``user_id``, verified by the receiver and
    stored in the inbox; its event id."""
    now = datetime.now(UTC)
    _, body = simulate.build(
        provider, event, email="x@example.net", now=now, secret=SECRETS[provider]
    )
    document = json.loads(body)
    user = document["data"] if provider == "stack" else document["data"]["user"]
    user["id"] = user_id
    body = json.dumps(document).encode()
    sign = svix_headers if provider == "stack" else standard_headers
    headers = sign(SECRETS[provider], f"msg_{uuid.uuid4().hex}", now, body)
    (item,) = registry.receivers(settings_with_secrets(), local={})[provider].verify(
        headers, body, now=now
    )
    with transaction(engine) as conn:
        delivery = inbox.Delivery(item.event_id, item.payload, item.event_type, "pending")
        inbox.store(conn, provider, [delivery], now=now)
    return item.event_id


def test_the_inbox_deliveries_about_the_person_come_along(engine: Engine) -> None:
    """A delivery still in the inbox whose payload is about one of Ada's identities is part
    of her data; one about another user is not, even one whose id holds hers ("170")."""
    people = populate(engine)
    mine = {
        deliver(engine, "stack", "user.updated", STACK_ADA),
        deliver(engine, "authjs", "signIn", "17"),
    }
    deliver(engine, "authjs", "signIn", "170")
    deliver(engine, "stack", "user.updated", "5e3d2b1a-0000-4000-8000-000000000000")
    document = export_user(engine, Selector(user_id=people.ada), DECODERS)
    assert {r["event_id"] for r in document["inbox"]} == mine
    assert {r["provider"] for r in document["inbox"]} == {"stack", "authjs"}
    assert counts(document)["inbox"] == 2
    assert export_user(engine, Selector(user_id=people.namesake), DECODERS)["inbox"] == []


def test_every_selector_finds_the_same_person(engine: Engine) -> None:
    people = populate(engine)
    selectors = [
        Selector(email=ADA_EMAIL),
        Selector(user_id=people.ada),
        Selector(external="auth0:auth0|ada"),
        Selector(external=f"stack:{STACK_ADA}"),
        Selector(external="authjs:17"),
        Selector(external="authjs:github:42"),  # a provider name holding a colon
    ]
    for selector in selectors:
        document = export_user(engine, selector, DECODERS)
        assert document["user"]["id"] == str(people.ada), selector
        assert len(document["identities"]) == 4
    namesake = export_user(engine, Selector(user_id=people.namesake), DECODERS)
    assert {i["external_id"] for i in namesake["identities"]} == {"auth0|ada2"}
    assert [s["external_session_id"] for s in namesake["sessions"]] == ["namesake-session"]
    assert "another user's history" in [a["error"] for a in namesake["audit"]]


def test_a_deleted_user_is_still_exported(engine: Engine) -> None:
    from tests.factories import delete

    people = populate(engine)
    BoundEngine(engine).apply([delete("auth0|ada2", 9)], source=Source.PULL)
    document = export_user(engine, Selector(user_id=people.namesake), DECODERS)
    assert document["user"]["deleted_at"] is not None
    assert document["identities"][0]["deleted_at"] is not None


def test_an_email_of_several_users_is_refused_with_their_count(engine: Engine) -> None:
    sync = BoundEngine(engine)
    sync.apply(
        [
            upsert("auth0|sam1", 1, email="sam@example.org", email_verified=False),
            upsert("auth0|sam2", 1, email="Sam@Example.org", email_verified=False),
        ],
        source=Source.PULL,
    )
    with pytest.raises(AmbiguousUser, match="matches 2 users") as refused:
        export_user(engine, Selector(email="SAM@example.org"), DECODERS)
    assert refused.value.count == 2
    assert "sam@" not in str(refused.value).lower()  # the message names no one


@pytest.mark.parametrize(
    "selector",
    [
        Selector(email="nobody@example.org"),
        Selector(user_id=uuid.uuid4()),
        Selector(external="auth0:auth0|nobody"),
        Selector(external="auth0|ada:auth0"),
    ],
    ids=["email", "id", "external", "external-reversed"],
)
def test_no_such_person(engine: Engine, selector: Selector) -> None:
    populate(engine)
    with pytest.raises(UserNotFound, match="no user matches"):
        export_user(engine, selector, DECODERS)


@pytest.mark.parametrize(
    "fields",
    [{}, {"email": "a@b.org", "external": "auth0:x"}, {"email": " "}, {"external": "auth0"}],
)
def test_a_selector_names_exactly_one_thing(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case names its own cause
        Selector(**fields)


def read_csv(data: bytes) -> list[dict[str, str]]:
    assert data.startswith(b"\xef\xbb\xbf")  # a byte-order mark, for spreadsheet programs
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def test_csv_is_one_row_per_value(engine: Engine) -> None:
    people = populate(engine)
    document = export_user(engine, Selector(user_id=people.lookalike), DECODERS)
    table = read_csv(render_csv(document))

    assert list(table[0]) == ["section", "record", "field", "value"]
    cells = {(r["section"], r["record"], r["field"]): r["value"] for r in table}
    assert cells[("user", "1", "id")] == str(people.lookalike)
    assert cells[("user", "1", "email")] == "ada@example.org.uk"
    assert cells[("user", "1", "name")] == "Zoë =1+2"  # accents intact
    assert cells[("user", "1", "deleted_at")] == ""  # null
    assert cells[("user", "1", "email_verified")] == "true"
    assert cells[("identities", "1", "raw.email")] == "ada@example.org.uk"
    assert cells[("profile", "1", "settings")] == "{}"
    created = next(r["record"] for r in table if r["field"] == "action" and r["value"] == "created")
    assert cells[("audit", created, "changes.email.1")] == "ada@example.org.uk"
    assert cells[("audit", created, "changes.email.0")] == ""  # [old, new]


def test_csv_cells_never_start_a_formula(engine: Engine) -> None:
    BoundEngine(engine).apply(
        [upsert("auth0|x", 1, name='=HYPERLINK("http://evil")', given_name="+1", family_name="@a")],
        source=Source.PULL,
    )
    document = export_user(engine, Selector(external="auth0:auth0|x"), DECODERS)
    cells = {
        r["field"]: r["value"] for r in read_csv(render_csv(document)) if r["section"] == "user"
    }
    assert cells["name"] == '\'=HYPERLINK("http://evil")'
    assert (cells["given_name"], cells["family_name"]) == ("'+1", "'@a")
    assert json.loads(render_json(document))["user"]["name"] == '=HYPERLINK("http://evil")'


# -- the command --------------------------------------------------------------------------


@pytest.fixture
def cli(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    for name in ("AUTH0_DOMAIN", "STACK_PROJECT_ID", "AUTHJS_DATABASE_URL", "SYNC_WORKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", engine.url.render_as_string(hide_password=False))
    return engine


def export_runs(engine: Engine) -> list[dict[str, Any]]:
    query = select(sync_runs).where(sync_runs.c.kind == "export").order_by(sync_runs.c.started_at)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def test_export_user_command_json_and_csv(
    cli: Engine, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    people = populate(cli)
    capsysbinary.readouterr()  # the engine's log lines, before the CLI configures logging
    assert main(["export-user", "--email", "Ada@example.org"]) == 0
    document = json.loads(capsysbinary.readouterr().out)
    assert document["user"]["id"] == str(people.ada)
    assert len(document["identities"]) == 4

    assert main(["export-user", "--external", "authjs:github:42", "--format", "csv"]) == 0
    table = read_csv(capsysbinary.readouterr().out)
    assert {r["section"] for r in table} == {
        "export",
        "user",
        "profile",
        "identities",
        "sessions",
        "audit",
    }
    # Ada's rows, and the failed record of her identity that names no user (an empty cell).
    assert {r["value"] for r in table if r["field"] == "user_id"} == {str(people.ada), ""}

    runs = export_runs(cli)
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"]
    assert runs[0]["counts"] == {
        "user": 1,
        "profile": 1,
        "identities": 4,
        "sessions": 2,
        "audit": len(document["audit"]),
        "inbox": 0,
    }
    assert ADA_EMAIL not in json.dumps([r["counts"] for r in runs] + [r["error"] for r in runs])


def test_export_user_command_refusals(cli: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    populate(cli)
    BoundEngine(cli).apply(
        [upsert("stack-sam", 1, provider="stack", email="ADA@example.org", email_verified=False)],
        source=Source.PULL,
    )
    capsys.readouterr()
    assert main(["export-user", "--email", ADA_EMAIL]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "matches 2 users; choose one with --id" in captured.err

    assert main(["export-user", "--id", str(uuid.uuid4())]) == 1
    assert "no user matches the --id given" in capsys.readouterr().err

    assert [r["status"] for r in export_runs(cli)] == ["failed", "failed"]


@pytest.mark.parametrize(
    "argv",
    [
        ["export-user"],
        ["export-user", "--id", "not-a-uuid"],
        ["export-user", "--external", "no-colon"],
        ["export-user", "--email", "a@b.org", "--id", str(uuid.uuid4())],
        ["export-user", "--email", "a@b.org", "--format", "xml"],
    ],
)
def test_export_user_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_export_user_help_explains_the_csv(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export-user", "--help"])
    out = capsys.readouterr().out
    assert "section, record, field, value" in out
    assert "byte-order mark" in out
