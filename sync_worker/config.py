"""Configuration: the only module that reads the config file and the environment.

The YAML file is parsed once, ``${VAR}`` / ``${VAR:-default}`` references are replaced from
the environment, and the result is validated into a frozen, typed ``Settings`` object that
constructors receive. Every problem becomes a ``ConfigError`` with one line naming the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sync_worker.errors import ConfigError

DEFAULT_CONFIG = "config.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Model):
    url: str
    schema_: Annotated[str, Field(alias="schema", pattern=r"^[a-z_][a-z0-9_]*$")] = "identity"
    pool_size: Annotated[int, Field(ge=1, le=100)] = 5
    echo: bool = False


class SyncSettings(_Model):
    batch_size: Annotated[int, Field(ge=1, le=5000)] = 1000
    link_by_verified_email: bool = True
    max_delete_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2


class ProfileSettings(_Model):
    defaults: Mapping[str, Any] = Field(
        default_factory=lambda: {"timezone": "UTC", "currency": "USD", "locale": "en"}
    )
    overwrite: tuple[Literal["timezone", "currency", "locale", "settings"], ...] = ()


class UserSettings(_Model):
    default_role: str = "member"


class LoggingSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576


class HttpSettings(_Model):
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    read_timeout: Annotated[float, Field(gt=0)] = 30.0
    max_retry_seconds: Annotated[float, Field(ge=0)] = 300.0
    max_attempts: Annotated[int, Field(ge=1)] = 8
    requests_per_second: Annotated[float, Field(gt=0)] | None = None


class _ProviderSettings(_Model):
    enabled: bool | None = None
    http: HttpSettings = HttpSettings()

    def _required_for_pull(self) -> dict[str, str | None]:
        return {}

    def missing_for_pull(self) -> list[str]:
        return [k for k, v in self._required_for_pull().items() if not v]

    @property
    def pull_enabled(self) -> bool:
        if self.enabled is False:
            return False
        return not self.missing_for_pull()

    def check(self, name: str) -> None:
        """Reject an enabled provider with missing credentials, naming the first missing key."""
        required = self._required_for_pull()
        missing = self.missing_for_pull()
        given = len(required) - len(missing)
        if missing and (self.enabled or given > 0):
            raise ConfigError(
                f"providers.{name}.{missing[0]}: missing, but providers.{name} is enabled "
                f"(set it or its environment variable)"
            )


class Auth0Settings(_ProviderSettings):
    domain: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    base_url: str | None = None
    audience: str | None = None
    webhook_token: str | None = None
    page_size: Annotated[int, Field(ge=1, le=100)] = 100
    export_poll_max_seconds: Annotated[float, Field(gt=0)] = 3600.0

    def _required_for_pull(self) -> dict[str, str | None]:
        return {
            "domain": self.domain or self.base_url,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
        }


class StackSettings(_ProviderSettings):
    project_id: str | None = None
    secret_server_key: str | None = None
    base_url: str = "https://api.stack-auth.com"
    header_prefix: str = "x-stack"
    webhook_secret: str | None = None
    page_size: Annotated[int, Field(ge=1, le=1000)] = 500
    include_personal_teams: bool = False
    personal_team_metadata_key: str = "personal"

    def _required_for_pull(self) -> dict[str, str | None]:
        return {"project_id": self.project_id, "secret_server_key": self.secret_server_key}


class AuthjsSettings(_ProviderSettings):
    database_url: str | None = None
    schema_flavour: Annotated[Literal["pg", "prisma", "drizzle"], Field(alias="schema")] = "pg"
    db_schema: str | None = None
    tables: Mapping[str, str] = Field(default_factory=dict)
    columns: Mapping[str, Mapping[str, str]] = Field(default_factory=dict)
    webhook_secret: str | None = None
    page_size: Annotated[int, Field(ge=1, le=10000)] = 1000
    session_max_age_days: Annotated[float, Field(gt=0)] = 30.0  # the app's Auth.js maxAge
    include_expired_sessions: bool = False

    def _required_for_pull(self) -> dict[str, str | None]:
        return {"database_url": self.database_url}


class ProvidersSettings(_Model):
    auth0: Auth0Settings = Auth0Settings()
    stack: StackSettings = StackSettings()
    authjs: AuthjsSettings = AuthjsSettings()


class Settings(_Model):
    database: DatabaseSettings
    sync: SyncSettings = SyncSettings()
    profile: ProfileSettings = ProfileSettings()
    users: UserSettings = UserSettings()
    logging: LoggingSettings = LoggingSettings()
    server: ServerSettings = ServerSettings()
    providers: ProvidersSettings = ProvidersSettings()

    def enabled_providers(self) -> list[str]:
        return [n for n in ("auth0", "stack", "authjs") if self.provider(n).pull_enabled]

    def provider(self, name: str) -> _ProviderSettings:
        if name not in ("auth0", "stack", "authjs"):
            raise ConfigError(f"unknown provider {name!r} (expected auth0, stack or authjs)")
        settings: _ProviderSettings = getattr(self.providers, name)
        return settings


def config_path(cli_path: str | None, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(cli_path or env.get("SYNC_WORKER_CONFIG") or DEFAULT_CONFIG)


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, interpolate and validate the config file. Raises ConfigError."""
    env = dict(os.environ if environ is None else environ)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = _interpolate(document, env, ())
    database = data.setdefault("database", {})
    if isinstance(database, dict) and env.get("DATABASE_URL"):
        database["url"] = env["DATABASE_URL"]
    return settings_from_mapping(data, base_dir=path.parent, source=str(path))


def settings_from_mapping(
    data: Mapping[str, Any], *, base_dir: Path = Path("."), source: str = "config"
) -> Settings:
    try:
        settings = Settings.model_validate(_drop_empty(data))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None
    for name in ("auth0", "stack", "authjs"):
        settings.provider(name).check(name)
    url = normalize_database_url(settings.database.url, base_dir)
    return settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": url})}
    )


def normalize_database_url(url: str, base_dir: Path = Path(".")) -> str:
    """Accept postgres://, postgresql:// and sqlite:/// URLs; always reach PostgreSQL via psycopg 3.

    A relative SQLite path is taken relative to the config file's directory.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"database.url: not a URL: {_redact(url)!r}")
    if scheme in ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"):
        return f"postgresql+psycopg://{rest}"
    if scheme in ("sqlite", "sqlite+pysqlite"):
        path = rest[1:] if rest.startswith("/") else rest
        if path in ("", ":memory:") or path.startswith("/") or path.startswith("file:"):
            return f"sqlite:///{path}"
        return f"sqlite:///{(base_dir / path).resolve()}"
    raise ConfigError(
        f"database.url: unsupported scheme {scheme!r} (use postgresql:// or sqlite:///)"
    )


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _interpolate(value: Any, env: Mapping[str, str], path: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, (*path, str(i))) for i, v in enumerate(value)]
    if isinstance(value, str):
        return _substitute(value, env, ".".join(path))
    return value


def _substitute(text: str, env: Mapping[str, str], key: str) -> str | None:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{key}: environment variable {name} is not set")

    result = _VAR.sub(replace, text)
    # A value that was only a reference to an empty/unset variable means "not configured".
    return None if result == "" and _VAR.fullmatch(text) else result


def _drop_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v is not None}
    return value


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: missing"
    given = error.get("input")
    secret = any(w in key for w in ("secret", "token", "key", "url", "password"))
    shown = "" if secret or isinstance(given, dict | list) else f" (got {str(given)[:40]!r})"
    return f"{key}: {error['msg'].lower()}{shown}"
