"""Auth.js databases as the real adapters leave them: the adapters' DDL and their own writes.

Auth.js has no API to fake: its "server" is the app's database. A loader creates the
schema exactly as each adapter's setup does (docs/idp/authjs.md §1) and writes rows with
the column lists the adapters' ``createUser`` / ``linkAccount`` / ``createSession`` use
(§1a, §5), so the worker's reader meets what production holds:

- ``pg``: ``packages/adapter-pg/schema.sql`` on main (no foreign keys, no UNIQUEs), SERIAL
  ids, ``deleteUser`` as three separate DELETEs.
- ``prisma``: the migration ``prisma migrate`` generates for the docs' PostgreSQL schema
  (``"User"`` etc., cuid text ids chosen by the client, ``createdAt``/``updatedAt`` kept by
  the client); on SQLite, the adapter's own test schema, with DateTime stored as epoch
  milliseconds as Prisma's native SQLite engine does.
- ``drizzle``: ``drizzle-kit generate`` output for ``adapter-drizzle/src/lib/pg.ts`` (or
  ``sqlite.ts``, ``timestamp_ms`` integers), uuid text ids chosen by the client.

``generate_users`` makes a deterministic, realistic population (magic-link users, GitHub /
Google / Discord accounts with token columns filled, live and long-dead sessions); ``load``
bulk-inserts it with COPY (PostgreSQL) or executemany (SQLite), fast enough for 100k users.
"""

from __future__ import annotations

import base64
import random
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import psycopg

__all__ = [
    "LOADERS",
    "AuthjsLoader",
    "DrizzleLoader",
    "FakeAccount",
    "FakeSession",
    "FakeUser",
    "PgAdapterLoader",
    "PrismaLoader",
    "generate_users",
    "make_loader",
]

# packages/adapter-pg/schema.sql on main (reference §1a); the psql line is skipped when run.
PG_ADAPTER_SCHEMA_SQL = """\\set ON_ERROR_STOP true

CREATE TABLE users
(
  id SERIAL,
  name VARCHAR(255),
  email VARCHAR(255),
  "emailVerified" TIMESTAMPTZ,
  image TEXT,

  PRIMARY KEY (id)
);

CREATE TABLE accounts
(
  id SERIAL,
  "userId" INTEGER NOT NULL,
  type VARCHAR(255) NOT NULL,
  provider VARCHAR(255) NOT NULL,
  "providerAccountId" VARCHAR(255) NOT NULL,
  refresh_token TEXT,
  access_token TEXT,
  expires_at BIGINT,
  id_token TEXT,
  scope TEXT,
  session_state TEXT,
  token_type TEXT,

  PRIMARY KEY (id)
);

CREATE TABLE sessions
(
  id SERIAL,
  "userId" INTEGER NOT NULL,
  expires TIMESTAMPTZ NOT NULL,
  "sessionToken" VARCHAR(255) NOT NULL,

  PRIMARY KEY (id)
);

CREATE TABLE verification_token
(
  identifier TEXT NOT NULL,
  expires TIMESTAMPTZ NOT NULL,
  token TEXT NOT NULL,

  PRIMARY KEY (identifier, token)
);
"""

# What `prisma migrate dev` writes for the docs' PostgreSQL schema (reference §1b).
PRISMA_POSTGRES_SQL = """-- CreateTable
CREATE TABLE "User" (
    "id" TEXT NOT NULL,
    "name" TEXT,
    "email" TEXT NOT NULL,
    "emailVerified" TIMESTAMP(3),
    "image" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "User_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Account" (
    "userId" TEXT NOT NULL,
    "type" TEXT NOT NULL,
    "provider" TEXT NOT NULL,
    "providerAccountId" TEXT NOT NULL,
    "refresh_token" TEXT,
    "access_token" TEXT,
    "expires_at" INTEGER,
    "token_type" TEXT,
    "scope" TEXT,
    "id_token" TEXT,
    "session_state" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Account_pkey" PRIMARY KEY ("provider","providerAccountId")
);

-- CreateTable
CREATE TABLE "Session" (
    "sessionToken" TEXT NOT NULL,
    "userId" TEXT NOT NULL,
    "expires" TIMESTAMP(3) NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL
);

-- CreateTable
CREATE TABLE "VerificationToken" (
    "identifier" TEXT NOT NULL,
    "token" TEXT NOT NULL,
    "expires" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "VerificationToken_pkey" PRIMARY KEY ("identifier","token")
);

-- CreateTable
CREATE TABLE "Authenticator" (
    "credentialID" TEXT NOT NULL,
    "userId" TEXT NOT NULL,
    "providerAccountId" TEXT NOT NULL,
    "credentialPublicKey" TEXT NOT NULL,
    "counter" INTEGER NOT NULL,
    "credentialDeviceType" TEXT NOT NULL,
    "credentialBackedUp" BOOLEAN NOT NULL,
    "transports" TEXT,

    CONSTRAINT "Authenticator_pkey" PRIMARY KEY ("userId","credentialID")
);

-- CreateIndex
CREATE UNIQUE INDEX "User_email_key" ON "User"("email");

-- CreateIndex
CREATE UNIQUE INDEX "Session_sessionToken_key" ON "Session"("sessionToken");

-- CreateIndex
CREATE UNIQUE INDEX "Authenticator_credentialID_key" ON "Authenticator"("credentialID");

-- AddForeignKey
ALTER TABLE "Account" ADD CONSTRAINT "Account_userId_fkey" FOREIGN KEY ("userId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Session" ADD CONSTRAINT "Session_userId_fkey" FOREIGN KEY ("userId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Authenticator" ADD CONSTRAINT "Authenticator_userId_fkey" FOREIGN KEY ("userId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;
"""  # noqa: E501

# The adapter's own test schema (packages/adapter-prisma/prisma/schema.prisma) on SQLite.
PRISMA_SQLITE_SQL = """-- CreateTable
CREATE TABLE "User" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT,
    "email" TEXT NOT NULL,
    "emailVerified" DATETIME,
    "image" TEXT
);

-- CreateTable
CREATE TABLE "Account" (
    "userId" TEXT NOT NULL,
    "type" TEXT NOT NULL,
    "provider" TEXT NOT NULL,
    "providerAccountId" TEXT NOT NULL,
    "refresh_token" TEXT,
    "access_token" TEXT,
    "expires_at" INTEGER,
    "token_type" TEXT,
    "scope" TEXT,
    "id_token" TEXT,
    "session_state" TEXT,

    PRIMARY KEY ("provider", "providerAccountId"),
    CONSTRAINT "Account_userId_fkey" FOREIGN KEY ("userId") REFERENCES "User" ("id") ON DELETE CASCADE ON UPDATE CASCADE
);

-- CreateTable
CREATE TABLE "Session" (
    "sessionToken" TEXT NOT NULL,
    "userId" TEXT NOT NULL,
    "expires" DATETIME NOT NULL,
    CONSTRAINT "Session_userId_fkey" FOREIGN KEY ("userId") REFERENCES "User" ("id") ON DELETE CASCADE ON UPDATE CASCADE
);

-- CreateTable
CREATE TABLE "VerificationToken" (
    "identifier" TEXT NOT NULL,
    "token" TEXT NOT NULL,
    "expires" DATETIME NOT NULL,

    PRIMARY KEY ("identifier", "token")
);

-- CreateIndex
CREATE UNIQUE INDEX "User_email_key" ON "User"("email");

-- CreateIndex
CREATE UNIQUE INDEX "Session_sessionToken_key" ON "Session"("sessionToken");

-- CreateIndex
CREATE UNIQUE INDEX "VerificationToken_token_key" ON "VerificationToken"("token");
"""  # noqa: E501

# `drizzle-kit generate` for adapter-drizzle's pg.ts default tables (reference §1c).
DRIZZLE_POSTGRES_SQL = """CREATE TABLE IF NOT EXISTS "account" (
	"userId" text NOT NULL,
	"type" text NOT NULL,
	"provider" text NOT NULL,
	"providerAccountId" text NOT NULL,
	"refresh_token" text,
	"access_token" text,
	"expires_at" integer,
	"token_type" text,
	"scope" text,
	"id_token" text,
	"session_state" text,
	CONSTRAINT "account_provider_providerAccountId_pk" PRIMARY KEY("provider","providerAccountId")
);
--> statement-breakpoint
CREATE TABLE IF NOT EXISTS "session" (
	"sessionToken" text PRIMARY KEY NOT NULL,
	"userId" text NOT NULL,
	"expires" timestamp NOT NULL
);
--> statement-breakpoint
CREATE TABLE IF NOT EXISTS "user" (
	"id" text PRIMARY KEY NOT NULL,
	"name" text,
	"email" text,
	"emailVerified" timestamp,
	"image" text,
	CONSTRAINT "user_email_unique" UNIQUE("email")
);
--> statement-breakpoint
CREATE TABLE IF NOT EXISTS "verificationToken" (
	"identifier" text NOT NULL,
	"token" text NOT NULL,
	"expires" timestamp NOT NULL,
	CONSTRAINT "verificationToken_identifier_token_pk" PRIMARY KEY("identifier","token")
);
--> statement-breakpoint
DO $$ BEGIN
 ALTER TABLE "account" ADD CONSTRAINT "account_userId_user_id_fk" FOREIGN KEY ("userId") REFERENCES "user"("id") ON DELETE cascade ON UPDATE no action;
EXCEPTION
 WHEN duplicate_object THEN null;
END $$;
--> statement-breakpoint
DO $$ BEGIN
 ALTER TABLE "session" ADD CONSTRAINT "session_userId_user_id_fk" FOREIGN KEY ("userId") REFERENCES "user"("id") ON DELETE cascade ON UPDATE no action;
EXCEPTION
 WHEN duplicate_object THEN null;
END $$;
"""  # noqa: E501

# `drizzle-kit generate` for adapter-drizzle's sqlite.ts default tables.
DRIZZLE_SQLITE_SQL = """CREATE TABLE `account` (
	`userId` text NOT NULL,
	`type` text NOT NULL,
	`provider` text NOT NULL,
	`providerAccountId` text NOT NULL,
	`refresh_token` text,
	`access_token` text,
	`expires_at` integer,
	`token_type` text,
	`scope` text,
	`id_token` text,
	`session_state` text,
	PRIMARY KEY(`provider`, `providerAccountId`),
	FOREIGN KEY (`userId`) REFERENCES `user`(`id`) ON UPDATE no action ON DELETE cascade
);
--> statement-breakpoint
CREATE TABLE `session` (
	`sessionToken` text PRIMARY KEY NOT NULL,
	`userId` text NOT NULL,
	`expires` integer NOT NULL,
	FOREIGN KEY (`userId`) REFERENCES `user`(`id`) ON UPDATE no action ON DELETE cascade
);
--> statement-breakpoint
CREATE TABLE `user` (
	`id` text PRIMARY KEY NOT NULL,
	`name` text,
	`email` text NOT NULL,
	`emailVerified` integer,
	`image` text
);
--> statement-breakpoint
CREATE TABLE `verificationToken` (
	`identifier` text NOT NULL,
	`token` text NOT NULL,
	`expires` integer NOT NULL,
	PRIMARY KEY(`identifier`, `token`)
);
"""

# AdapterAccount fields in the order each adapter's linkAccount inserts them.
_PG_ACCOUNT_FIELDS = (
    "userId", "provider", "type", "providerAccountId", "access_token", "expires_at",
    "refresh_token", "id_token", "scope", "session_state", "token_type",
)  # fmt: skip
_MODEL_ACCOUNT_FIELDS = (
    "userId", "type", "provider", "providerAccountId", "refresh_token", "access_token",
    "expires_at", "token_type", "scope", "id_token", "session_state",
)  # fmt: skip


# -- generated data --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeAccount:
    """An AdapterAccount as core hands it to linkAccount (tokens included, as in real rows)."""

    provider: str
    provider_account_id: str
    type: str = "oauth"
    access_token: str | None = None
    refresh_token: str | None = None
    id_token: str | None = None
    expires_at: int | None = None
    scope: str | None = None
    token_type: str | None = None
    session_state: str | None = None

    def fields(self, user_id: Any) -> dict[str, Any]:
        return {
            "userId": user_id,
            "type": self.type,
            "provider": self.provider,
            "providerAccountId": self.provider_account_id,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "id_token": self.id_token,
            "expires_at": self.expires_at,
            "scope": self.scope,
            "token_type": self.token_type,
            "session_state": self.session_state,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeSession:
    session_token: str
    expires: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeUser:
    """A user to create; ``id`` is filled in once the loader has written it."""

    name: str | None
    email: str
    email_verified: datetime | None = None
    image: str | None = None
    accounts: tuple[FakeAccount, ...] = ()
    sessions: tuple[FakeSession, ...] = ()
    id: int | str | None = field(default=None)


_FIRST = (
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret",
    "Dennis", "Radia", "Linus", "Sophie", "Guido", "Katherine", "Tim", "Hedy", "John",
    "Leslie", "Niklaus", "Joan", "Yukihiro", "Anita", "Bjarne", "Shafi", "José", "Zoë",
)  # fmt: skip
_LAST = (
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
    "Hamilton", "Ritchie", "Perlman", "Torvalds", "Wilson", "van Rossum", "Johnson",
    "Berners-Lee", "Lamarr", "McCarthy", "Lamport", "Wirth", "Clarke", "Matsumoto",
    "Borg", "Stroustrup", "Goldwasser", "Valim", "O'Brien",
)  # fmt: skip
_DOMAINS = ("gmail.com", "outlook.com", "fastmail.com", "example.com", "acme.io", "proton.me")


def generate_users(n: int, *, seed: int = 0, now: datetime | None = None) -> Iterator[FakeUser]:
    """``n`` deterministic users (same seed, same users; ``now`` anchors the timestamps).

    A quarter signed in by magic link only (verified, no name, no account), the rest through
    one or two OAuth providers; each has 0-3 sessions, about half of them long expired, as
    Auth.js leaves them (reference §4).
    """
    rng = random.Random(seed)
    anchor = now or datetime.now(UTC)
    for i in range(n):
        yield _user(rng, i, anchor)


def _user(rng: random.Random, i: int, now: datetime) -> FakeUser:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    local = f"{first}.{last}".lower().replace(" ", "").replace("'", "")
    email = f"{local}{i}@{rng.choice(_DOMAINS)}"
    signed_up = now - timedelta(days=rng.randrange(1, 900), seconds=rng.randrange(86_400))
    sessions = tuple(_session(rng, now) for _ in range(rng.randrange(4)))
    if rng.random() < 0.25:  # magic link: core sets emailVerified, no profile data
        return FakeUser(name=None, email=email, email_verified=signed_up, sessions=sessions)
    providers = rng.sample(("github", "google", "discord"), k=rng.choice((1, 1, 1, 2)))
    accounts = tuple(_account(rng, p, i) for p in providers)
    return FakeUser(
        name=f"{first} {last}",
        email=email,
        email_verified=signed_up if rng.random() < 0.1 else None,
        image=_avatar(rng, providers[0], accounts[0].provider_account_id),
        accounts=accounts,
        sessions=sessions,
    )


def _account(rng: random.Random, provider: str, i: int) -> FakeAccount:
    if provider == "github":
        # An account belongs to one user: ids drawn from 1..180M collided (5 per 100k users).
        return FakeAccount(
            provider="github",
            provider_account_id=str(i * 180 + rng.randrange(1, 181)),
            access_token=f"gho_{_token(rng, 36)}",
            scope="read:user,user:email",
            token_type="bearer",
        )
    if provider == "google":
        return FakeAccount(
            provider="google",
            type="oidc",
            provider_account_id=str(rng.randrange(10**20, 10**21)),
            access_token=f"ya29.{_token(rng, 120)}",
            id_token=f"eyJhbGciOiJSUzI1NiJ9.{_token(rng, 200)}",
            expires_at=1_700_000_000 + rng.randrange(50_000_000),
            scope="openid https://www.googleapis.com/auth/userinfo.email",
            token_type="bearer",
        )
    return FakeAccount(
        provider=provider,
        provider_account_id=str(rng.randrange(10**17, 10**18)),
        access_token=_token(rng, 30),
        refresh_token=_token(rng, 30),
        expires_at=1_700_000_000 + rng.randrange(50_000_000),
        scope="identify email",
        token_type="Bearer",
    )


def _session(rng: random.Random, now: datetime) -> FakeSession:
    # Auth.js: token = crypto.randomUUID(), expires = last write + maxAge (30 days).
    offset = timedelta(days=rng.uniform(-400, 30))
    return FakeSession(session_token=_uuid(rng), expires=now + offset)


def _avatar(rng: random.Random, provider: str, account_id: str) -> str | None:
    if provider == "github":
        return f"https://avatars.githubusercontent.com/u/{account_id}?v=4"
    if provider == "google":
        return f"https://lh3.googleusercontent.com/a/ACg8oc{_token(rng, 40)}=s96-c"
    return None


def _token(rng: random.Random, length: int) -> str:
    return base64.urlsafe_b64encode(rng.randbytes(length)).decode()[:length]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _cuid(rng: random.Random) -> str:
    """A cuid-shaped id as Prisma's ``@default(cuid())`` makes client-side: c + 24 base36."""
    millis = 1_700_000_000_000 + rng.randrange(10**11)
    parts = (_base36(millis, 8), _base36(rng.randrange(36**4), 4))
    return "c" + "".join(parts) + _base36(rng.randrange(36**12), 12)


def _base36(value: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while value:
        value, rest = divmod(value, 36)
        out = digits[rest] + out
    return out.rjust(width, "0")[-width:]


# -- loaders ---------------------------------------------------------------------------


class AuthjsLoader:
    """Writes an Auth.js database the way one adapter does. Subclasses name the flavour.

    ``url`` is a libpq / SQLAlchemy PostgreSQL URL or ``sqlite:///path``. ``db_schema``
    puts the tables in that PostgreSQL schema (as an app's search_path or Prisma's
    ``?schema=`` does).
    """

    flavour: ClassVar[str]
    user_table: ClassVar[str]
    account_table: ClassVar[str]
    session_table: ClassVar[str]
    user_fields: ClassVar[tuple[str, ...]]
    account_fields: ClassVar[tuple[str, ...]] = _MODEL_ACCOUNT_FIELDS
    session_fields: ClassVar[tuple[str, ...]] = ("sessionToken", "userId", "expires")
    timestamps_with_tz: ClassVar[bool] = False

    def __init__(self, url: str, *, db_schema: str | None = None, seed: int = 0) -> None:
        self.sqlite = url.startswith("sqlite")
        self.db_schema = db_schema
        self._rng = random.Random(f"{self.flavour}-ids-{seed}")
        self._conn: Any = self._connect(url)

    # -- connection and schema -------------------------------------------------------

    def _connect(self, url: str) -> Any:
        if self.sqlite:
            lite = sqlite3.connect(url.split(":///", 1)[1], isolation_level=None)
            lite.execute("PRAGMA foreign_keys = ON")
            return lite
        conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1))
        conn.autocommit = True
        if self.db_schema:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.db_schema}"')
            conn.execute(f'SET search_path TO "{self.db_schema}"')
        return conn

    def ddl(self) -> str:
        raise NotImplementedError

    def create_schema(self) -> None:
        """Run the adapter's DDL, statement by statement (psql meta-commands skipped)."""
        text = "\n".join(line for line in self.ddl().splitlines() if not line.startswith("\\"))
        if self.sqlite:
            self._conn.executescript(text.replace("--> statement-breakpoint", ""))
            return
        for statement in text.split("--> statement-breakpoint"):
            self._conn.execute(statement)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run raw SQL (``%s`` placeholders) — for tests that damage or rename things."""
        if self.sqlite:
            cur = self._conn.execute(sql.replace("%s", "?"), tuple(params))
        else:
            cur = self._conn.execute(sql, tuple(params))
        return list(cur.fetchall()) if cur.description else []

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AuthjsLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the adapter does -------------------------------------------------------

    def create_user(
        self,
        *,
        name: str | None,
        email: str,
        email_verified: datetime | None = None,
        image: str | None = None,
    ) -> int | str:
        """createUser: returns the new id (SERIAL, or generated client-side)."""
        user = FakeUser(name=name, email=email, email_verified=email_verified, image=image)
        row = self._user_values(user, self._new_id())
        fields = self.user_fields + self._stamp_fields()
        rows = self._insert(self.user_table, fields, [row], returning="id")
        user_id: int | str = rows[0][0]
        return user_id

    def link_account(self, user_id: int | str, account: FakeAccount) -> None:
        values = account.fields(user_id)
        row = tuple(values[f] for f in self.account_fields) + self._stamps()
        self._insert(self.account_table, self.account_fields + self._stamp_fields(), [row])

    def create_session(self, user_id: int | str, session: FakeSession) -> None:
        row = self._session_values(user_id, session)
        self._insert(self.session_table, self.session_fields + self._stamp_fields(), [row])

    def update_user(self, user_id: int | str, **changes: Any) -> None:
        """updateUser with AdapterUser fields (name, email, emailVerified, image)."""
        assignments = {k: self._value(v) for k, v in changes.items()}
        self._update(user_id, assignments)

    def delete_user(self, user_id: int | str) -> None:
        """deleteUser: Prisma and Drizzle rely on ON DELETE CASCADE."""
        self.execute(f"DELETE FROM {_q(self.user_table)} WHERE {_q('id')} = %s", [user_id])

    def delete_session(self, session_token: str) -> None:
        table, column = _q(self.session_table), _q("sessionToken")
        self.execute(f"DELETE FROM {table} WHERE {column} = %s", [session_token])

    # -- bulk ------------------------------------------------------------------------

    def populate(self, n: int, *, seed: int = 0, now: datetime | None = None) -> list[FakeUser]:
        """Generate and load ``n`` users; returns them with their ids."""
        return self.load(generate_users(n, seed=seed, now=now))

    def load(self, users: Iterable[FakeUser]) -> list[FakeUser]:
        """Bulk-insert users, their accounts and sessions with the adapters' column lists."""
        pending = [replace(u, id=self._new_id()) for u in users]
        rows = [self._user_values(u, u.id) for u in pending]
        self._bulk(self.user_table, self.user_fields + self._stamp_fields(), rows)
        loaded = self._with_ids(pending)
        accounts = [
            tuple(a.fields(u.id)[f] for f in self.account_fields) + self._stamps()
            for u in loaded
            for a in u.accounts
        ]
        self._bulk(self.account_table, self.account_fields + self._stamp_fields(), accounts)
        sessions = [self._session_values(u.id, s) for u in loaded for s in u.sessions]
        self._bulk(self.session_table, self.session_fields + self._stamp_fields(), sessions)
        return loaded

    def _with_ids(self, users: list[FakeUser]) -> list[FakeUser]:
        return users

    # -- flavour hooks ---------------------------------------------------------------

    def _new_id(self) -> int | str | None:
        return None

    def _user_values(self, user: FakeUser, user_id: Any) -> tuple[Any, ...]:
        values = {
            "id": user_id,
            "name": user.name,
            "email": user.email,
            "emailVerified": self._value(user.email_verified),
            "image": user.image,
        }
        return tuple(values[f] for f in self.user_fields) + self._stamps()

    def _session_values(self, user_id: Any, session: FakeSession) -> tuple[Any, ...]:
        values = {
            "sessionToken": session.session_token,
            "userId": user_id,
            "expires": self._value(session.expires),
        }
        return tuple(values[f] for f in self.session_fields) + self._stamps()

    def _stamp_fields(self) -> tuple[str, ...]:
        return ()

    def _stamps(self) -> tuple[Any, ...]:
        return ()

    def _update(self, user_id: int | str, assignments: dict[str, Any]) -> None:
        sets = ", ".join(f"{_q(k)} = %s" for k in assignments)
        sql = f"UPDATE {_q(self.user_table)} SET {sets} WHERE {_q('id')} = %s"
        self.execute(sql, [*assignments.values(), user_id])

    # -- SQL helpers -----------------------------------------------------------------

    def _value(self, value: Any) -> Any:
        """A datetime the way the adapter's driver stores it."""
        if not isinstance(value, datetime):
            return value
        utc = value.astimezone(UTC)
        if self.sqlite:
            return int(utc.timestamp() * 1000)
        return utc if self.timestamps_with_tz else utc.replace(tzinfo=None)

    def _insert(
        self,
        table: str,
        fields: Sequence[str],
        rows: Sequence[tuple[Any, ...]],
        returning: str | None = None,
    ) -> list[tuple[Any, ...]]:
        marks = ", ".join("%s" for _ in fields)
        sql = f"INSERT INTO {_q(table)} ({', '.join(map(_q, fields))}) VALUES ({marks})"
        if returning:
            sql += f" RETURNING {_q(returning)}"
        return [r for row in rows for r in self.execute(sql, row)]

    def _bulk(self, table: str, fields: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        columns = ", ".join(map(_q, fields))
        if self.sqlite:
            marks = ", ".join("?" for _ in fields)
            with self._conn:
                self._conn.execute("BEGIN")
                self._conn.executemany(
                    f"INSERT INTO {_q(table)} ({columns}) VALUES ({marks})", rows
                )
            return
        with (
            self._conn.cursor() as cur,
            cur.copy(f"COPY {_q(table)} ({columns}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)


class PgAdapterLoader(AuthjsLoader):
    """@auth/pg-adapter: SERIAL ids, timestamptz, no foreign keys (PostgreSQL only)."""

    flavour = "pg"
    user_table, account_table, session_table = "users", "accounts", "sessions"
    user_fields = ("name", "email", "emailVerified", "image")
    account_fields = _PG_ACCOUNT_FIELDS
    session_fields = ("userId", "expires", "sessionToken")
    timestamps_with_tz = True

    def ddl(self) -> str:
        if self.sqlite:
            raise ValueError("@auth/pg-adapter is PostgreSQL only")
        return PG_ADAPTER_SCHEMA_SQL

    def _with_ids(self, users: list[FakeUser]) -> list[FakeUser]:
        # SERIAL assigned the ids; emails are unique in generated data, so map back by them.
        emails = [u.email for u in users]
        rows = self.execute(
            "SELECT email, id FROM users WHERE email = ANY(%s) ORDER BY id", [emails]
        )
        ids = dict(rows)
        return [replace(u, id=ids[u.email]) for u in users]

    def _update(self, user_id: int | str, assignments: dict[str, Any]) -> None:
        # updateUser reads the row, merges, and writes all four columns back.
        columns = ("name", "email", "emailVerified", "image")
        select = f"SELECT {', '.join(map(_q, columns))} FROM users WHERE id = %s"
        current = dict(zip(columns, self.execute(select, [user_id])[0], strict=True))
        merged = {**current, **assignments}
        super()._update(user_id, merged)

    def delete_user(self, user_id: int | str) -> None:
        # Three statements, no transaction, exactly as the adapter (reference §1a).
        self.execute("delete from users where id = %s", [user_id])
        self.execute('delete from sessions where "userId" = %s', [user_id])
        self.execute('delete from accounts where "userId" = %s', [user_id])


class PrismaLoader(AuthjsLoader):
    """@auth/prisma-adapter: cuid ids and updatedAt written by the Prisma client."""

    flavour = "prisma"
    user_table, account_table, session_table = "User", "Account", "Session"

    user_fields = ("id", "name", "email", "emailVerified", "image")

    def ddl(self) -> str:
        return PRISMA_SQLITE_SQL if self.sqlite else PRISMA_POSTGRES_SQL

    def _new_id(self) -> str:
        return _cuid(self._rng)

    def _stamp_fields(self) -> tuple[str, ...]:
        # The docs' PostgreSQL schema has createdAt/updatedAt; the SQLite test schema not.
        return () if self.sqlite else ("createdAt", "updatedAt")

    def _stamps(self) -> tuple[Any, ...]:
        now = self._value(datetime.now(UTC))
        return () if self.sqlite else (now, now)

    def _update(self, user_id: int | str, assignments: dict[str, Any]) -> None:
        if not self.sqlite:  # @updatedAt is kept by the client, not by the database
            assignments = {**assignments, "updatedAt": self._value(datetime.now(UTC))}
        super()._update(user_id, assignments)


class DrizzleLoader(AuthjsLoader):
    """@auth/drizzle-adapter: uuid ids from crypto.randomUUID(), timestamps without zone."""

    flavour = "drizzle"
    user_table, account_table, session_table = "user", "account", "session"
    user_fields = ("id", "name", "email", "emailVerified", "image")

    def ddl(self) -> str:
        return DRIZZLE_SQLITE_SQL if self.sqlite else DRIZZLE_POSTGRES_SQL

    def _new_id(self) -> str:
        return _uuid(self._rng)


LOADERS: dict[str, type[AuthjsLoader]] = {
    "pg": PgAdapterLoader,
    "prisma": PrismaLoader,
    "drizzle": DrizzleLoader,
}


def make_loader(
    flavour: str, url: str, *, db_schema: str | None = None, create: bool = True
) -> AuthjsLoader:
    """A loader for ``flavour`` on ``url``, with the adapter's schema created by default."""
    loader = LOADERS[flavour](url, db_schema=db_schema)
    if create:
        loader.create_schema()
    return loader


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
