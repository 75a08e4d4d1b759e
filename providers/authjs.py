"""Auth.js adapter: reads users, linked accounts and sessions from the app's own database.

Auth.js is a library, not a service (docs/idp/authjs.md): its users live in tables the app
created for one of the adapters (``providers.authjs_schema`` describes the flavours). This
module reads them over SQL through its own engine, separate from the worker's, which may
point at the same database (the worker's tables live in schema ``identity``, Auth.js's in
``public``).

No default schema has a dependable ``updated_at`` (§1d), so every pull is a full pass in
user-id order (integer SERIAL ids and text cuid/uuid ids alike), and the engine finds changes
by content hash; ``version`` is the UTC time the data was read. On PostgreSQL a pass is one
snapshot, reading users, accounts and live sessions once each, merged by user id; elsewhere
(SQLite) each page is a short read of its users and one ``IN`` query each for their accounts
and sessions. Never a query per user.
On PostgreSQL a pass can also skip the users unchanged since the last pass
(``iter_digested``): the database digests each user's rows, and only the users whose digest
the worker does not hold are read in full and mapped (docs/architecture.md, engine rules).
Each page carries ``{"after_id": "42", "id_type": "int"}`` so a killed pass resumes after
it; the last page is ``complete`` with ``{"completed_at": iso}``, and a pass that resumed
(so saw only part of the users) says ``partial_pass`` there, so nobody
reconciles deletions from it.

Secrets stay in the database: the OAuth token columns of accounts are never selected, and a
session is known downstream only by the SHA-256 of its token.

Auth.js never cleans up expired sessions (§4); ``expired_sessions`` and
``delete_expired_sessions`` do that for the scheduler, in small batches.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import structlog
from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    CursorResult,
    Engine,
    Select,
    Table,
    any_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from db.lookup import among
from providers.authjs_copy import copy_chunks, export_snapshot, join_snapshot
from providers.authjs_digest import digest_query, id_range, sum_query, supported
from providers.authjs_schema import AuthjsTables, build_tables
from providers.authjs_setpass import AuthjsSetPass, position_after
from providers.base import Compared, Cursor, Page, RecordError, StoredDigests
from providers.fields import optional_text
from sync_worker.changes import (
    ChangeKind,
    LinkedIdentity,
    SessionInfo,
    UserAttributes,
    UserChange,
    as_utc,
    parse_timestamp,
    utcnow,
)
from sync_worker.config import PRISMA_URL_PARAMS, AuthjsSettings, authjs_database_url
from sync_worker.digest_sum import DigestSum
from sync_worker.errors import (
    ConfigError,
    ProviderAuthError,
    ProviderError,
    UpstreamDataError,
    UpstreamUnavailable,
)
from sync_worker.readahead import read_merged
from sync_worker.runtime import collector_paused

__all__ = [
    "DEFAULT_SESSION_MAX_AGE",
    "PROVIDER",
    "AuthjsProvider",
    "connection_url",
    "external_id",
    "session_change",
    "session_id",
    "to_change",
]

PROVIDER = "authjs"
#: Auth.js's default ``session.maxAge`` (reference §4): a row's ``expires`` minus this is
#: when Auth.js last wrote it (at sign-in, or when it extended the session).
DEFAULT_SESSION_MAX_AGE = timedelta(days=30)
#: A digest pass's page lists at most this many users (seen), however few it carries.
SEEN_PER_PAGE = 20_000
#: Source digests are compared with the stored ones this many at a time.
DIGEST_CHUNK = 10_000
#: A digest pass holds the ids of at most this many changed users (beyond, it reads every
#: user's rows in step with the digests instead), so its memory stays flat.
CHANGED_HELD = 50_000
#: From this many users on, a pass reads its digests in two halves at once (``_digest_copy``).
SPLIT_AT = 20_000
_MISSING_OBJECT = frozenset({"42P01", "42703", "3F000"})  # undefined table / column / schema
_DENIED = frozenset({"28000", "28P01", "42501"})  # bad login / password / privilege

log = structlog.get_logger(__name__)

#: The user fields an Auth.js users row states: logins come from its sessions instead.
STATED = frozenset({"email", "email_verified", "name", "avatar_url"})


# -- pure mapping ----------------------------------------------------------------------


def to_change(
    row: Mapping[str, Any],
    accounts: Iterable[Mapping[str, Any]] = (),
    *,
    observed_at: datetime,
) -> UserChange:
    """Map one Auth.js user (AdapterUser field names) and its accounts to an upsert.

    ``row`` has ``id``, ``name``, ``email``, ``emailVerified`` and ``image`` (optionally
    ``createdAt``); ``accounts`` items have ``provider`` and ``providerAccountId``.
    ``emailVerified`` may be a datetime, an ISO string, epoch milliseconds (SQLite) or a
    boolean (custom schemas). Raises ValueError for a record that cannot be mapped; messages
    name the field and type, never the value, which may be personal data.
    """
    user_id = external_id(row.get("id"))
    verified, verified_raw = _verified(row.get("emailVerified"))
    created_at = _timestamp("createdAt", row.get("createdAt"))
    pairs = sorted({_account(a) for a in accounts})
    attributes = UserAttributes(
        email=optional_text(row, "email"),
        email_verified=verified,
        name=optional_text(row, "name"),
        avatar_url=optional_text(row, "image"),
        created_at=created_at,
        stated=STATED,
    )
    raw: dict[str, Any] = {
        "id": user_id,
        "name": attributes.name,
        "email": attributes.email,
        "emailVerified": verified_raw,
        "image": attributes.avatar_url,
        "accounts": [{"provider": p, "providerAccountId": a} for p, a in pairs],
    }
    if created_at is not None:
        raw["createdAt"] = created_at.isoformat()
    return UserChange(
        provider=PROVIDER,
        external_id=user_id,
        kind=ChangeKind.UPSERT,
        version=as_utc(observed_at),
        attributes=attributes,
        linked=tuple(LinkedIdentity(provider=f"{PROVIDER}:{p}", external_id=a) for p, a in pairs),
        raw=raw,
    )


def session_change(
    session: Mapping[str, Any],
    *,
    observed_at: datetime,
    max_age: timedelta = DEFAULT_SESSION_MAX_AGE,
) -> UserChange:
    """Map one sessions row (``userId``, ``sessionToken``, ``expires``) to a LOGIN change.

    The token is a bearer credential: only its SHA-256 leaves this function. Auth.js keeps
    no sign-in time (unless a schema adds ``createdAt``), so the last time Auth.js wrote the
    row, ``expires - max_age``, stands in for it; it stays put from pass to pass and moves
    only when Auth.js extends the session, i.e. when the user was active.
    """
    user_id = external_id(session.get("userId"))
    token = session.get("sessionToken")
    if not isinstance(token, str) or not token:
        raise ValueError(f"sessionToken: expected a non-empty string, got {type(token).__name__}")
    expires = _timestamp("expires", session.get("expires"))
    if expires is None:
        raise ValueError("expires: missing")
    observed = as_utc(observed_at)
    assert observed is not None
    written = min(expires - max_age, observed)
    sid = session_id(token)
    return UserChange(
        provider=PROVIDER,
        external_id=user_id,
        kind=ChangeKind.LOGIN,
        version=observed,
        session=SessionInfo(
            external_session_id=sid,
            created_at=_timestamp("createdAt", session.get("createdAt")) or written,
            last_seen_at=written,
            expires_at=expires,
        ),
        raw={"userId": user_id, "sessionId": sid, "expires": expires.isoformat()},
    )


def session_id(token: str) -> str:
    """The stable, non-secret id of a session: the SHA-256 hex of its token."""
    return hashlib.sha256(token.encode()).hexdigest()


def external_id(value: object) -> str:
    """A user id as the worker stores it: SERIAL integers and text ids both become text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"id: expected an integer or a non-empty string, got {type(value).__name__}")


def _timestamp(key: str, value: object) -> datetime | None:
    try:
        return parse_timestamp(value)
    except (ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"{key}: not a timestamp ({type(value).__name__})") from exc


def _verified(value: object) -> tuple[bool, bool | str | None]:
    """(verified flag, its canonical form for ``raw``): a timestamp means verified then."""
    if isinstance(value, bool):
        return value, value
    when = _timestamp("emailVerified", value)
    return when is not None, when.isoformat() if when else None


def _account(account: Mapping[str, Any]) -> tuple[str, str]:
    provider = account.get("provider")
    if not isinstance(provider, str) or not provider:
        raise ValueError(f"account provider: expected a string, got {type(provider).__name__}")
    account_id = account.get("providerAccountId")
    if isinstance(account_id, int) and not isinstance(account_id, bool):
        account_id = str(account_id)  # numeric ids (GitHub's) in a custom integer column
    if not isinstance(account_id, str) or not account_id:
        raise ValueError(f"account {provider}: providerAccountId missing")
    return provider, account_id


# -- connection ------------------------------------------------------------------------


def connection_url(database_url: str) -> tuple[URL, str | None]:
    """The SQLAlchemy URL (PostgreSQL via psycopg 3) and the schema a Prisma URL names.

    Apps keep Prisma's ``DATABASE_URL`` (``...?schema=public&connection_limit=5``); libpq
    rejects those parameters, so they are dropped, and ``schema`` is returned instead.
    """
    url = make_url(authjs_database_url(database_url))  # ConfigError for a bad one
    if url.get_backend_name() != "postgresql":
        return url, None
    schema = url.query.get("schema")
    url_schema = schema if isinstance(schema, str) and schema else None
    return url.difference_update_query(PRISMA_URL_PARAMS), url_schema


def _make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=True)


def _sqlite_engine(url: URL) -> Engine:
    """The app's SQLite file, opened only if it exists (SQLite would create an empty one)."""
    engine = create_engine(url)
    path = url.database or ""
    if path in ("", ":memory:") or path.startswith("file:") or url.query.get("uri"):
        return engine

    @event.listens_for(engine, "do_connect")
    def _existing_file_only(_dialect: Any, _record: Any, cargs: list[Any], cparams: Any) -> None:
        cargs[0] = f"file:{quote(cargs[0])}?mode=rw"
        cparams["uri"] = True

    return engine


def _translate(err: sa_exc.SQLAlchemyError) -> ProviderError | ConfigError:
    """One SQLAlchemy/driver error as this project's error, with a one-line message."""
    orig = getattr(err, "orig", None)
    state = getattr(orig, "sqlstate", None)
    message = (str(orig) if orig is not None else str(err)).strip().splitlines()[0]
    if state in _MISSING_OBJECT or "no such table" in message or "no such column" in message:
        # Wrong flavour, schema or override names: the operator must fix the configuration.
        return ConfigError(f"providers.authjs: {message}")
    if state in _DENIED:
        return ProviderAuthError(f"authjs: database refused access: {message}")
    if isinstance(err, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return UpstreamUnavailable(f"authjs: database unavailable: {message}")
    return UpstreamDataError(f"authjs: database error: {message}")


@contextmanager
def _db_errors() -> Iterator[None]:
    try:
        yield
    except sa_exc.SQLAlchemyError as err:
        raise _translate(err) from err


# -- the adapter -----------------------------------------------------------------------


class AuthjsProvider:
    """Pulls Auth.js users over SQL (see the module docstring)."""

    name = PROVIDER

    def __init__(
        self,
        settings: AuthjsSettings,
        *,
        engine: Engine | None = None,
        batch_size: int | None = None,
        now: Callable[[], datetime] = utcnow,
        session_max_age: timedelta = DEFAULT_SESSION_MAX_AGE,
        include_expired_sessions: bool = False,
    ) -> None:
        """``engine`` (else one is opened from ``settings.database_url`` and owned here).

        ``batch_size`` users per page (default ``settings.page_size``). Sessions already
        expired are left out of the changes unless ``include_expired_sessions``: Auth.js
        leaves them behind by the thousand and they say nothing about current logins.
        """
        url, url_schema = (
            connection_url(settings.database_url) if settings.database_url else (None, None)
        )
        self._owns_engine = engine is None
        if engine is None:
            if url is None:
                raise ConfigError("providers.authjs.database_url is required to pull from Auth.js")
            engine = _make_engine(url)
        self._engine = engine
        default_schema = "public" if self._engine.dialect.name == "postgresql" else None
        schema = settings.db_schema or url_schema or default_schema
        self._tables: AuthjsTables = build_tables(settings, schema=schema)
        self._batch_size = max(1, batch_size or settings.page_size)
        self._now = now
        self._max_age = session_max_age
        self._expired_too = include_expired_sessions

    # -- Provider protocol -------------------------------------------------------------

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        """A full pass over the users in id order, resuming after ``cursor["after_id"]``.

        A ``completed_at`` cursor (the previous pass finished) starts a new pass: there is
        no change feed to follow. ``full`` only means "ignore a resume position".
        """
        after = None if full or cursor is None else self._resume_point(cursor)
        partial = after is not None
        streamed = self._engine.dialect.name == "postgresql"
        chunks = self._streamed(after) if streamed else self._paged(after)
        while True:
            # A page's rows and changes all live until it is applied: no collections.
            with collector_paused():
                chunk = next(chunks, None)
                page = None if chunk is None else self._page(chunk, partial=partial)
            if page is None:
                return
            yield page

    def cursor_since(self, since: datetime) -> Cursor | None:
        return None  # no change log: every pull lists all users

    def iter_digested(
        self,
        cursor: Cursor | None,
        *,
        full: bool = False,
        known: StoredDigests,
    ) -> Iterator[Page] | None:
        """A pass that maps only the users whose source digest differs from ``known``'s.

        PostgreSQL only (None elsewhere). In one snapshot, the database computes
        ``(id, digest)`` of every user over everything the mapping reads
        (``_digest_query``), handed as COPY bytes to ``known.compare`` (the worker compares
        them and records every id as seen: ``_digest_copy``), or, where the store does not
        compare, streamed and merged with the stored ones (streamed in the same order);
        then the rows of the changed users alone are read, each table once, merged as in
        ``_streamed``. Where nothing is stored yet (the first pass), or more users changed
        than ``CHANGED_HELD`` (whose ids this would hold), the digests are instead read in
        step with every user's rows. Either way memory stays flat in the number of users.
        Pages follow the users in id order like ``iter_changes``' (cursor, resume,
        ``complete``, ``partial_pass``), list every user in ``seen_ids`` (unless the store
        recorded them) and carry the changes and ``digests`` of the changed ones.
        """
        if not self._digests_supported():
            return None
        after = None if full or cursor is None else self._resume_point(cursor)
        return self._digested(after, known, partial=after is not None)

    def set_pass(self, cursor: Cursor | None, *, full: bool = False) -> AuthjsSetPass | None:
        """The source side of a set-based full pass (``providers.authjs_setpass``), not yet
        opened: PostgreSQL only (None elsewhere). Its relations are the queries
        ``iter_digested`` reads (the users with their position, accounts, live sessions,
        digests), all in the one snapshot it opens."""
        if not self._digests_supported():
            return None
        after = None if full or cursor is None else self._resume_point(cursor)
        observed = self._now()
        key = self._user.c.id
        user_labels = ["id", "name", "email", "email_verified", "image"]
        if self._tables.has("user", "created_at"):
            user_labels.append("created_at")
        session_labels = ["uid", "token", "expires"]
        if self._tables.has("session", "created_at"):
            session_labels.append("created_at")
        ranged = self._tables.flavour.integer_ids

        def queries(
            start: Any, upto: Any, offset: int
        ) -> list[tuple[str, Sequence[str], Select[Any]]]:
            """The users after ``start`` up to ``upto`` (None: to the end), numbered from
            ``offset + 1``, with their accounts, live sessions and digests."""
            upto_ = id_range(key, None, upto)
            users = self._users_after(start).where(*upto_)
            users = users.add_columns(position_after(key, offset).label("ord"))
            return [
                ("users", [*user_labels, "ord"], users.order_by(key)),
                ("accounts", ["uid", "provider", "acct"],
                 self._account_rows(key, start).where(*upto_)),
                ("sessions", session_labels,
                 self._session_rows(key, start, observed).where(*upto_)),
                ("digests", ["uid", "digest", "n"],
                 self._digest_query(start, observed, upto=upto if ranged else None)),
            ]  # fmt: skip

        ids = select(key.label("id"))
        if after is not None:
            ids = ids.where(key > after)
        return AuthjsSetPass(
            reading=self._reading(),
            queries=queries,
            ids=ids,
            after=after,
            ranged=ranged,
            observed=observed,
            partial=after is not None,
            max_age_seconds=self._max_age.total_seconds(),
            mapper=self._map,
            cursor_after=lambda e: _cursor_after(self._key(e)),
            batch_size=self._batch_size,
            seen_per_page=SEEN_PER_PAGE,
        )

    def fetch_user(self, external_id: str) -> UserChange | None:
        """The user by primary key, with linked accounts; None if there is no such row."""
        key = self._key(external_id)
        if key is None:
            return None
        with self._reading() as conn:
            observed = self._now()
            rows = _fetch(conn, self._user_query().where(self._user.c.id == key))
            if not rows:
                return None
            accounts = self._accounts(conn, [key])
        try:
            return to_change(rows[0], accounts.get(str(key), ()), observed_at=observed)
        except (ValueError, TypeError) as exc:
            raise UpstreamDataError(f"authjs: user {external_id}: {exc}") from exc

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()

    # -- session cleanup ---------------------------------------------------------------

    def expired_sessions(self, now: datetime) -> int:
        """How many session rows expired before ``now``."""
        session = self._tables.session
        query = select(func.count()).select_from(session).where(session.c.expires < now)
        with self._reading() as conn:
            return int(conn.execute(query).scalar_one())

    def delete_expired_sessions(self, now: datetime, limit: int | None = None) -> int:
        """Delete up to ``limit`` (default: all) expired rows, a batch per transaction.

        Small batches keep locks short on a table Auth.js writes at every sign-in.
        """
        deleted = 0
        while limit is None or deleted < limit:
            size = self._batch_size if limit is None else min(self._batch_size, limit - deleted)
            count = self._delete_batch(now, size)
            deleted += count
            if count < size:
                break
        return deleted

    # -- reading -----------------------------------------------------------------------

    @property
    def _user(self) -> Table:
        return self._tables.user

    def _streamed(self, after: int | str | None) -> Iterator[_Chunk]:
        """PostgreSQL: the pass reads one snapshot, each table once, in user-id order.

        Users, their accounts and their live sessions come from three server-side cursors,
        all ordered by the users' own id, and are merged by equal ids. Without an index on
        ``"userId"`` (none of the adapters creates one) a per-page ``IN`` query scanned both
        tables for every page, which grew with the square of the users. MVCC keeps this
        long read from blocking the app's writes.
        """
        size = self._batch_size
        with self._reading() as conn, ExitStack() as cursors:
            observed = self._now()
            stream = conn.execution_options(yield_per=size)

            def opened(query: Select[Any]) -> Iterator[dict[str, Any]]:
                result = stream.execute(query)
                cursors.callback(result.close)  # a pass closed early closes its cursors first
                return _dicts(result)

            total: int | None = self._count_after(conn, after)  # in the pass's snapshot
            key = self._user.c.id
            users = opened(self._users_after(after).order_by(key))
            accounts = _Follower(opened(self._account_rows(key, after)))
            sessions = _Follower(opened(self._session_rows(key, after, observed)))
            for rows, last in _pages(users, size):
                entries = [
                    (row, accounts.take(row["id"]), sessions.take(row["id"])) for row in rows
                ]
                if last and not (accounts.drained and sessions.drained):
                    # Equal ids sort alike in one snapshot; this would take a collation under
                    # which distinct ids compare equal. Fail rather than drop links.
                    raise UpstreamDataError(
                        "authjs: accounts or sessions did not come in the users' id order"
                    )
                yield _Chunk(entries=entries, observed=observed, last=last, total=total)
                total = None  # stated on the first page only

    def _digested(
        self, after: int | str | None, known: StoredDigests, *, partial: bool
    ) -> Iterator[Page]:
        with self._reading() as conn, ExitStack() as cursors:
            observed = self._now()
            stream = conn.execution_options(yield_per=DIGEST_CHUNK)

            def opened(query: Select[Any]) -> CursorResult[Any]:
                result = stream.execute(query)
                cursors.callback(result.close)  # a pass closed early closes its cursors first
                return result

            changed: dict[Any, str] | None = None
            skipped_sessions = 0
            if known.held():
                compared = None
                if after is None:  # a whole pass: first the source's total alone
                    compared = known.unchanged(lambda: self._digest_sum(conn, observed))
                if compared is None:
                    digests = self._digest_copy(conn, after, observed)
                    try:
                        compared = known.compare(digests, limit=CHANGED_HELD)
                    finally:  # its readers stop before ``conn`` is closed, whatever happened
                        digests.close()
                if compared is not None and compared.changed is not None:
                    # Compared, and every id recorded as seen, by the worker.
                    keyed = {self._stored_key(e): d for e, d in compared.changed.items()}
                    pages = self._compared_pages(
                        conn, opened, keyed, compared=compared, after=after,
                        observed=observed, partial=partial,
                    )  # fmt: skip
                    first = next(pages)
                    yield replace(first, total=compared.users)
                    yield from pages
                    return
                if compared is None:  # the store does not compare: merge in id order here
                    changed, skipped_sessions = self._merged(opened, after, observed, known)
            total = self._count_after(conn, after)  # in the pass's snapshot
            if changed is None:
                items = self._in_step(opened, after, observed, known)
            else:
                items = self._filtered(opened, changed, after, observed)
            pages = self._digest_pages(items, observed, skipped_sessions, partial=partial)
            first = next(pages)
            yield replace(first, total=total)
            yield from pages

    def _merged(
        self,
        opened: Callable[[Select[Any]], CursorResult[Any]],
        after: int | str | None,
        observed: datetime,
        known: StoredDigests,
    ) -> tuple[dict[Any, str] | None, int]:
        """``_changed`` over the digests and the stored ones, both streamed in id order."""
        numeric = self._tables.flavour.integer_ids
        digests = opened(self._digest_query(after, observed, bytewise=not numeric))
        stored = known.in_order(numeric=numeric)
        try:
            return _changed(digests, stored, numeric=numeric)
        finally:
            close = getattr(stored, "close", None)  # a generator: end its read
            if close is not None:
                close()

    def _digest_sum(self, conn: Connection, observed: datetime) -> DigestSum:
        """Every user's digest totalled by the source (``authjs_digest.sum_query``): one
        scan of each table, no grouping by user, one row back."""
        query = sum_query(
            self._tables, observed=observed, max_age=self._max_age, expired_too=self._expired_too
        )
        with _db_errors():
            users, total, sessions = conn.execute(query).one()
        return DigestSum(users=int(users), total=int(total), sessions=int(sessions))

    def _digest_copy(
        self, conn: Connection, after: int | str | None, observed: datetime
    ) -> Generator[bytes, None, None]:
        """The digest query's rows as COPY text, in no particular order (the store compares
        by id), read once iterated. With integer ids and enough users, in two halves by id
        range, read at once on two connections in the pass's snapshot: PostgreSQL runs each
        query on one backend, and this one costs the pass most (a sort by user, hashes,
        sums)."""
        count, middle = self._middle(conn, after)
        plain = (self._tables.flavour.integer_ids, True, True)  # id, a decimal digest, an integer
        if middle is None:
            query = self._digest_query(after, observed, ordered=False)
            yield from copy_chunks(conn, query, rows=count, plain=plain)
            return
        snapshot = export_snapshot(conn)
        half = count // 2 + 1

        def upper() -> Iterator[bytes]:
            with self._reading() as other:
                join_snapshot(other, snapshot)
                query = self._digest_query(middle, observed, ordered=False)
                yield from copy_chunks(other, query, rows=count - half, plain=plain)

        query = self._digest_query(after, observed, upto=middle, ordered=False)
        lower = copy_chunks(conn, query, rows=half, plain=plain)
        yield from read_merged([lower, upper()])

    def _middle(self, conn: Connection, after: int | str | None) -> tuple[int, int | None]:
        """How many users come after ``after``, and the integer id that splits them in
        halves: None for text ids (the halves' account and session filters compare ids,
        safe only as integers) or too few users to pay for a second connection."""
        key = self._user.c.id
        ids = select(key).select_from(self._user)
        if after is not None:
            ids = ids.where(key > after)
        count = int(conn.execute(select(func.count()).select_from(ids.subquery())).scalar_one())
        if not self._tables.flavour.integer_ids or count < SPLIT_AT:
            return count, None
        found = conn.execute(ids.order_by(key).offset(count // 2).limit(1)).scalar()
        return count, None if found is None else int(found)

    def _stored_key(self, external_id: str) -> int | str:
        key = self._key(external_id)
        if key is None:  # the store handed back an id this source could not have sent
            raise UpstreamDataError(f"authjs: unexpected user id {external_id!r}")
        return key

    def _in_step(
        self,
        opened: Callable[[Select[Any]], CursorResult[Any]],
        after: int | str | None,
        observed: datetime,
        known: StoredDigests,
    ) -> Iterator[_Item]:
        """Every user's digest in step with its rows (all read), chunk by chunk."""
        digests = opened(self._digest_query(after, observed))
        key = self._user.c.id
        users = _dicts(opened(self._users_after(after).order_by(key)))
        accounts = _Follower(_dicts(opened(self._account_rows(key, after))))
        sessions = _Follower(_dicts(opened(self._session_rows(key, after, observed))))
        held = known.held()
        for chunk in digests.partitions():
            stored = known.of([str(r[0]) for r in chunk]) if held else {}
            for user_id, digest, count in map(tuple, chunk):
                row = next(users, None)
                if row is None or row["id"] != user_id:
                    raise UpstreamDataError("authjs: users did not come in their digests' order")
                entry = (row, accounts.take(user_id), sessions.take(user_id))
                if stored.get(str(user_id)) == digest:
                    yield user_id, None, count, None
                else:
                    yield user_id, digest, 0, entry

    def _filtered(
        self,
        opened: Callable[[Select[Any]], CursorResult[Any]],
        changed: dict[Any, str],
        after: int | str | None,
        observed: datetime,
    ) -> Iterator[_Item]:
        """Every user's id, with the rows of the ``changed`` ones."""
        key = self._user.c.id
        query = select(key).select_from(self._user).order_by(key)
        ids = opened(query if after is None else query.where(key > after)).scalars()
        entries = self._entries_of(opened, list(changed), after=after, observed=observed)
        for user_id in ids:
            digest = changed.get(user_id)
            if digest is None:
                yield user_id, None, 0, None
                continue
            entry = next(entries, None)
            if entry is None or entry[0]["id"] != user_id:
                raise UpstreamDataError("authjs: users did not come in their digests' order")
            yield user_id, digest, 0, entry

    def _compared_pages(
        self,
        conn: Connection,
        opened: Callable[[Select[Any]], CursorResult[Any]],
        changed: dict[Any, str],
        *,
        compared: Compared,
        after: int | str | None,
        observed: datetime,
        partial: bool,
    ) -> Iterator[Page]:
        """The pages ``_digest_pages`` would make, for a pass the worker compared: cut at
        ``batch_size`` changed users or ``SEEN_PER_PAGE`` users, each with its cursor; only
        the changed users' rows are read, and no page lists ids (the worker recorded them).
        A page of unchanged users only, but the last, is left out (its counts go with the
        next page): it would write a cursor alone, and a pass resumed from the one before
        compares those users again for free. Where a page ends at an unchanged user, its
        id (for the cursor) is asked of the source, by a short index scan from the
        previous page's end."""
        positions = self._positions(conn, list(changed), after)
        entries = self._entries_of(
            opened, [k for _, k in positions], after=after, observed=observed
        )
        total, size = compared.users, self._batch_size
        lo, taken = 1, 0
        before: object = after
        sessions = compared.skipped_sessions  # counted on the first page, as the merge does
        start, unchanged = lo, 0  # the yielded page's first position; users left out since
        while True:
            end = min(total, lo + SEEN_PER_PAGE - 1)
            if taken + size <= len(positions):
                end = min(end, positions[taken + size - 1][0])
            held: list[_Entry] = []
            while taken < len(positions) and positions[taken][0] <= end:
                entry = next(entries, None)
                if entry is None or entry[0]["id"] != positions[taken][1]:
                    raise UpstreamDataError("authjs: users did not come in their digests' order")
                held.append(entry)
                taken += 1
            last = end >= total
            unchanged += max(0, end - lo + 1) - len(held)
            if not held and not last:
                lo = end + 1
                continue
            if last or (held and positions[taken - 1][0] == end):
                at_end: object = held[-1][0]["id"] if held else before
            else:
                at_end = self._id_at(conn, before, end - start)
            digests = {str(e[0]["id"]): changed[e[0]["id"]] for e in held}
            with collector_paused():
                page = self._digest_page(
                    held, [], digests, observed, after=at_end, last=last, partial=partial
                )
            yield replace(page, skipped=(unchanged, sessions))
            if last:
                return
            lo = start = end + 1
            before, sessions, unchanged = at_end, 0, 0

    def _positions(
        self, conn: Connection, keys: Sequence[Any], after: int | str | None
    ) -> list[tuple[int, Any]]:
        """``(position in the pass, id)`` of the users ``keys``, in id order: one numbered
        scan of the users' ids (their primary key's index), only when some changed."""
        if not keys:
            return []
        key = self._user.c.id
        numbered = select(key.label("id"), func.row_number().over(order_by=key).label("pos"))
        if after is not None:
            numbered = numbered.where(key > after)
        users = numbered.subquery("numbered")
        wanted = bindparam("keys", list(keys), type_=ARRAY(key.type))
        query = select(users.c.pos, users.c.id).where(users.c.id == any_(wanted))
        found = [(int(pos), user_id) for pos, user_id in conn.execute(query.order_by(users.c.pos))]
        if len(found) != len(keys):
            raise UpstreamDataError("authjs: the worker named users this snapshot does not hold")
        return found

    def _id_at(self, conn: Connection, before: object, offset: int) -> object:
        """The id ``offset`` users after ``before`` (None: from the first user)."""
        key = self._user.c.id
        query = select(key).select_from(self._user).order_by(key).offset(offset).limit(1)
        if before is not None:
            query = query.where(key > before)
        found = conn.execute(query).scalar()
        if found is None:
            raise UpstreamDataError("authjs: fewer users than the pass counted")
        return found

    def _digest_pages(
        self, items: Iterator[_Item], observed: datetime, skipped_sessions: int, *, partial: bool
    ) -> Iterator[Page]:
        """Pages of at most ``batch_size`` changed users and ``SEEN_PER_PAGE`` users."""
        size = self._batch_size
        seen: list[str] = []
        held: list[_Entry] = []
        held_digests: dict[str, str] = {}
        skipped = [0, skipped_sessions]
        item = next(items, None)
        while True:
            if item is not None:
                user_id, digest, sessions, entry = item
                seen.append(str(user_id))
                if entry is None or digest is None:
                    skipped[0] += 1
                    skipped[1] += sessions
                else:
                    held.append(entry)
                    held_digests[str(user_id)] = digest
                item = next(items, None)
            last = item is None
            if last or len(held) == size or len(seen) >= SEEN_PER_PAGE:
                after = self._key(seen[-1]) if seen else None
                with collector_paused():
                    page = self._digest_page(
                        held, seen, held_digests, observed, after=after, last=last,
                        partial=partial,
                    )  # fmt: skip
                yield replace(page, skipped=(skipped[0], skipped[1]))
                seen, held, held_digests, skipped = [], [], {}, [0, 0]
                if last:
                    return

    def _digest_page(
        self,
        entries: list[_Entry],
        seen: list[str],
        digests: dict[str, str],
        observed: datetime,
        *,
        after: object,
        last: bool,
        partial: bool,
    ) -> Page:
        changes, errors = self._map(entries, observed)
        if not last:
            return Page(
                changes=changes,
                cursor=_cursor_after(after),
                errors=errors,
                seen_ids=tuple(seen),
                digests=digests,
            )
        log.info("authjs_pass_complete", provider=PROVIDER, digested=True)
        return Page(
            changes=changes,
            cursor={"completed_at": observed.isoformat()},
            errors=errors,
            seen_ids=tuple(seen),
            complete=True,
            partial_pass=partial,
            digests=digests,
        )

    def _entries_of(
        self,
        opened: Callable[[Select[Any]], CursorResult[Any]],
        keys: Sequence[Any],
        *,
        after: int | str | None,
        observed: datetime,
    ) -> Iterator[_Entry]:
        """The rows of the users ``keys`` (in id order), each table read once: the users by
        primary key, accounts and sessions by a join against those (no adapter indexes
        ``"userId"``, so per-page lookups would scan them once per page)."""
        if not keys:
            return iter(())
        key = self._user.c.id
        ids = bindparam("ids", list(keys), type_=ARRAY(key.type))

        def rows(query: Select[Any]) -> Iterator[dict[str, Any]]:
            return _dicts(opened(query.where(key == any_(ids))))

        users = rows(self._users_after(after).order_by(key))
        accounts = _Follower(rows(self._account_rows(key, after)))
        sessions = _Follower(rows(self._session_rows(key, after, observed)))
        return ((row, accounts.take(row["id"]), sessions.take(row["id"])) for row in users)

    def _digest_query(
        self,
        after: int | str | None,
        observed: datetime,
        *,
        bytewise: bool = False,
        upto: int | None = None,
        ordered: bool = True,
    ) -> Select[Any]:
        """``(id, digest, live sessions)`` of every user after ``after`` (up to ``upto``), in
        id order unless not ``ordered``: ``providers.authjs_digest`` defines the digest."""
        return digest_query(
            self._tables,
            observed=observed,
            max_age=self._max_age,
            expired_too=self._expired_too,
            after=after,
            upto=upto,
            bytewise=bytewise,
            ordered=ordered,
        )

    def _paged(self, after: int | str | None) -> Iterator[_Chunk]:
        """Other databases (SQLite): a short read per page, so that no read stays open
        while the engine works; on SQLite an open read would block the app's writers."""
        total: int | None = None
        first = True
        while True:
            with self._reading() as conn:
                observed = self._now()
                if first:
                    total, first = self._count_after(conn, after), False
                # One row more than a page tells whether this page is the last.
                query = self._users_after(after).order_by(self._user.c.id)
                rows = _fetch(conn, query.limit(self._batch_size + 1))
                more = len(rows) > self._batch_size
                rows = rows[: self._batch_size]
                ids = [row["id"] for row in rows]
                accounts = self._accounts(conn, ids) if ids else {}
                sessions = self._sessions(conn, ids, observed) if ids else {}
            entries = [
                (row, accounts.get(str(row["id"]), []), sessions.get(str(row["id"]), []))
                for row in rows
            ]
            yield _Chunk(entries=entries, observed=observed, last=not more, total=total)
            if not more:
                return
            after, total = ids[-1], None

    def _page(self, chunk: _Chunk, *, partial: bool) -> Page:
        changes, errors = self._map(chunk.entries, chunk.observed)
        seen = tuple(str(row["id"]) for row, _, _ in chunk.entries)
        if not chunk.last:
            cursor = _cursor_after(chunk.entries[-1][0]["id"])
            return Page(
                changes=changes, cursor=cursor, errors=errors, seen_ids=seen, total=chunk.total
            )
        log.info("authjs_pass_complete", provider=PROVIDER, partial=partial)
        return Page(
            changes=changes,
            cursor={"completed_at": chunk.observed.isoformat()},
            errors=errors,
            seen_ids=seen,
            complete=True,
            partial_pass=partial,
            total=chunk.total,
        )

    def _user_query(self) -> Select[Any]:
        user = self._user
        columns = [
            user.c.id.label("id"),
            user.c.name.label("name"),
            user.c.email.label("email"),
            user.c.email_verified.label("emailVerified"),
            user.c.image.label("image"),
        ]
        if self._tables.has("user", "created_at"):
            columns.append(user.c.created_at.label("createdAt"))
        return select(*columns)

    def _count_after(self, conn: Connection, after: int | str | None) -> int:
        """How many users the pass will list: one count, for the progress bar's total."""
        query = select(func.count()).select_from(self._user)
        if after is not None:
            query = query.where(self._user.c.id > after)
        return int(conn.execute(query).scalar_one())

    def _users_after(self, after: int | str | None) -> Select[Any]:
        query = self._user_query()
        return query if after is None else query.where(self._user.c.id > after)

    def _accounts(self, conn: Connection, ids: Sequence[Any]) -> dict[str, list[dict[str, Any]]]:
        """Accounts of these users."""
        user_id = self._tables.account.c.user_id
        return _group(_fetch(conn, self._account_rows(user_id).where(among(conn, user_id, ids))))

    def _sessions(
        self, conn: Connection, ids: Sequence[Any], now: datetime
    ) -> dict[str, list[dict[str, Any]]]:
        """Live (or, if configured, all) sessions of these users."""
        user_id = self._tables.session.c.user_id
        query = self._session_rows(user_id, None, now).where(among(conn, user_id, ids))
        return _group(_fetch(conn, query))

    def _account_rows(self, key: ColumnElement[Any], after: object = None) -> Select[Any]:
        """Accounts keyed by ``key`` as ``userId``, in key order; the token columns are never
        selected. A key of the users table joins them, so only users' accounts come back."""
        account = self._tables.account
        query = select(
            key.label("userId"),
            account.c.provider.label("provider"),
            account.c.provider_account_id.label("providerAccountId"),
        ).order_by(key, account.c.provider, account.c.provider_account_id)
        return self._keyed(query, account, key, after)

    def _session_rows(self, key: ColumnElement[Any], after: object, now: datetime) -> Select[Any]:
        session = self._tables.session
        columns = [
            key.label("userId"),
            session.c.session_token.label("sessionToken"),
            session.c.expires.label("expires"),
        ]
        if self._tables.has("session", "created_at"):
            columns.append(session.c.created_at.label("createdAt"))
        # The token breaks ties: a user's logins are applied in this order, and which of
        # two equally old sessions moves the last login shows in their audit rows.
        query = select(*columns).order_by(key, session.c.expires, session.c.session_token)
        if not self._expired_too:
            query = query.where(session.c.expires >= now)
        return self._keyed(query, session, key, after)

    def _keyed(
        self, query: Select[Any], table: Table, key: ColumnElement[Any], after: object
    ) -> Select[Any]:
        user = self._user
        if key is user.c.id:
            query = query.select_from(user.join(table, table.c.user_id == user.c.id))
        return query if after is None else query.where(key > after)

    def _map(
        self, entries: Sequence[_Entry], observed: datetime
    ) -> tuple[tuple[UserChange, ...], tuple[RecordError, ...]]:
        """Each user's upsert, then its logins; a bad row is isolated, the rest proceeds."""
        changes: list[UserChange] = []
        errors: list[RecordError] = []
        for row, accounts, sessions in entries:
            key = str(row["id"])
            try:
                changes.append(to_change(row, accounts, observed_at=observed))
            except (ValueError, TypeError) as exc:
                errors.append(_record_error(key, str(exc), _jsonable(row)))
                continue
            for session in sessions:
                try:
                    changes.append(self._login(session, observed))
                except (ValueError, TypeError) as exc:
                    errors.append(_record_error(key, f"session: {exc}", None))
        return tuple(changes), tuple(errors)

    def _login(self, session: Mapping[str, Any], observed: datetime) -> UserChange:
        return session_change(session, observed_at=observed, max_age=self._max_age)

    def _delete_batch(self, now: datetime, size: int) -> int:
        session = self._tables.session
        expired = session.c.expires < now
        batch = select(session.c.session_token).where(expired).limit(size)
        # ``expired`` again: pg-adapter tokens are not UNIQUE, so a live twin must survive.
        statement = delete(session).where(session.c.session_token.in_(batch), expired)
        with _db_errors(), self._engine.begin() as conn:
            return int(conn.execute(statement).rowcount)

    def _digests_supported(self) -> bool:
        """Whether the source computes digests (``authjs_digest.supported``): PostgreSQL 14
        or later, which the dialect knows once it has connected."""
        dialect = self._engine.dialect
        if dialect.name != "postgresql":
            return False
        if dialect.server_version_info is None:
            with _db_errors(), self._engine.connect():
                pass  # the pool keeps the connection for the pass
        if supported(dialect):
            return True
        version = dialect.server_version_info
        log.info("authjs_digests_unsupported", provider=PROVIDER, server=version)
        return False

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection whose reads see one snapshot (PostgreSQL), so a page is consistent."""
        options: dict[str, Any] = {}
        if self._engine.dialect.name == "postgresql":
            options = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
        with _db_errors(), self._engine.connect() as conn:
            yield conn.execution_options(**options) if options else conn

    # -- ids and cursors ---------------------------------------------------------------

    def _key(self, external_id: str) -> int | str | None:
        if not self._tables.flavour.integer_ids:
            return external_id or None
        if external_id.isascii() and external_id.isdigit():
            return int(external_id)
        return None

    def _resume_point(self, cursor: Cursor) -> int | str | None:
        after, id_type = cursor.get("after_id"), cursor.get("id_type")
        if after is None:
            return None  # the previous pass completed: start the next one from the top
        want = "int" if self._tables.flavour.integer_ids else "str"
        if id_type == want and isinstance(after, str):
            key = self._key(after)
            if key is not None:
                return key
        log.warning("authjs_cursor_ignored", provider=PROVIDER, id_type=id_type, expected=want)
        return None


def _cursor_after(last: object) -> dict[str, str]:
    # The type tag keeps integer ids comparing as integers: "10" < "9" as text.
    id_type = "int" if isinstance(last, int) and not isinstance(last, bool) else "str"
    return {"after_id": str(last), "id_type": id_type}


def _fetch(conn: Connection, query: Select[Any]) -> list[dict[str, Any]]:
    return list(_dicts(conn.execute(query)))


def _dicts(result: CursorResult[Any]) -> Iterator[dict[str, Any]]:
    keys = list(map(str, result.keys()))
    # zip over plain rows: a RowMapping per row cost as much as mapping the user.
    return (dict(zip(keys, row, strict=True)) for row in result)


_Entry = tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]
#: A user of a digest pass: (id, digest if changed, live sessions if skipped, rows if changed).
_Item = tuple[Any, str | None, int, _Entry | None]


def _changed(
    digests: CursorResult[Any], stored: Iterator[tuple[str, str]], *, numeric: bool
) -> tuple[dict[Any, str] | None, int]:
    """(the changed users' ``{id: digest}``, the skipped users' live sessions), or
    (None, 0) once more than ``CHANGED_HELD`` users changed.

    A merge of two streams in the same order (``StoredDigests.in_order``), so neither is
    held. Should the orders differ, stored digests are passed over unmatched: their users
    count as changed and are read again, never skipped by mistake.
    """

    def order(external_id: str) -> tuple[int, str]:
        return (len(external_id) if numeric else 0, external_id)

    changed: dict[Any, str] = {}
    skipped_sessions = 0
    end = (sys.maxsize, "")
    head = next(stored, None)
    at = end if head is None else order(head[0])
    for chunk in digests.partitions():
        for user_id, digest, sessions in map(tuple, chunk):
            key = str(user_id)
            here = order(key)
            while at < here:
                head = next(stored, None)
                at = end if head is None else order(head[0])
            if at == here and head is not None and head[1] == digest:
                skipped_sessions += sessions
            else:
                changed[user_id] = digest
        if len(changed) > CHANGED_HELD:
            return None, 0
    return changed, skipped_sessions


@dataclass(frozen=True, slots=True, kw_only=True)
class _Chunk:
    """One page of user rows, each with its accounts and sessions, as read at ``observed``."""

    entries: list[_Entry]
    observed: datetime
    last: bool
    total: int | None = None  # users the pass will list, on its first chunk


def _pages(
    rows: Iterator[dict[str, Any]], size: int
) -> Iterator[tuple[list[dict[str, Any]], bool]]:
    """Pages of ``size`` rows, each with whether it is the last; one row of look-ahead."""
    page: list[dict[str, Any]] = []
    for row in rows:
        if len(page) == size:
            yield page, False
            page = []
        page.append(row)
    yield page, True


class _Follower:
    """Rows ordered by ``userId`` like the users they follow, handed out user by user."""

    def __init__(self, rows: Iterator[dict[str, Any]]) -> None:
        self._rows = rows
        self._head = next(rows, None)

    def take(self, user_id: object) -> list[dict[str, Any]]:
        taken: list[dict[str, Any]] = []
        while self._head is not None and self._head["userId"] == user_id:
            taken.append(self._head)
            self._head = next(self._rows, None)
        return taken

    @property
    def drained(self) -> bool:
        return self._head is None


def _group(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(str(row["userId"]), []).append(row)
    return grouped


def _record_error(key: str, reason: str, raw: Mapping[str, Any] | None) -> RecordError:
    log.warning("authjs_record_skipped", provider=PROVIDER, external_id=key, reason=reason)
    return RecordError(external_id=key, reason=reason, raw=raw)


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as JSON-safe values, for the operator who inspects a skipped record."""
    safe: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            safe[key] = value.isoformat()
        elif value is None or isinstance(value, str | int | float | bool):
            safe[key] = value
        else:
            safe[key] = repr(value)
    return safe
