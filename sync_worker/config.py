"""Configuration: the only module that reads the config file and the environment.

The YAML file is parsed once, ``${VAR}`` / ``${VAR:-default}`` references are replaced from
the environment, and the result is validated into a frozen, typed ``Settings`` object that
constructors receive. Every problem becomes a ``ConfigError``: one line that starts with the
file, names the key and never shows a secret (nor any part of a URL, which may hold one).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from sqlalchemy.engine import make_url

from db.connect import url_problem
from sync_worker.errors import ConfigError

DEFAULT_CONFIG = "config.yaml"
AUTHJS_URL_KEY = "providers.authjs.database_url"
#: Query parameters of a Prisma DATABASE_URL: libpq rejects them, the Auth.js adapter drops
#: them (and honours ``schema``), so an Auth.js URL may carry them.
PRISMA_URL_PARAMS = frozenset(
    {"schema", "connection_limit", "pool_timeout", "pgbouncer", "statement_cache_size",
     "socket_timeout", "sslaccept"}
)  # fmt: skip
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_POSTGRES = ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")
_SQLITE = ("sqlite", "sqlite+pysqlite")
# Schemes named back in "unsupported scheme": a fixed list, so no other text is ever echoed.
_KNOWN_SCHEMES = frozenset(
    {"mysql", "mariadb", "mssql", "oracle", "cockroachdb", "mongodb", "redis", "http", "https"}
)
# Keys whose values are never shown in a message, whatever their type.
_SECRET_WORDS = ("secret", "token", "key", "url", "password", "dsn")
# Validation errors on a string that show it: a misspelt choice or a non-number.
_SHOWN_STRING_ERRORS = frozenset(
    {"literal_error", "int_parsing", "float_parsing", "bool_parsing", "string_pattern_mismatch"}
)

# Secrets are left out of repr(), so a settings object in a log line or a debugger shows none.
_Secret = Annotated[str, Field(repr=False)]
_OptionalSecret = Annotated[str | None, Field(repr=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Model):
    url: _Secret
    schema_: Annotated[str, Field(alias="schema", pattern=r"^[a-z_][a-z0-9_]*$")] = "identity"
    pool_size: Annotated[int, Field(ge=1, le=100)] = 5
    echo: bool = False
    # False behind a pooler in transaction mode that cannot keep prepared statements.
    prepared_statements: bool = True


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
    #: SIGTERM to exit: requests in flight, the drainer's batch and jobs finish within it.
    grace_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0


class DrainSettings(_Model):
    """The inbox drainer: claims ``batch_size`` rows at a time, retries failures with
    exponential backoff and jitter, and gives a row up as dead after ``max_attempts``."""

    batch_size: Annotated[int, Field(ge=1, le=5000)] = 200
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    lease_seconds: Annotated[float, Field(gt=0)] = 300.0
    backoff_seconds: Annotated[float, Field(gt=0)] = 30.0
    backoff_max_seconds: Annotated[float, Field(gt=0)] = 3600.0
    poll_seconds: Annotated[float, Field(gt=0, le=3600)] = 1.0
    #: /readyz reports the drainer stalled when its loop has not turned for this long.
    stale_after_seconds: Annotated[float, Field(gt=0)] = 60.0


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(value: object) -> float:
    """``30s``, ``5m``, ``1h``, ``1d`` (or a number of seconds) in seconds; ValueError else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("expected a duration such as 30s, 5m, 1h or 1d")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(duration_seconds)]


class JobSettings(_Model):
    """One scheduled job: ``every: 5m`` or ``cron: "m h dom mon dow"`` (UTC), and enabled."""

    enabled: bool = True
    every: Duration | None = None
    cron: str | None = None

    @model_validator(mode="after")
    def _one_schedule(self) -> JobSettings:
        if (self.every is None) == (self.cron is None):
            raise ValueError("give exactly one of every or cron")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError("cron: expected five fields (minute hour day month weekday)")
        return self


def _job(**schedule: Any) -> JobSettings:
    return JobSettings.model_validate(schedule)


class JobsSettings(_Model):
    """The scheduler's jobs; each tick runs once across every instance on one PostgreSQL."""

    pull: JobSettings = _job(every="5m")
    reconcile: JobSettings = _job(cron="17 3 * * *")
    backfill_profiles: JobSettings = _job(every="1h")
    session_cleanup: JobSettings = _job(every="1h")
    retention: JobSettings = _job(cron="41 4 * * *")
    retry: JobSettings = _job(every="30s")
    #: A late tick (the process was busy or down) still runs within this; runs missed
    #: while down coalesce into one.
    misfire_grace: Duration = 3600.0


#: Svix retries for about 28 hours; done inbox rows must outlive every sender's retries.
INBOX_MIN_RETENTION_SECONDS = 2 * 86400.0


def _retention_or_off(value: object) -> object:
    return None if value in ("off", False) else value


class RetentionSettings(_Model):
    """How long rows are kept before the ``retention`` and ``session_cleanup`` jobs purge them."""

    #: sync_audit rows; ``off`` keeps them forever.
    audit: Annotated[Duration | None, BeforeValidator(_retention_or_off)] = 365 * 86400.0
    #: done and ignored inbox rows (a redelivery within it is still recognised).
    inbox_done: Annotated[float, BeforeValidator(duration_seconds),
                          Field(ge=INBOX_MIN_RETENTION_SECONDS)] = 3 * 86400.0  # fmt: skip
    #: expired or revoked user_sessions rows, after they ended.
    sessions: Duration = 30 * 86400.0
    #: user_sessions rows that state no expiry (Auth0 logins: the log carries none) end when
    #: not seen for this long (Auth0's inactivity timeout is at most 100 days), and are then
    #: kept ``sessions`` more; ``off`` keeps them until revoked.
    idle_sessions: Annotated[Duration | None, BeforeValidator(_retention_or_off)] = 100 * 86400.0
    #: also delete expired rows of the Auth.js app's own sessions table (Auth.js never does).
    authjs_sessions: bool = False
    #: rows deleted per transaction, so a purge never holds long locks.
    batch_size: Annotated[int, Field(ge=1, le=10000)] = 1000


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
    client_secret: _OptionalSecret = None
    base_url: str | None = None
    audience: str | None = None
    webhook_token: _OptionalSecret = None
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
    secret_server_key: _OptionalSecret = None
    base_url: str = "https://api.stack-auth.com"
    header_prefix: str = "x-stack"
    webhook_secret: _OptionalSecret = None
    page_size: Annotated[int, Field(ge=1, le=1000)] = 500
    include_personal_teams: bool = False
    personal_team_metadata_key: str = "personal"

    def _required_for_pull(self) -> dict[str, str | None]:
        return {"project_id": self.project_id, "secret_server_key": self.secret_server_key}


class AuthjsSettings(_ProviderSettings):
    database_url: _OptionalSecret = None
    schema_flavour: Annotated[Literal["pg", "prisma", "drizzle"], Field(alias="schema")] = "pg"
    db_schema: str | None = None
    tables: Mapping[str, str] = Field(default_factory=dict)
    columns: Mapping[str, Mapping[str, str]] = Field(default_factory=dict)
    webhook_secret: _OptionalSecret = None
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
    drain: DrainSettings = DrainSettings()
    jobs: JobsSettings = JobsSettings()
    retention: RetentionSettings = RetentionSettings()
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
    document = _read_document(path)
    try:
        data = _interpolate(document, env, ())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    origins: dict[str, str] = {}
    if data.get("database") is None:  # absent or empty: say which key is missing
        data["database"] = {}
    if env.get("DATABASE_URL") and isinstance(data["database"], dict):
        data["database"]["url"] = env["DATABASE_URL"]
        origins["database.url"] = "$DATABASE_URL"
    return settings_from_mapping(data, base_dir=path.parent, source=str(path), origins=origins)


def _read_document(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    document, where = _parse_yaml(text)
    if where is not None:
        raise ConfigError(f"{path}:{where} invalid YAML")
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return document


def _parse_yaml(text: str) -> tuple[Any, str | None]:
    """The document, or where parsing stopped.

    Only the line is kept: the parser's own message quotes the text around the mistake, a
    secret included, and the ConfigError is raised outside this handler so that message is
    not even chained to it.
    """
    try:
        return yaml.safe_load(text), None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return None, (f" line {mark.line + 1}" if mark is not None else "")


def settings_from_mapping(
    data: Mapping[str, Any],
    *,
    base_dir: Path = Path("."),
    source: str = "config",
    origins: Mapping[str, str] | None = None,
) -> Settings:
    """Validate ``data``; every ConfigError starts with ``source``.

    ``origins`` names where a key's value came from when it is not the file (such as
    ``{"database.url": "$DATABASE_URL"}``), for the message.
    """
    try:
        return _validate(data, base_dir, origins or {})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _validate(data: Mapping[str, Any], base_dir: Path, origins: Mapping[str, str]) -> Settings:
    settings = _model(_drop_unset(data, Settings))
    for name in ("auth0", "stack", "authjs"):
        settings.provider(name).check(name)
    key = "database.url"
    if key in origins:
        key = f"{key} (from {origins[key]})"
    database = settings.database.model_copy(
        update={"url": normalize_database_url(settings.database.url, base_dir, key=key)}
    )
    authjs = settings.providers.authjs
    if authjs.database_url:
        url = authjs_database_url(authjs.database_url, base_dir, must_exist=True)
        authjs = authjs.model_copy(update={"database_url": url})
    providers = settings.providers.model_copy(update={"authjs": authjs})
    return settings.model_copy(update={"database": database, "providers": providers})


def _model(data: Any) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problem = _first_error(exc)
    # Raised outside the handler: pydantic's error quotes the input, so it must not be chained.
    raise ConfigError(problem)


def normalize_database_url(
    url: str,
    base_dir: Path = Path("."),
    *,
    key: str = "database.url",
    ignore_params: Collection[str] = (),
) -> str:
    """Accept postgres://, postgresql:// and sqlite:/// URLs; always reach PostgreSQL via psycopg 3.

    A relative SQLite path is taken relative to ``base_dir`` (the config file's directory).
    The URL is then checked as a connection would read it (``db.connect.url_problem``), so a
    bad one is a ConfigError naming ``key`` now, not a driver traceback later. No message
    holds any part of the URL.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ConfigError(f"{key}: not a URL (expected postgresql://... or sqlite:///...)")
    if scheme in _POSTGRES:
        normalized = f"postgresql+psycopg://{rest}"
    elif scheme in _SQLITE:
        normalized = _sqlite_url(rest, base_dir)
    else:
        dialect = scheme.partition("+")[0].lower()
        named = f" {dialect!r}" if dialect in _KNOWN_SCHEMES else ""
        raise ConfigError(f"{key}: unsupported scheme{named} (use postgresql:// or sqlite:///)")
    problem = url_problem(normalized, ignore_params=ignore_params)
    if problem is not None:
        raise ConfigError(f"{key}: {problem}")
    return normalized


def authjs_database_url(url: str, base_dir: Path = Path("."), *, must_exist: bool = False) -> str:
    """``normalize_database_url`` for the app's Auth.js database, Prisma's parameters allowed.

    ``must_exist``: a SQLite file must already be there; opening a missing one would
    create an empty database and every user would look deleted.
    """
    normalized = normalize_database_url(
        url, base_dir, key=AUTHJS_URL_KEY, ignore_params=PRISMA_URL_PARAMS
    )
    if must_exist and not _sqlite_file_exists(normalized):
        raise ConfigError(
            f"{AUTHJS_URL_KEY}: no SQLite database at that path "
            f"(a relative path starts at the config file's directory)"
        )
    return normalized


def _sqlite_url(rest: str, base_dir: Path) -> str:
    path = rest[1:] if rest.startswith("/") else rest
    if path in ("", ":memory:") or path.startswith("/") or path.startswith("file:"):
        return f"sqlite:///{path}"
    return f"sqlite:///{(base_dir / path).resolve()}"


def _sqlite_file_exists(url: str) -> bool:
    """False only for a SQLite URL naming a file that is not there (``url`` is valid)."""
    parsed = make_url(url)
    path = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or path in ("", ":memory:"):
        return True
    return path.startswith("file:") or Path(path).is_file()


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


def _drop_unset(value: Any, model: type[BaseModel] | None) -> Any:
    """Drop the keys of ``model`` left empty (``${VAR:-}``), so their defaults apply.

    An empty key ``model`` does not have is kept, so a misspelt one (``databse:``) is still
    reported as unknown. Mappings that are not sections (``tables``...) lose empty keys.
    """
    if not isinstance(value, dict):
        return value
    sections = _sections(model) if model is not None else None
    return {
        k: _drop_unset(v, sections.get(k) if sections is not None else None)
        for k, v in value.items()
        if v is not None or (sections is not None and k not in sections)
    }


def _sections(model: type[BaseModel]) -> dict[str, type[BaseModel] | None]:
    """Each field of ``model`` as written in YAML, with its model if it is a section."""
    fields: dict[str, type[BaseModel] | None] = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        nested = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
        fields[info.alias or name] = nested
    return fields


def _first_error(exc: ValidationError) -> str:
    # Unknown keys first: a misspelt section (databse:) also leaves the real one "missing".
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: missing"
    if kind in ("model_type", "dict_type"):
        return f"{key}: must be a mapping of keys"
    message = error["msg"]
    return f"{key}: {message[:1].lower()}{message[1:]}{_shown(key, kind, error.get('input'))}"


def _shown(key: str, kind: str, given: Any) -> str:
    """`` (got ...)`` where that is safe and useful: numbers bare, strings quoted."""
    if any(word in key.lower() for word in _SECRET_WORDS):
        return ""
    if isinstance(given, bool | int | float):
        return f" (got {json.dumps(given)})"
    if isinstance(given, str) and kind in _SHOWN_STRING_ERRORS:
        return f" (got {given[:40]!r})"
    return ""
