"""No configuration error ever shows a secret, whatever shape the bad value has.

Every case below is a mistake an operator can make while a password, token or key sits in
the value (or next to it). Each is driven twice: through ``load_settings`` (the message, and
the whole exception chain a logger could render) and through ``sync-worker`` itself (exit 2,
one line on stderr). Each must name its key and hold no fragment of the secret.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sync_worker.cli import main
from sync_worker.config import load_settings
from sync_worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config.yaml"
SECRET = "S3cr3tZq9x"
# A password with an unescaped '@' spills its tail into the host: neither half may show.
SPLIT_SECRET, SPLIT_FRAGMENTS = "S3cr3t@Zq9x", ("S3cr3t", "Zq9x")
NUMERIC_SECRET = "987654321"
WORKER_DB = "database: {url: 'sqlite:///w.db'}\n"


@dataclass(frozen=True)
class Case:
    id: str
    key: str  # what the one-line message must name
    config: str | None  # YAML text of the config file; None: the shipped config.yaml
    env: Mapping[str, str] = field(default_factory=dict)
    fragments: tuple[str, ...] = (SECRET,)


# Database URLs in every broken shape, each with the secret where the password goes.
URL_SHAPES: list[tuple[str, str, tuple[str, ...]]] = [
    ("no-colon", f"postgresql//u:{SECRET}@host/db", (SECRET,)),
    ("no-scheme", f"u:{SECRET}@host/db", (SECRET,)),
    ("one-slash", f"postgresql:/u:{SECRET}@host/db", (SECRET,)),
    ("three-slashes", f"postgresql:///u:{SECRET}@host/db", (SECRET,)),
    ("bare-secret", SECRET, (SECRET,)),
    ("secret-as-scheme", f"{SECRET}://host/db", (SECRET,)),
    ("other-scheme", f"mysql://u:{SECRET}@host/db", (SECRET,)),
    ("missing-at", f"postgresql://u:{SECRET}:host/db", (SECRET,)),
    ("slash-for-colon", f"postgresql://u/{SECRET}@host/db", (SECRET,)),
    ("unescaped-at", f"postgresql://u:{SPLIT_SECRET}@host/db", SPLIT_FRAGMENTS),
    ("port-word", f"postgresql://u:{SECRET}@host:notaport/db", (SECRET,)),
    ("port-empty", f"postgresql://u:{SECRET}@host:/db", (SECRET,)),
    ("port-range", f"postgresql://u:{SECRET}@host:99999/db", (SECRET,)),
    ("port-zero", f"postgresql://u:{SECRET}@host:0/db", (SECRET,)),
    ("ipv6-unclosed", f"postgresql://u:{SECRET}@[::1/db", (SECRET,)),
    ("connect-timeout", f"postgresql://u:{SECRET}@host/db?connect_timeout=x", (SECRET,)),
    ("timeout-secret", f"postgresql://u@host/db?connect_timeout={SECRET}", (SECRET,)),
    ("sslmode", f"postgresql://u:{SECRET}@host/db?sslmode={SECRET}", (SECRET,)),
    ("keepalives", f"postgresql://u:{SECRET}@host/db?keepalives=x", (SECRET,)),
    ("unknown-param", f"postgresql://u:{SECRET}@host/db?sslmod=require", (SECRET,)),
    ("param-name-secret", f"postgresql://u@host/db?{SECRET}=1", (SECRET,)),
    ("hosts-ports", f"postgresql://u:{SECRET}@/db?host=a,b&port=1,2,3", (SECRET,)),
    ("host-port-word", f"postgresql://u:{SECRET}@/db?host=a&port={SECRET}", (SECRET,)),
    ("sqlite-timeout", f"sqlite:///w.db?timeout={SECRET}", (SECRET,)),
]

SECRET_FIELDS = [
    "database.url",
    "providers.auth0.client_secret",
    "providers.auth0.webhook_token",
    "providers.stack.secret_server_key",
    "providers.stack.webhook_secret",
    "providers.authjs.database_url",
    "providers.authjs.webhook_secret",
]
WRONG_TYPES: list[tuple[str, str, tuple[str, ...]]] = [
    ("list", f"[{SECRET}]", (SECRET,)),
    ("mapping", f"{{k: {SECRET}}}", (SECRET,)),
    ("number", NUMERIC_SECRET, (NUMERIC_SECRET,)),
]


def nested(key: str, value: str) -> str:
    """``a.b.c`` and a YAML value as one flow-style line, plus a worker database if needed."""
    *parents, leaf = key.split(".")
    text = f"{{{leaf}: {value}}}"
    for parent in reversed(parents[1:]):
        text = f"{{{parent}: {text}}}"
    line = f"{parents[0]}: {text}\n" if parents else f"{leaf}: {value}\n"
    return line if key.startswith("database.") else WORKER_DB + line


def url_cases() -> Iterator[Case]:
    authjs = "providers.authjs.database_url"
    for name, url, parts in URL_SHAPES:
        quoted = f"'{url}'"
        yield Case(f"DATABASE_URL-{name}", "database.url", None, {"DATABASE_URL": url}, parts)
        yield Case(
            f"database.url-{name}", "database.url", nested("database.url", quoted), {}, parts
        )
        yield Case(f"AUTHJS_DATABASE_URL-{name}", authjs, None, {"AUTHJS_DATABASE_URL": url}, parts)
        yield Case(f"authjs-url-{name}", authjs, nested(authjs, quoted), {}, parts)


def type_cases() -> Iterator[Case]:
    for key in SECRET_FIELDS:
        for name, value, fragments in WRONG_TYPES:
            yield Case(f"{key}-{name}", key, nested(key, value), {}, fragments)


OTHER_CASES = [
    # A whole section given as one string (a URL pasted one level too high).
    Case("section-database", "database", f"database: 'postgresql://u:{SECRET}@h/db'\n"),
    Case("section-auth0", "providers.auth0", WORKER_DB + f"providers: {{auth0: '{SECRET}'}}\n"),
    Case("section-providers", "providers", WORKER_DB + f"providers: '{SECRET}'\n"),
    Case("section-sync", "sync", WORKER_DB + f"sync: '{SECRET}'\n"),
    # Misspelt keys holding secrets: the key is named, never its value.
    Case(
        "unknown-key",
        "providers.auth0.client_secrte",
        WORKER_DB + f"providers: {{auth0: {{client_secrte: {SECRET}}}}}\n",
    ),
    Case("unknown-top-level", "databse", f"databse: {{url: 'postgresql://u:{SECRET}@h/db'}}\n"),
    # ${VAR} references: the unset one is named; the set one (the secret) is not shown.
    Case(
        "interpolation",
        "database.url: environment variable DB is not set",
        "database: {url: 'postgresql://u:${PW}@h/${DB}'}\n",
        {"PW": SECRET},
    ),
    Case(
        "interpolation-neighbour",
        "providers.auth0.client_secret: environment variable A0_SECRET",
        WORKER_DB + "providers: {auth0: {client_secret: '${A0_SECRET}', "
        "webhook_token: '${A0_TOKEN}'}}\n",
        {"A0_TOKEN": SECRET},
    ),
    Case("interpolated-url", "database.url", "database: {url: '${U}'}\n", {"U": SECRET}),
    # A provider half configured: the missing key is named, the given secret is not.
    Case("auth0-half", "providers.auth0.domain", None, {"AUTH0_CLIENT_SECRET": SECRET}),
    Case("stack-half", "providers.stack.project_id", None, {"STACK_SECRET_SERVER_KEY": SECRET}),
    Case(
        "authjs-enabled",
        "providers.authjs.database_url: missing",
        WORKER_DB + f"providers: {{authjs: {{enabled: true, webhook_secret: {SECRET}}}}}\n",
    ),
    # YAML that does not parse, in a file holding a secret.
    Case(
        "yaml-unclosed",
        "invalid YAML",
        WORKER_DB + f"providers: {{auth0: {{client_secret: {SECRET}\n",
    ),
    Case(
        "yaml-indent", "invalid YAML", f"database:\n  url: postgresql://u:{SECRET}@h/db\n bad: 1\n"
    ),
    Case("yaml-tab", "invalid YAML", f"providers:\n\tauth0: {{client_secret: {SECRET}}}\n"),
    Case("yaml-quote", "invalid YAML", f"database: {{url: 'postgresql://u:{SECRET}@h/db}}\n"),
    Case("yaml-alias", "invalid YAML", f"providers: {{auth0: {{client_secret: *{SECRET}}}}}\n"),
]

CASES = [*url_cases(), *type_cases(), *OTHER_CASES]


def config_file(case: Case, tmp_path: Path) -> Path:
    if case.config is None:
        return SHIPPED
    path = tmp_path / "config.yaml"
    path.write_text(case.config)
    return path


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything a logger or error tracker could reach from it."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def assert_hidden(text: str, case: Case) -> None:
    for fragment in case.fragments:
        assert fragment not in text, f"{case.id}: the secret shows in {text!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_load_settings_never_shows_the_secret(case: Case, tmp_path: Path) -> None:
    path = config_file(case, tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=case.env)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert case.key in message
    assert "\n" not in message
    assert_hidden("".join(traceback.format_exception(caught.value)), case)
    for exc in chain(caught.value):
        assert_hidden(f"{exc!s} {exc!r} {exc.args!r}", case)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("AUTH0_", "STACK_", "AUTHJS_", "SYNC_WORKER_")):
            monkeypatch.delenv(name)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return monkeypatch


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_cli_exits_2_with_one_line_and_no_secret(
    case: Case, tmp_path: Path, clean_env: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    for name, value in case.env.items():
        clean_env.setenv(name, value)
    path = config_file(case, tmp_path)
    assert main(["--config", str(path), "status"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert err.startswith("sync-worker: configuration error: ")
    assert err.count("\n") == 1
    assert case.key in err
    assert "Traceback" not in err
    assert_hidden(out + err, case)


def test_settings_do_not_show_secrets_in_their_repr() -> None:
    """A settings object in a log line or a debugger shows no secret."""
    env = {
        "DATABASE_URL": f"postgresql://u:{SECRET}@db/app",
        "AUTH0_DOMAIN": "t.auth0.com",
        "AUTH0_CLIENT_ID": "cid",
        "AUTH0_CLIENT_SECRET": SECRET,
        "AUTH0_WEBHOOK_TOKEN": SECRET,
        "STACK_PROJECT_ID": "p",
        "STACK_SECRET_SERVER_KEY": SECRET,
        "STACK_WEBHOOK_SECRET": SECRET,
        "AUTHJS_DATABASE_URL": f"postgresql://u:{SECRET}@db/app",
        "AUTHJS_WEBHOOK_SECRET": SECRET,
    }
    settings = load_settings(SHIPPED, environ=env)
    assert settings.providers.auth0.client_secret == SECRET
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
