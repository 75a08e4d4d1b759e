"""Auth.js table layouts ("flavours") as data, and the SQLAlchemy Core tables built from them.

Auth.js keeps users in the app's own database through an adapter, and each adapter names
things its own way (docs/idp/authjs.md §1):

    flavour   user     account     session     user id           timestamps
    pg        users    accounts    sessions    SERIAL integer    timestamptz
    prisma    "User"   "Account"   "Session"   text (cuid)       timestamp(3), no zone
    drizzle   "user"   "account"   "session"   text (uuid)       timestamp, no zone

The worker only needs a few columns, named here by logical names (``email_verified``,
``provider_account_id``, ...) that map to each flavour's physical names. Operators override
any table or column (``tables: {user: my_users}``, ``columns: {user: {email: mail}}``), e.g.
for Prisma's optional ``@@map`` naming convention. Every identifier is quoted exactly as
given: ``"user"`` is reserved in PostgreSQL and camelCase names only exist quoted.

Token columns (``access_token``, ``refresh_token``, ``id_token``) are deliberately absent:
what is not in these tables can never be selected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, DateTime, Integer, MetaData, Table, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from sync_worker.changes import as_utc
from sync_worker.config import AuthjsSettings
from sync_worker.errors import ConfigError

__all__ = [
    "COLUMNS",
    "FLAVOURS",
    "OPTIONAL_COLUMNS",
    "AuthjsTables",
    "AuthjsTimestamp",
    "Flavour",
    "build_tables",
    "physical_names",
]

#: Logical columns the worker reads, per logical table, in select order.
COLUMNS: Mapping[str, tuple[str, ...]] = {
    "user": ("id", "name", "email", "email_verified", "image"),
    "account": ("user_id", "provider", "provider_account_id"),
    "session": ("user_id", "session_token", "expires"),
}

#: Columns only some schemas have (Prisma's docs schema adds createdAt); read when configured.
OPTIONAL_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "user": ("created_at",),
    "account": (),
    "session": ("created_at",),
}

_CAMEL_CASE: Mapping[str, Mapping[str, str]] = {
    "user": {
        "id": "id",
        "name": "name",
        "email": "email",
        "email_verified": "emailVerified",
        "image": "image",
    },
    "account": {
        "user_id": "userId",
        "provider": "provider",
        "provider_account_id": "providerAccountId",
    },
    "session": {"user_id": "userId", "session_token": "sessionToken", "expires": "expires"},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Flavour:
    """One adapter's default layout."""

    name: str
    tables: Mapping[str, str]
    columns: Mapping[str, Mapping[str, str]]
    integer_ids: bool
    timestamps_with_tz: bool


FLAVOURS: Mapping[str, Flavour] = {
    "pg": Flavour(
        name="pg",
        tables={"user": "users", "account": "accounts", "session": "sessions"},
        columns=_CAMEL_CASE,
        integer_ids=True,
        timestamps_with_tz=True,
    ),
    "prisma": Flavour(
        name="prisma",
        tables={"user": "User", "account": "Account", "session": "Session"},
        columns=_CAMEL_CASE,
        integer_ids=False,
        timestamps_with_tz=False,
    ),
    "drizzle": Flavour(
        name="drizzle",
        tables={"user": "user", "account": "account", "session": "session"},
        columns=_CAMEL_CASE,
        integer_ids=False,
        timestamps_with_tz=False,
    ),
}


class AuthjsTimestamp(TypeDecorator[Any]):
    """A timestamp as the adapters store it, read raw and bound in the stored form.

    Results are passed through untouched (``to_change`` parses datetimes, ISO strings and
    epoch milliseconds alike), because SQLite holds whatever the writer chose: Prisma's
    native engine and Drizzle's ``timestamp_ms`` both store epoch milliseconds. Bound values
    follow the column: aware UTC for timestamptz, naive UTC for ``timestamp`` (comparing
    those with an aware value would go through the session time zone), epoch ms on SQLite.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self, timezone: bool) -> None:
        super().__init__(timezone=timezone)
        self.timezone = timezone

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Integer())
        return dialect.type_descriptor(DateTime(timezone=self.timezone))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if not isinstance(value, datetime):
            return value
        utc = as_utc(value)
        assert utc is not None
        if dialect.name == "sqlite":
            return int(utc.timestamp() * 1000)
        return utc if self.timezone else utc.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthjsTables:
    """The three tables, with columns keyed by logical name (``tables.user.c.email_verified``)."""

    flavour: Flavour
    user: Table
    account: Table
    session: Table

    def has(self, table: str, column: str) -> bool:
        return column in self._table(table).c

    def _table(self, name: str) -> Table:
        tables = {"user": self.user, "account": self.account, "session": self.session}
        return tables[name]


def physical_names(settings: AuthjsSettings) -> dict[str, tuple[str, dict[str, str]]]:
    """logical table -> (physical table, {logical column: physical column}), overrides applied.

    Optional columns appear only when the operator names them. Unknown keys are a
    ConfigError naming the key, so a typo never silently reads the default column.
    """
    flavour = FLAVOURS[settings.schema_flavour]
    _check_overrides(settings)
    names: dict[str, tuple[str, dict[str, str]]] = {}
    for table, defaults in flavour.columns.items():
        overrides = settings.columns.get(table, {})
        columns = {c: overrides.get(c, defaults[c]) for c in COLUMNS[table]}
        columns |= {c: overrides[c] for c in OPTIONAL_COLUMNS[table] if c in overrides}
        names[table] = (settings.tables.get(table, flavour.tables[table]), columns)
    return names


def build_tables(settings: AuthjsSettings, *, schema: str | None) -> AuthjsTables:
    """SQLAlchemy tables for the configured flavour, overrides and database schema."""
    flavour = FLAVOURS[settings.schema_flavour]
    metadata = MetaData()
    names = physical_names(settings)
    id_type: type[TypeEngine[Any]] = Integer if flavour.integer_ids else Text

    def table(logical: str) -> Table:
        physical, columns = names[logical]
        built = [
            Column(name, _column_type(key, id_type, flavour), key=key, quote=True)
            for key, name in columns.items()
        ]
        return Table(physical, metadata, *built, schema=schema, quote=True, quote_schema=True)

    return AuthjsTables(
        flavour=flavour, user=table("user"), account=table("account"), session=table("session")
    )


def _column_type(key: str, id_type: type[TypeEngine[Any]], flavour: Flavour) -> TypeEngine[Any]:
    if key in ("id", "user_id"):
        return id_type()
    if key in ("email_verified", "expires", "created_at"):
        return AuthjsTimestamp(timezone=flavour.timestamps_with_tz)
    return Text()


def _check_overrides(settings: AuthjsSettings) -> None:
    expected = "(expected user, account or session)"
    for table in settings.tables:
        if table not in COLUMNS:
            raise ConfigError(f"providers.authjs.tables.{table}: unknown table {expected}")
    for table, columns in settings.columns.items():
        if table not in COLUMNS:
            raise ConfigError(f"providers.authjs.columns.{table}: unknown table {expected}")
        known = (*COLUMNS[table], *OPTIONAL_COLUMNS[table])
        for column, physical in columns.items():
            if column not in known:
                raise ConfigError(
                    f"providers.authjs.columns.{table}.{column}: unknown column "
                    f"(expected one of {', '.join(known)})"
                )
            if not physical:
                raise ConfigError(f"providers.authjs.columns.{table}.{column}: empty name")
