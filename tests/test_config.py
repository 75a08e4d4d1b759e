"""Configuration: interpolation, overrides, and one readable line (exit 2) for every mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from providers.authjs import AuthjsProvider
from sync_worker.cli import main
from sync_worker.config import (
    AuthjsSettings,
    authjs_database_url,
    load_settings,
    normalize_database_url,
)
from sync_worker.errors import ConfigError, ProviderError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_config_runs_as_is_on_sqlite() -> None:
    settings = load_settings(ROOT / "config.yaml", environ={})
    assert settings.database.url == f"sqlite:///{ROOT / 'var' / 'sync-worker.db'}"
    assert settings.enabled_providers() == []
    assert dict(settings.profile.defaults) == {"timezone": "UTC", "currency": "USD", "locale": "en"}
    assert settings.sync.link_by_verified_email is True
    assert settings.sync.max_delete_fraction == 0.2


def test_environment_enables_providers_and_overrides_the_database() -> None:
    env = {
        "DATABASE_URL": "postgres://app:pw@db.internal:5432/app",
        "AUTH0_DOMAIN": "tenant.eu.auth0.com",
        "AUTH0_CLIENT_ID": "cid",
        "AUTH0_CLIENT_SECRET": "secret",
        "AUTHJS_DATABASE_URL": "postgresql://app@db/app",
        "AUTHJS_SCHEMA": "prisma",
        "SYNC_WORKER_PORT": "9090",
    }
    settings = load_settings(ROOT / "config.yaml", environ=env)
    assert settings.database.url == "postgresql+psycopg://app:pw@db.internal:5432/app"
    assert settings.enabled_providers() == ["auth0", "authjs"]
    assert settings.providers.auth0.client_secret == "secret"
    assert settings.providers.authjs.schema_flavour == "prisma"
    assert settings.server.port == 9090


def test_settings_are_frozen() -> None:
    settings = load_settings(ROOT / "config.yaml", environ={})
    with pytest.raises(Exception, match="frozen"):
        settings.sync.batch_size = 1


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("database: {url: 'sqlite:///x.db', colour: red}\n", {}, "database.colour: unknown key"),
        ("database: {url: 'sqlite:///x.db'}\nsync: {batch_size: lots}\n", {}, "sync.batch_size"),
        ("database: {url: 'sqlite:///x.db'}\nsync: {batch_size: 0}\n", {}, "sync.batch_size"),
        ("database: {url: '${NOPE}'}\n", {}, "database.url: environment variable NOPE is not set"),
        ("database: {url: 'mysql://x'}\n", {}, "unsupported scheme 'mysql'"),
        ("sync: {}\n", {}, "database.url: missing"),
        ("database: [\n", {}, "invalid YAML"),
        (
            "database: {url: 'sqlite:///x.db'}\nproviders: {stack: {project_id: '${P}'}}\n",
            {"P": "proj"},
            "providers.stack.secret_server_key: missing",
        ),
        (
            "database: {url: 'sqlite:///x.db'}\nproviders: {authjs: {enabled: true}}\n",
            {},
            "providers.authjs.database_url: missing",
        ),
        (
            "database: {url: 'sqlite:///x.db'}\nprofile: {overwrite: [email]}\n",
            {},
            "profile.overwrite.0",
        ),
        # A misspelt section is an unknown key, not its real name "missing".
        ("databse: {url: 'sqlite:///x.db'}\n", {}, "databse: unknown key"),
        ("databse:\n  # url: sqlite:///x.db\n", {}, "databse: unknown key"),
        ("databse: {url: 'sqlite:///x.db'}\n", {"DATABASE_URL": "sqlite:///y.db"}, "databse"),
        # Numbers are shown bare, strings quoted.
        (
            "database: {url: 'sqlite:///x.db'}\nsync: {batch_size: 0}\n",
            {},
            "sync.batch_size: input should be greater than or equal to 1 (got 0)",
        ),
        ("database: {url: 'sqlite:///x.db'}\nsync: {batch_size: lots}\n", {}, "(got 'lots')"),
        (
            "database: {url: 'sqlite:///x.db'}\nserver: {port: '${P}'}\n",
            {"P": "80a"},
            "(got '80a')",
        ),
        ("database: {url: 'sqlite:///x.db'}\nlogging: {level: loud}\n", {}, "(got 'loud')"),
        ("database: {url: 'sqlite:///x.db'}\nsync: 'fast'\n", {}, "sync: must be a mapping"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    # Every error about a file starts with it, the unset variable's included.
    assert str(caught.value).startswith(f"{path}:")


def test_secret_values_are_not_echoed_in_errors(tmp_path: Path) -> None:
    text = "database: {url: 'sqlite:///x.db'}\nproviders: {auth0: {client_secret: [s3cr3t]}}\n"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:////abs/worker.db", "sqlite:////abs/worker.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
    ],
)
def test_database_urls_in_the_usual_forms(url: str, expected: str) -> None:
    assert normalize_database_url(url) == expected


def test_relative_sqlite_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "database: {url: 'sqlite:///data/w.db'}\n")
    assert load_settings(path, environ={}).database.url == f"sqlite:///{tmp_path / 'data' / 'w.db'}"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("AUTH0_", "STACK_", "AUTHJS_"))
    }
    base.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "sync_worker", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_cli_config_error_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "database: {url: 'sqlite:///x.db', colour: red}\n")
    result = run_cli("--config", str(path), "status")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "database.colour: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_secret_for_enabled_provider_exits_2(tmp_path: Path) -> None:
    result = run_cli("status", env={"AUTH0_DOMAIN": "t.auth0.com", "AUTH0_CLIENT_ID": "x"})
    assert result.returncode == 2
    assert "providers.auth0.client_secret: missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_config_file_from_environment(tmp_path: Path) -> None:
    result = run_cli("status", env={"SYNC_WORKER_CONFIG": str(tmp_path / "absent.yaml")})
    assert result.returncode == 2
    assert "absent.yaml: cannot read config file" in result.stderr


def test_cli_usage_error_exits_2() -> None:
    result = run_cli("backfill", "--provider", "okta")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


# -- database URLs: checked in full when the configuration loads ----------------------

BAD_URLS = [
    ("postgresql//u:pw@host/db", "not a URL"),
    ("u:pw@host/db", "not a URL"),
    ("postgresql:/u:pw@host/db", "not a URL"),
    ("postgresql://u:pw@host:notaport/db", "the host or port is malformed"),
    ("postgresql://u:pw@[::1/db", "the host or port is malformed"),
    ("postgresql://u:pw@host:70000/db", "the port is not a number from 1 to 65535"),
    ("postgresql://u:pw@host/db?connect_timeout=x", "connect_timeout is not a number"),
    ("postgresql://u:pw@host/db?connect_timeout=inf", "connect_timeout is not a number"),
    ("postgresql://u:pw@host/db?sslmode=on", "sslmode is not one of"),
    ("postgresql://u:pw@host/db?keepalives_idle=soon", "keepalives_idle is not a whole number"),
    ("postgresql://u:pw@host/db?sslmod=require", "a parameter libpq does not know"),
    ("postgresql://u:p@ss@host/db", "an '@' outside user:password@"),
    ("postgresql:///u:pw@host/db", "an '@' outside user:password@"),
    ("postgresql://u@/db?host=a,b&port=1,2,3", "the host list is malformed"),
    ("postgresql://u@host/db?port=1,2", "the host list is malformed"),
    ("sqlite:///x.db?timeout=soon", "a query parameter"),
]


@pytest.mark.parametrize(("url", "problem"), BAD_URLS)
def test_a_bad_database_url_is_one_line_naming_the_key(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(ROOT / "config.yaml", environ={"DATABASE_URL": url})
    message = str(caught.value)
    assert message.startswith(f"{ROOT / 'config.yaml'}: database.url (from $DATABASE_URL): ")
    assert problem in message
    assert "pw" not in message.split(": ", 1)[1]
    assert "\n" not in message


@pytest.mark.parametrize(("url", "problem"), BAD_URLS)
def test_a_bad_authjs_url_names_its_own_key(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(ROOT / "config.yaml", environ={"AUTHJS_DATABASE_URL": url})
    message = str(caught.value)
    assert message.startswith(f"{ROOT / 'config.yaml'}: providers.authjs.database_url: ")
    assert "database.url" not in message
    assert problem in message


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:pw@host:notaport/db", "postgresql://u@host/db?connect_timeout=x"],
)
@pytest.mark.parametrize("variable", ["DATABASE_URL", "AUTHJS_DATABASE_URL"])
def test_the_cli_rejects_a_bad_url_with_exit_2(
    url: str, variable: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("DATABASE_URL", "AUTHJS_DATABASE_URL", "AUTH0_DOMAIN", "STACK_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, url)
    assert main(["--config", str(ROOT / "config.yaml"), "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sync-worker: configuration error: ")
    assert err.count("\n") == 1
    key = "providers.authjs.database_url" if variable.startswith("AUTHJS") else "database.url"
    assert f": {key}" in err


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p%40ss@db.internal:5432/app?sslmode=verify-full&connect_timeout=10",
        "postgresql://u@[::1]:5432/app?target_session_attrs=read-write&keepalives_idle=30",
        "postgresql://u@/app?host=/var/run/postgresql",
        "postgresql://u@/app?host=db1:5432&host=db2:5433",
        "postgresql://u@/app?host=db1,db2&port=5432,5433",
        "postgresql://u@db/app?connect_timeout=2.5&application_name=sync-worker",
        "postgres://u:pw@db/app?options=-csearch_path%3Dapp",
        "sqlite:///:memory:",
    ],
)
def test_good_urls_pass_the_check(url: str) -> None:
    assert normalize_database_url(url).startswith(("postgresql+psycopg://", "sqlite:///"))


def test_prismas_parameters_pass_only_in_the_authjs_url() -> None:
    url = "postgresql://u:pw@db/app?schema=auth&connection_limit=5&sslmode=require"
    assert authjs_database_url(url) == url.replace("postgresql:", "postgresql+psycopg:", 1)
    with pytest.raises(ConfigError, match=r"^database\.url: the query string has a parameter"):
        normalize_database_url(url)


def test_a_missing_authjs_sqlite_file_is_an_error_not_a_new_database(tmp_path: Path) -> None:
    text = "database: {url: 'sqlite:///w.db'}\nproviders: {authjs: {database_url: '${A}'}}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"providers\.authjs\.database_url: no SQLite database"):
        load_settings(path, environ={"A": "sqlite:///app.db"})
    assert not (tmp_path / "app.db").exists()
    (tmp_path / "app.db").touch()
    settings = load_settings(path, environ={"A": "sqlite:///app.db"})
    # Relative to the config file, like database.url.
    assert settings.providers.authjs.database_url == f"sqlite:///{tmp_path / 'app.db'}"


def test_the_authjs_adapter_never_creates_its_sqlite_file(tmp_path: Path) -> None:
    """Built without load_settings (as in tests and benchmarks), opening still never creates it."""
    missing = tmp_path / "app.db"
    provider = AuthjsProvider(AuthjsSettings(database_url=f"sqlite:///{missing}"))
    try:
        with pytest.raises(ProviderError):
            next(iter(provider.iter_changes(None)))
    finally:
        provider.close()
    assert not missing.exists()


def test_the_production_example_loads_with_secrets_from_the_environment() -> None:
    root = Path(__file__).resolve().parent.parent
    env = {"DATABASE_URL": "postgresql://sync_worker@db.internal/app",
           "STACK_WEBHOOK_SECRET": "whsec_c2VjcmV0"}  # fmt: skip
    settings = load_settings(root / "deploy" / "config.yaml", env)
    assert settings.database.url == "postgresql+psycopg://sync_worker@db.internal/app"
    assert settings.providers.stack.webhook_secret == "whsec_c2VjcmV0"
    assert settings.logging.format == "json"
    assert "c2VjcmV0" not in repr(settings)
