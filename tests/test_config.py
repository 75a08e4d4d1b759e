"""Configuration: interpolation, overrides, and one readable line (exit 2) for every mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sync_worker.config import load_settings, normalize_database_url
from sync_worker.errors import ConfigError

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
    ],
)
def test_bad_config_is_one_line_naming_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ=env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


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
