"""The set-based full pass's statements (PostgreSQL worker): staging, classification, writes.

A full pass of a source that can hand its rows over as COPY streams (Auth.js on
PostgreSQL: ``providers.authjs_setpass``) copies them into temporary tables of the pass's
one worker connection (``stage``), decides per id-range batch which changed users are
*simple creates* (``classify``) and writes those with ``INSERT ... SELECT``
(``write_simple``): the same rows, audit rows and content hashes the engine's bulk create
path writes for them (``sync_worker.engine.bulk``, one definition of the rules, restated
here in SQL and held to it by tests/contract/test_setpass.py). Every other changed user is read back
(``rows_of``) for the per-row engine, in the same transaction.

The content hash (``UserChange.content_hash``: sha256 of canonical JSON) is built in SQL
only for users whose every string is printable-or-control ASCII without DEL, where
``to_json`` escapes exactly as Python's ``json.dumps`` does, and whose timestamps are plain
years; anyone else is not ``ok`` and goes to the per-row path, so a stored hash never
differs in definition.

The tables (``sw_*``) are temporary tables of the pass's connection (``stage``), or the
staged ones unlogged tables of a schema of the pass's own, filled by a second connection
(``db.setstage``); the per-batch ``sw_b`` and ``sw_n`` are always temporary. ``drop``
removes the temporary ones (the connection goes back to the pool).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import (
    Connection,
    Text,
    bindparam,
    cast,
    column,
    exists,
    func,
    select,
    table,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT

from db.errors import translated
from db.seen import count_live, live_identities
from sync_worker.errors import RecordRefused, StoreError, StoreUnavailable

__all__ = [
    "BatchSummary",
    "batch_settings",
    "classify",
    "count_unseen_staged",
    "drop",
    "nth_changed",
    "rows_of",
    "stage",
    "write_simple",
]

_TEMP = (
    "sw_n", "sw_b", "sw_u", "sw_known", "sw_login", "sw_esc", "sw_acc", "sw_ses",
    "sw_src_users", "sw_src_accounts", "sw_src_sessions", "sw_src_digests",
)  # fmt: skip
_TZ = "timestamp with time zone"
#: A new time-ordered id (UUIDv7, as ``engine.ids``): Unix milliseconds over random bits.
UUID7 = (
    "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing "
    "substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) "
    "FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid"
)
#: Strings ``to_json`` escapes as ``json.dumps(ensure_ascii=True)`` does: ASCII without DEL.
_PLAIN = r"!~ '[^\x01-\x7e]'"
_LOW, _HIGH = "'1000-01-01'", "'9999-01-01'"
_ESCAPE_SPAN = 50_000


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _utc(column: str, kind: str) -> str:
    """The column as a UTC timestamp without zone (naive columns hold UTC already)."""
    return f"({column} AT TIME ZONE 'UTC')" if kind == _TZ else column


def _zoned(column: str, kind: str) -> str:
    """The column as timestamptz (naive values taken as UTC, as ``as_utc`` takes them)."""
    return column if kind == _TZ else f"({column} AT TIME ZONE 'UTC')"


def _iso(naive: str) -> str:
    """Python's ``isoformat()`` of an aware UTC datetime, from a naive UTC timestamp."""
    return (
        f"(to_char({naive}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE WHEN "
        f"extract(microseconds FROM {naive})::bigint % 1000000 <> 0 "
        f"THEN to_char({naive}, '.US') ELSE '' END || '+00:00')"
    )


def _in_range(naive: str) -> str:
    return f"({naive} IS NULL OR {naive} BETWEEN {_LOW} AND {_HIGH})"


def _text(sql: str) -> Any:
    """``text()`` of a statement whose string literals hold JSON: a key's colon before a
    word (``"blocked":false``) would read as a bind parameter, so it is escaped."""
    return text(sql.replace('":', '"\\:'))


def _j(value: str) -> str:
    return f"coalesce(to_json({value})::text, 'null')"


Streams = Sequence[tuple[str, Sequence[tuple[str, str]], Iterable[bytes]]]


@translated
def stage(
    conn: Connection,
    relations: Streams,
    *,
    provider: str,
    role: str,
    observed: datetime,
    max_age_seconds: float,
) -> int:
    """Create the temporary tables, COPY the source's bytes into them and derive the
    per-user table ``sw_u`` (hash, raw, flags), all on this one connection. Returns the
    number of users. (``db.setstage`` stages on a second connection instead.)

    Whether a user changed (its source digest differs from the stored one) is decided here,
    once, as the digest pass decides it when it starts: a write racing the pass is as if
    it came after it (docs/architecture.md, engine rules)."""
    drop(conn)
    kinds = create_sources(conn, relations, temp=True)
    known_digests(conn, provider, temp=True)
    copy_sources(conn, relations)
    analyze_sources(conn)
    total = count_users(conn)
    derive_sources(
        conn, kinds, lo=1, hi=total, observed=observed, max_age_seconds=max_age_seconds,
        create=True, temp=True,
    )  # fmt: skip
    derive_users(conn, kinds["users"], role=role, lo=1, hi=total, create=True, temp=True)
    analyze_derived(conn)
    batch_tables(conn)
    return total


def create_sources(
    conn: Connection, relations: Sequence[tuple[str, Sequence[tuple[str, str]], Any]], *,
    temp: bool,
) -> dict[str, dict[str, str]]:  # fmt: skip
    """The ``sw_src_*`` tables, one per relation with its columns' source types: temporary,
    else unlogged ones (in the connection's first schema, which another connection can
    read). Returns each relation's column types."""
    kind = "TEMP" if temp else "UNLOGGED"
    kinds: dict[str, dict[str, str]] = {}
    for name, columns, _ in relations:
        if name in kinds:  # a relation's later part
            continue
        kinds[name] = dict(columns)
        cols = ", ".join(f"{_q(c)} {kind_}" for c, kind_ in columns)
        conn.execute(text(f"CREATE {kind} TABLE sw_src_{name} ({cols})"))
    conn.execute(text("CREATE INDEX ON sw_src_users (ord)"))
    return kinds


def known_digests(conn: Connection, provider: str, *, temp: bool) -> None:
    """``sw_known``: the source digests stored when the pass starts, before its first
    batch. Whether a user changed is decided against these, as the digest pass decides
    it when it starts, however late its range is derived: a digest the pass's own earlier
    batches drop (a relinked identity) must not make a later user look changed."""
    kind = "TEMP" if temp else "UNLOGGED"
    conn.execute(
        text(
            f"CREATE {kind} TABLE sw_known AS SELECT external_id::text, digest::text"  # noqa: S608
            " FROM sync_source_digests WHERE provider = :p"
        ),
        {"p": provider},
    )
    conn.execute(text("ANALYZE sw_known"))


def copy_sources(conn: Connection, relations: Streams) -> None:
    """COPY the source's bytes into the ``sw_src_*`` tables (added to what they hold)."""
    raw = conn.connection.driver_connection
    assert raw is not None
    for name, columns, chunks in relations:
        names = ", ".join(_q(c) for c, _ in columns)
        statement = f"COPY sw_src_{name} ({names}) FROM STDIN"
        with _raw_errors(), raw.cursor() as cur, cur.copy(statement) as copy:
            for chunk in chunks:
                copy.write(chunk)


def analyze_sources(conn: Connection) -> None:
    # Without statistics the derivations planned badly (2.5x the time of sw_u).
    conn.execute(
        text(
            "ANALYZE sw_src_users (id, ord), sw_src_accounts (uid), sw_src_sessions (uid),"
            " sw_src_digests (uid)"
        )
    )


def derive_sources(
    conn: Connection,
    kinds: Mapping[str, Mapping[str, str]],
    *,
    lo: int,
    hi: int,
    observed: datetime,
    max_age_seconds: float,
    create: bool,
    temp: bool,
) -> None:
    """The accounts, sessions and escapes tables of the users at positions ``lo..hi``
    (``create``: the tables are made from them, else they are added)."""
    kind = "TEMP" if temp else "UNLOGGED"
    head = f"CREATE {kind} TABLE sw_acc AS" if create else "INSERT INTO sw_acc"
    conn.execute(
        text(
            f"{head} SELECT DISTINCT u.ord, a.provider::text AS prov,"  # noqa: S608
            " a.acct::text AS acct FROM sw_src_accounts a JOIN sw_src_users u ON u.id = a.uid"
            " WHERE u.ord BETWEEN :lo AND :hi"
        ),
        {"lo": lo, "hi": hi},
    )
    _derive_sessions(
        conn, kinds["sessions"], lo=lo, hi=hi, observed=observed,
        max_age_seconds=max_age_seconds, kind=kind, create=create,
    )  # fmt: skip
    _escape_unplain(conn, lo=lo, hi=hi, kind=kind, create=create)


def count_users(conn: Connection) -> int:
    return int(conn.execute(text("SELECT count(*) FROM sw_src_users")).scalar_one())


def analyze_derived(conn: Connection) -> None:
    conn.execute(text("ANALYZE sw_u (ord, changed), sw_acc (ord), sw_ses (ord)"))


def batch_tables(conn: Connection) -> None:
    """The per-batch temporary tables of the connection that writes the batches."""
    conn.execute(
        text(
            "CREATE TEMP TABLE sw_b (ord bigint PRIMARY KEY, ext text, digest text, n bigint,"
            " ok boolean, has_identity boolean, email_key text,"
            " simple boolean NOT NULL DEFAULT false) ON COMMIT DELETE ROWS"
        )
    )
    # Per batch: emptied by each commit (cheaper than a TRUNCATE per batch).
    conn.execute(
        text(
            "CREATE TEMP TABLE sw_n (ord bigint, user_id uuid, profile_id uuid)"
            " ON COMMIT DELETE ROWS"
        )
    )


def _derive_sessions(
    conn: Connection,
    sessions: Mapping[str, str],
    *,
    lo: int,
    hi: int,
    observed: datetime,
    max_age_seconds: float,
    kind: str,
    create: bool,
) -> None:
    """``sw_ses``: each live session with its id (the token's SHA-256), its times as the
    mapping derives them, and whether SQL may write it."""
    expires = _zoned("s.expires", sessions["expires"])
    created = (
        _zoned("s.created_at", sessions["created_at"])
        if "created_at" in sessions
        else "NULL::timestamptz"
    )
    created_ok = (
        _in_range(_utc("s.created_at", sessions["created_at"]))
        if "created_at" in sessions
        else "true"
    )
    head = f"CREATE {kind} TABLE sw_ses AS" if create else "INSERT INTO sw_ses"
    conn.execute(
        text(
            f"{head} SELECT u.ord, s.expires AS raw_expires,"  # noqa: S608
            " encode(sha256(convert_to(s.token, 'UTF8')), 'hex') AS sid,"
            f" {expires} AS expires_at,"
            f" least({expires} - make_interval(secs => :max_age), :observed) AS written,"
            f" {created} AS created,"
            " (s.token IS NOT NULL AND s.token <> '' AND s.expires IS NOT NULL"
            f"  AND {_utc('s.expires', sessions['expires'])} BETWEEN {_LOW} AND {_HIGH}"
            f"  AND {created_ok}) AS ok"
            " FROM sw_src_sessions s JOIN sw_src_users u ON u.id = s.uid"
            " WHERE u.ord BETWEEN :lo AND :hi"
        ),
        {"max_age": max_age_seconds, "observed": observed, "lo": lo, "hi": hi},
    )
    if create:
        conn.execute(text("CREATE INDEX ON sw_acc (ord)"))
        conn.execute(text("CREATE INDEX ON sw_ses (ord)"))


@translated
def derive_users(
    conn: Connection,
    users: Mapping[str, str],
    *,
    role: str,
    lo: int,
    hi: int,
    create: bool,
    temp: bool,
) -> None:
    """``sw_u``: each user at positions ``lo..hi`` with what its create writes (content
    hash, raw record, audit changes with ``role``, flags). ``create``: the table is made
    (with its indexes) from these users, else they are added to it."""
    verified_kind = users["email_verified"]
    if verified_kind == "boolean":
        verified = "coalesce(u.email_verified, false)"
        verified_doc = "coalesce(u.email_verified::text, 'null')"
        verified_raw = "to_jsonb(u.email_verified)"
        verified_ok = "true"
    else:
        naive = _utc("u.email_verified", verified_kind)
        verified = "(u.email_verified IS NOT NULL)"
        verified_doc = _j(_iso(naive))
        verified_raw = f"to_jsonb({_iso(naive)})"
        verified_ok = _in_range(naive)
    if "created_at" in users:
        naive = _utc("u.created_at", users["created_at"])
        created_tz = _zoned("u.created_at", users["created_at"])
        created_iso = f"CASE WHEN u.created_at IS NOT NULL THEN {_iso(naive)} END"
        created_ok = _in_range(naive)
    else:
        created_tz, created_iso, created_ok = "NULL::timestamptz", "NULL::text", "true"
    # Python's own escapes where ``to_json`` would differ (``sw_esc``), else ``to_json``.
    name_doc = "coalesce(b.name_j, to_json(b.name)::text, 'null')"
    email_doc = "coalesce(b.email_j, to_json(b.email)::text, 'null')"
    image_doc = "coalesce(b.image_j, to_json(b.image)::text, 'null')"
    kind = "TEMP" if temp else "UNLOGGED"
    head = f"CREATE {kind} TABLE sw_u AS" if create else "INSERT INTO sw_u"
    conn.execute(
        _text(
            f"""
{head}
WITH sorted_acc AS (
  -- Sorted once: an ORDER BY inside each aggregate sorted every user's group apart.
  SELECT * FROM sw_acc WHERE ord BETWEEN :lo AND :hi
  ORDER BY ord, prov COLLATE "C", acct COLLATE "C"
), acc AS (
  SELECT ord,
    bool_and(prov IS NOT NULL AND prov <> '' AND acct IS NOT NULL AND acct <> ''
             AND prov {_PLAIN} AND acct {_PLAIN}
             AND length(prov) <= 57 AND length(acct) <= 255) AS ok,
    '[' || string_agg('[' || to_json('authjs:' || prov)::text || ',' || to_json(acct)::text
                      || ',""]', ',') || ']' AS linked_doc,
    '[' || string_agg('{{"provider":' || to_json(prov)::text || ',"providerAccountId":'
                      || to_json(acct)::text || '}}', ',') || ']' AS accounts_doc,
    jsonb_agg(jsonb_build_object('provider', prov, 'providerAccountId', acct)) AS accounts_raw,
    array_agg('authjs:' || prov || ':' || acct) AS linked_names
  FROM sorted_acc GROUP BY ord
), ses AS (
  -- Two sessions expiring at once: their order (hence which one's audit row moves the
  -- last login) follows the token's collation, which the per-row path decides.
  SELECT ord, bool_and(ok) AND count(*) = count(DISTINCT raw_expires) AS ok,
    max(coalesce(created, written)) AS last_login
  FROM sw_ses WHERE ord BETWEEN :lo AND :hi GROUP BY ord
), base AS (
  SELECT u.ord, u.id::text AS ext, d.digest::text AS digest, coalesce(d.n, 0)::bigint AS n,
    nullif(u.email, '') AS email, nullif(u.name, '') AS name, nullif(u.image, '') AS image,
    {verified} AS verified, {verified_doc} AS verified_doc, {verified_raw} AS verified_raw,
    {created_tz} AS created_tz, {created_iso} AS created_iso,
    ({verified_ok} AND {created_ok}) AS times_ok,
    coalesce(acc.ok, true) AS acc_ok, coalesce(ses.ok, true) AS ses_ok, ses.last_login,
    coalesce(acc.linked_doc, '[]') AS linked_doc,
    coalesce(acc.accounts_doc, '[]') AS accounts_doc,
    coalesce(acc.accounts_raw, '[]'::jsonb) AS accounts_raw,
    -- The audit lists them sorted as whole names ("p:e"), not as (provider, id) pairs.
    CASE WHEN cardinality(acc.linked_names) > 1
         THEN ARRAY(SELECT x FROM unnest(acc.linked_names) AS x ORDER BY x COLLATE "C")
         ELSE acc.linked_names END AS linked_names,
    e.name_j, e.email_j, e.image_j, e.email_lower
  , (d.digest IS NULL OR stored.digest IS DISTINCT FROM d.digest::text) AS changed,
    (stored.digest IS NOT NULL) AS known
  FROM sw_src_users u
  LEFT JOIN sw_src_digests d ON d.uid = u.id
  LEFT JOIN sw_esc e ON e.ord = u.ord
  LEFT JOIN sw_known stored ON stored.external_id = u.id::text
  LEFT JOIN acc ON acc.ord = u.ord
  LEFT JOIN ses ON ses.ord = u.ord
  WHERE u.ord BETWEEN :lo AND :hi
)
SELECT b.ord, b.ext, b.digest, b.n, b.changed, b.known, b.email, b.name, b.image, b.verified,
  b.created_tz, b.linked_names, b.last_login,
  CASE WHEN b.verified AND b.email IS NOT NULL
       THEN coalesce(b.email_lower, lower(b.email COLLATE "C")) END AS email_key,
  (b.ext <> '' AND length(b.ext) <= 255 AND b.ext {_PLAIN} AND b.digest IS NOT NULL
   AND (b.email IS NULL OR (length(b.email) <= 320
                            AND b.email LIKE '%_@_%'))
   AND (b.name IS NULL OR length(b.name) <= 2048)
   AND (b.image IS NULL OR length(b.image) <= 65536)
   AND b.times_ok AND b.acc_ok AND b.ses_ok) AS ok,
  encode(sha256(convert_to(
    '{{"attributes":{{"avatar_url":' || {image_doc} || ',"blocked":false,"created_at":'
    || {_j("b.created_iso")} || ',"email":' || {email_doc} || ',"email_verified":'
    || b.verified::text || ',"family_name":null,"given_name":null,"last_login_at":null,'
    || '"name":' || {name_doc} || ',"phone":null,"profile":{{}},"role":null,'
    || '"tenant_id":null}},"linked":' || b.linked_doc || ',"raw":{{"accounts":' || b.accounts_doc
    || coalesce(',"createdAt":' || to_json(b.created_iso)::text, '')
    || ',"email":' || {email_doc} || ',"emailVerified":' || b.verified_doc
    || ',"id":' || to_json(b.ext)::text || ',"image":' || {image_doc}
    || ',"name":' || {name_doc} || '}}}}', 'UTF8')), 'hex') AS content_hash,
  jsonb_build_object('id', b.ext, 'name', b.name, 'email', b.email,
    'emailVerified', b.verified_raw, 'image', b.image, 'accounts', b.accounts_raw)
    || CASE WHEN b.created_iso IS NOT NULL
            THEN jsonb_build_object('createdAt', b.created_iso) ELSE '{{}}'::jsonb END AS raw,
  -- The create's audit changes. One text parsed once: cheaper than composing jsonb values.
  ('{{"role":[null,' || to_json(CAST(:role AS text))::text || ']'
   || CASE WHEN b.email IS NOT NULL THEN ',"email":[null,' || to_json(b.email)::text || ']'
           ELSE '' END
   || CASE WHEN b.verified THEN ',"email_verified":[null,true]' ELSE '' END
   || CASE WHEN b.name IS NOT NULL THEN ',"name":[null,' || to_json(b.name)::text || ']'
           ELSE '' END
   || CASE WHEN b.image IS NOT NULL
           THEN ',"avatar_url":[null,' || to_json(b.image)::text || ']' ELSE '' END
   || CASE WHEN b.linked_names IS NOT NULL
           THEN ',"identities":[[],' || to_json(b.linked_names)::text || ']' ELSE '' END
   || '}}')::jsonb AS created_changes,
  -- The ids a create takes, made here (off the writer's connection), as engine.ids makes
  -- them; a user that goes per row leaves them unused.
  {UUID7} AS user_id, {UUID7} AS profile_id
FROM base b
"""  # noqa: S608 (identifiers and expressions of our own, values bound)
        ),
        {"lo": lo, "hi": hi, "role": role},
    )
    _derive_logins(conn, lo, hi, create=create, kind=kind)
    if create:
        conn.execute(text("CREATE UNIQUE INDEX ON sw_u (ord)"))
        conn.execute(text("CREATE INDEX ON sw_u (ord) WHERE changed"))  # where pages end
        conn.execute(text("CREATE INDEX ON sw_login (ord)"))


def _derive_logins(conn: Connection, lo: int, hi: int, *, create: bool, kind: str) -> None:
    """``sw_login``: each live session of the users at positions ``lo..hi`` as its
    create writes it (with its new id), and its login's audit changes: each session, in
    the per-row path's order (expiry, then id), moves the last login from the latest of
    those before it."""
    before, after = _iso("(w.prev AT TIME ZONE 'UTC')"), _iso("(w.after AT TIME ZONE 'UTC')")
    head = f"CREATE {kind} TABLE sw_login AS" if create else "INSERT INTO sw_login"
    conn.execute(
        _text(
            f"""
{head}
SELECT w.ord, {UUID7} AS id, w.sid, w.created, w.written, w.expires_at,
  jsonb_build_object('session', jsonb_build_array(NULL, w.sid))
  || CASE WHEN w.prev IS DISTINCT FROM w.after
          THEN jsonb_build_object('last_login_at', jsonb_build_array(
                 CASE WHEN w.prev IS NOT NULL THEN {before} END, {after}))
          ELSE '{{}}' END AS changes
FROM (
  SELECT v.*, greatest(v.prev, v.seen) AS after FROM (
    SELECT ord, sid, created, written, expires_at, coalesce(created, written) AS seen,
      max(coalesce(created, written)) OVER (
        PARTITION BY ord ORDER BY raw_expires, sid
        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev
    FROM sw_ses WHERE ord BETWEEN :lo AND :hi
  ) v
) w
"""  # noqa: S608 (expressions of our own, values bound)
        ),
        {"lo": lo, "hi": hi},
    )


@contextmanager
def _raw_errors() -> Iterator[None]:
    """The driver's own errors (COPY goes to psycopg directly), as ``db.errors`` has them."""
    try:
        yield
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
        raise RecordRefused(f"database refused the record: {_line(exc)}") from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise StoreUnavailable(f"database unavailable: {_line(exc)}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"database error: {_line(exc)}") from exc


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _escape_unplain(conn: Connection, *, lo: int, hi: int, kind: str, create: bool) -> None:
    """``sw_esc``: for the texts of the users at ``lo..hi`` that ``to_json`` would not
    escape as Python does (non-ASCII, DEL), Python's own encoding; for such an email,
    Python's lower case (the key the engine links by). A few per cent of the users in
    practice: the rest is SQL. Read and written ``_ESCAPE_SPAN`` positions at a time, so
    memory stays flat."""
    if create:
        conn.execute(
            text(
                f"CREATE {kind} TABLE sw_esc (ord bigint PRIMARY KEY, name_j text,"
                " email_j text, image_j text, email_lower text)"
            )
        )
    unplain = r"~ '[^\x01-\x7e]'"
    query = text(
        "SELECT ord, nullif(name, ''), nullif(email, ''), nullif(image, '')"  # noqa: S608
        " FROM sw_src_users WHERE ord BETWEEN :lo AND :hi"
        f" AND (name {unplain} OR email {unplain} OR image {unplain})"
    )
    raw = conn.connection.driver_connection
    assert raw is not None

    def encoded(value: str | None) -> str | None:
        plain = value is None or all("\x01" <= c <= "\x7e" for c in value)
        return None if plain else json.dumps(value)

    for start in range(lo, hi + 1, _ESCAPE_SPAN):
        end = min(hi, start + _ESCAPE_SPAN - 1)
        rows = conn.execute(query, {"lo": start, "hi": end}).all()
        if not rows:
            continue
        with _raw_errors(), raw.cursor() as cur, cur.copy("COPY sw_esc FROM STDIN") as copy:
            for position, name, email, image in rows:
                lowered = None if encoded(email) is None else str(email).lower()
                copy.write_row((position, encoded(name), encoded(email), encoded(image), lowered))


@translated
def drop(conn: Connection) -> None:
    """The connection's own (temporary) tables of a pass: never a staging schema's, which
    ``db.setstage`` drops whole."""
    conn.execute(text(f"DROP TABLE IF EXISTS {', '.join(f'pg_temp.{t}' for t in _TEMP)}"))


@translated
def batch_settings(conn: Connection) -> None:
    """The rest of a set batch's transaction: custom plans (the engine's lock asks for
    generic ones; it asks again when the per-row path takes it), no JIT, and a commit that
    does not wait for its WAL flush.

    JIT: the classification's estimates grow with the worker's statistics (refreshed while
    the pass loads) until its cost passes ``jit_optimize_above_cost``: compiling and
    inlining then took 300 ms of a 60 ms batch, for a statement that runs once.

    An unflushed commit is not lost piecemeal: a crash can only take whole batches, each
    with the cursor, seen ids and digests it commits, and the next pass does them again.
    Nothing outside the worker was told of them. Waiting for a hundred flushes is what a
    100,000-user load saves."""
    conn.execute(
        text(
            "SELECT set_config('plan_cache_mode', 'auto', true), set_config('jit', 'off', true),"
            " set_config('synchronous_commit', 'off', true)"
        )
    )


@translated
def nth_changed(conn: Connection, start: int, n: int) -> int | None:
    """The position of the ``n``-th changed user at or after ``start`` (None: fewer)."""
    query = text(
        "SELECT ord FROM sw_u WHERE changed AND ord >= :start ORDER BY ord LIMIT 1 OFFSET :skip"
    )
    found = conn.execute(query, {"start": start, "skip": n - 1}).scalar()
    return None if found is None else int(found)


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSummary:
    """One batch, classified: its users, the unchanged ones, and the changed ones that are
    not simple creates (positions, for the per-row path)."""

    users: int
    last_ext: str | None
    skipped_users: int
    skipped_sessions: int
    simple: int
    changed: list[tuple[int, str, str]]  # (position, external id, source digest)
    other: list[tuple[int, str, str]]  # those of ``changed`` that are not simple


@translated
def classify(
    conn: Connection, lo: int, hi: int, *, provider: str, link: bool, probe: bool = False
) -> BatchSummary:
    """Fill ``sw_b`` with the batch's changed users and mark the simple creates, by the
    rules of ``engine.bulk.split``: no stored identity under the user's key, none of its
    linked accounts stored nor named by another changed user of the batch, no live
    verified owner of its verified email (linking on) nor another create of the batch
    claiming it, none of its sessions stored or repeated; and its rows hashable here.

    Unless ``probe``, what the worker's unique keys would refuse is not looked up: a user
    whose digest was stored (so its identity) is not a create, and the rest are taken to be
    new. An initial load finds nothing stored, and the probes into the growing identity and
    session indexes were a fifth of its batches' time. Should a stored row refuse a write
    after all (one a webhook wrote since, say), ``write_simple`` raises and the caller
    classifies the batch again with ``probe``, as if nothing had been written. Verified
    emails, which no unique key guards, are always looked up."""
    params = {"p": provider, "lo": lo, "hi": hi, "link": link}
    if probe:
        conn.execute(text("DELETE FROM sw_b"))  # a batch classified before, without probes
    # A scalar subquery with LIMIT: an index probe per user. As EXISTS, the planner chose
    # a hashed subplan that read every stored identity of the provider on each page
    # (quadratic: 2.2 s of a 100,000-user load, growing with the table).
    has_identity = (
        "coalesce((SELECT true FROM user_identities i"
        " WHERE i.provider = :p AND i.external_id = u.ext LIMIT 1), false)"
        if probe
        else "u.known"
    )
    stored = (
        """
  -- a linked account stored already (under any user, deleted or not)
  UNION SELECT a.ord FROM batch_acc a CROSS JOIN LATERAL (
    SELECT 1 FROM user_identities i
    WHERE i.provider = 'authjs:' || a.prov AND i.external_id = a.acct LIMIT 1) hit
  -- a session stored already
  UNION SELECT s.ord FROM batch_ses s CROSS JOIN LATERAL (
    SELECT 1 FROM user_sessions us
    WHERE us.provider = :p AND us.external_session_id = s.sid LIMIT 1) hit"""
        if probe
        else ""
    )
    # One statement: the batch's changed users with whether each is a simple create (an
    # UPDATE of them after the INSERT cost ~10 ms a batch, a tenth of the batch).
    conn.execute(
        text(
            f"""
INSERT INTO sw_b (ord, ext, digest, n, ok, has_identity, email_key, simple)
WITH b AS (
  SELECT u.ord, u.ext, u.digest, u.n, u.ok, {has_identity} AS has_identity,
    -- In the column's "C" collation the users' lower(email) index cannot serve the
    -- probe below (a scan of every user for each verified email, 4 s a batch by 100,000).
    CASE WHEN :link THEN u.email_key COLLATE "default" END AS email_key
  FROM sw_u u WHERE u.ord BETWEEN :lo AND :hi AND u.changed
), batch_acc AS (
  SELECT a.ord, a.prov, a.acct FROM sw_acc a JOIN b ON b.ord = a.ord
  WHERE a.ord BETWEEN :lo AND :hi
), batch_ses AS (
  SELECT s.ord, s.sid FROM sw_ses s JOIN b ON b.ord = s.ord
  WHERE s.ord BETWEEN :lo AND :hi
), not_simple AS (
  -- Lookups into the worker's tables are LATERAL ... LIMIT 1: an index probe per row of
  -- the batch, never a join that reads the whole (growing) table.
  -- a verified email (linking on) a live user holds verified
  SELECT b.ord FROM b CROSS JOIN LATERAL (
    SELECT 1 FROM users x WHERE lower(x.email) = b.email_key
    AND x.email_verified AND x.deleted_at IS NULL LIMIT 1) hit
    WHERE b.email_key IS NOT NULL
  -- Within the batch, counted by window, not by a join to a grouped copy: on estimates of
  -- one row, the planner re-ran that grouping for each user (140 ms a batch).
  -- ... or that another create of the batch claims
  UNION SELECT ord FROM (
    SELECT ord, count(*) OVER (PARTITION BY email_key) AS claims FROM b
    WHERE email_key IS NOT NULL AND NOT has_identity
  ) claimed WHERE claims > 1
  -- a linked account another changed user of the batch names too
  UNION SELECT ord FROM (
    SELECT ord, count(*) OVER (PARTITION BY prov, acct) AS names FROM batch_acc
  ) twice WHERE names > 1
  -- a session named twice in the batch
  UNION SELECT ord FROM (
    SELECT ord, count(*) OVER (PARTITION BY sid) AS names FROM batch_ses
  ) twice WHERE names > 1{stored}
)
SELECT b.ord, b.ext, b.digest, b.n, b.ok, b.has_identity, b.email_key,
  (b.ok AND NOT b.has_identity
   AND b.ord NOT IN (SELECT ord FROM not_simple WHERE ord IS NOT NULL))
FROM b
"""  # noqa: S608 (our own SQL)
        ),
        params,
    )
    head = conn.execute(
        text(
            "SELECT count(*), coalesce(sum(n), 0),"
            " (SELECT ext FROM sw_u WHERE ord = :hi) FROM sw_u WHERE ord BETWEEN :lo AND :hi"
        ),
        params,
    ).one()
    changed_all = conn.execute(text("SELECT ord, ext, digest, simple, n FROM sw_b ORDER BY ord"))
    changed_list, other = [], []
    sessions = 0
    for position, ext, digest, simple, n in changed_all:
        row = (int(position), str(ext), str(digest))
        changed_list.append(row)
        sessions += int(n)
        if not simple:
            other.append(row)
    return BatchSummary(
        users=int(head[0]),
        last_ext=None if head[2] is None else str(head[2]),
        skipped_users=int(head[0]) - len(changed_list),
        skipped_sessions=int(head[1]) - sessions,
        simple=len(changed_list) - len(other),
        changed=changed_list,
        other=other,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Written:
    created: int
    logins: int


@translated
def write_simple(
    conn: Connection,
    lo: int,
    hi: int,
    *,
    provider: str,
    now: datetime,
    version: datetime,
    run_id: uuid.UUID | None,
    source: str,
    role: str,
    profile: Mapping[str, Any],
) -> Written:
    """Write the batch's simple creates (``sw_b.simple``): users, profiles, identities,
    sessions, audit rows and source digests, as ``engine.bulk.BulkPlan`` builds them."""
    created = conn.execute(
        text(
            "INSERT INTO sw_n (ord, user_id, profile_id) SELECT u.ord, u.user_id, u.profile_id"
            " FROM sw_b b JOIN sw_u u ON u.ord = b.ord AND u.ord BETWEEN :lo AND :hi"
            " WHERE b.simple"
        ),
        {"lo": lo, "hi": hi},
    ).rowcount
    if not created:
        return Written(created=0, logins=0)
    params: dict[str, Any] = {
        "p": provider,
        "lo": lo,
        "hi": hi,
        "now": now,
        "version": version,
        "run": run_id,
        "source": source,
        "role": role,
        "tz": profile.get("timezone", "UTC"),
        "currency": profile.get("currency", "USD"),
        "locale": profile.get("locale", "en"),
        "settings": json.dumps(profile.get("settings") or {}),
    }
    conn.execute(
        text(
            "INSERT INTO users (id, email, email_verified, name, given_name, family_name,"
            " phone, avatar_url, role, tenant_id, blocked, last_login_at, created_at,"
            " updated_at, deleted_at)"
            " SELECT n.user_id, u.email, u.verified, u.name, NULL, NULL, NULL, u.image, :role,"
            " NULL, false, u.last_login, coalesce(u.created_tz, :now), :now, NULL"
            " FROM sw_n n JOIN sw_u u ON u.ord = n.ord AND u.ord BETWEEN :lo AND :hi"
        ),
        params,
    )
    conn.execute(
        text(
            "INSERT INTO profiles (id, user_id, display_name, avatar_url, timezone, currency,"
            " locale, settings, created_at, updated_at)"
            " SELECT n.profile_id, n.user_id, u.name, u.image, :tz, :currency, :locale,"
            " CAST(:settings AS jsonb), :now, :now"
            " FROM sw_n n JOIN sw_u u ON u.ord = n.ord AND u.ord BETWEEN :lo AND :hi"
        ),
        params,
    )
    conn.execute(
        text(
            "INSERT INTO user_identities (provider, external_id, user_id, email,"
            " upstream_updated_at, content_hash, raw, first_seen_at, last_synced_at, deleted_at)"
            " SELECT CAST(:p AS text), u.ext, n.user_id, u.email,"
            " CAST(:version AS timestamptz), u.content_hash, u.raw, CAST(:now AS timestamptz),"
            " CAST(:now AS timestamptz), NULL::timestamptz"
            " FROM sw_n n JOIN sw_u u ON u.ord = n.ord AND u.ord BETWEEN :lo AND :hi"
            " UNION ALL"
            " SELECT 'authjs:' || a.prov, a.acct, n.user_id, NULL, NULL, NULL, NULL, :now,"
            " :now, NULL FROM sw_n n JOIN sw_acc a ON a.ord = n.ord AND a.ord BETWEEN :lo AND :hi"
        ),
        params,
    )
    logins = conn.execute(
        text(
            "INSERT INTO user_sessions (id, user_id, provider, external_session_id, ip,"
            " user_agent, created_at, last_seen_at, expires_at, revoked_at)"
            " SELECT s.id, n.user_id, :p, s.sid, NULL, NULL, coalesce(s.created, s.written),"
            " s.written, s.expires_at, NULL"
            " FROM sw_n n JOIN sw_login s ON s.ord = n.ord AND s.ord BETWEEN :lo AND :hi"
        ),
        params,
    ).rowcount
    conn.execute(
        text(
            "INSERT INTO sync_audit (occurred_at, run_id, source, provider, external_id,"
            " user_id, action, changes, event_id, error)"
            # The changes were derived with the staged users and sessions.
            " SELECT CAST(:now AS timestamptz), CAST(:run AS uuid), CAST(:source AS text),"
            " CAST(:p AS text), u.ext, n.user_id, 'created', u.created_changes, NULL::text,"
            " NULL::text"
            " FROM sw_n n JOIN sw_u u ON u.ord = n.ord AND u.ord BETWEEN :lo AND :hi"
            " UNION ALL"
            " SELECT :now, :run, :source, :p, u.ext, n.user_id, 'login', s.changes, NULL, NULL"
            " FROM sw_n n JOIN sw_u u ON u.ord = n.ord AND u.ord BETWEEN :lo AND :hi"
            " JOIN sw_login s ON s.ord = n.ord AND s.ord BETWEEN :lo AND :hi"
        ),
        params,
    )
    conn.execute(
        text(
            "INSERT INTO sync_source_digests (provider, external_id, digest)"
            # No ON CONFLICT: a digest goes with its identity (migration 0007's triggers),
            # and these have none. Should one be there anyway, the refusal sends the batch
            # per row, which stores digests its own way.
            " SELECT :p, b.ext, b.digest FROM sw_b b WHERE b.simple"
        ),
        params,
    )
    return Written(created=int(created), logins=int(logins))


@translated
def count_unseen_staged(conn: Connection, provider: str) -> tuple[int, int]:
    """(live primary identities of the provider, how many of them are not among the
    pass's staged users): ``db.seen.count_unseen`` for a whole set pass, whose staged
    users are every id it saw."""
    live = live_identities(provider)
    # The source's users as copied (narrower than sw_u), compared bytewise: the merge join
    # sorted both sides by the database's collation (0.47 s at 100,000, 0.16 s so);
    # equality is the same.
    staged = table("sw_src_users", column("id"))
    seen = exists().where(cast(staged.c.id, Text).collate("C") == live.c.external_id.collate("C"))
    missing = conn.execute(select(func.count()).select_from(live).where(~seen)).scalar_one()
    return count_live(conn, provider), int(missing)


@translated
def rows_of(
    conn: Connection, positions: Sequence[int], *, user_created: bool, session_created: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The source rows of these users as the adapter reads them (its field names, each
    column's own type): users, their accounts, their live sessions."""
    ords = bindparam("ords", list(positions), type_=ARRAY(BIGINT))
    # Made when the per-row path first needs them (an initial load may never).
    conn.execute(text("CREATE INDEX IF NOT EXISTS sw_src_accounts_uid ON sw_src_accounts (uid)"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS sw_src_sessions_uid ON sw_src_sessions (uid)"))
    created = ', u.created_at AS "createdAt"' if user_created else ""
    users = conn.execute(
        text(
            'SELECT u.id, u.name, u.email, u.email_verified AS "emailVerified", u.image'  # noqa: S608
            f"{created} FROM sw_src_users u WHERE u.ord = ANY(:ords) ORDER BY u.ord"
        ).bindparams(ords)
    )
    accounts = conn.execute(
        text(
            'SELECT a.uid AS "userId", a.provider, a.acct AS "providerAccountId"'
            " FROM sw_src_accounts a JOIN sw_src_users u ON u.id = a.uid"
            " WHERE u.ord = ANY(:ords) ORDER BY u.ord, a.provider, a.acct"
        ).bindparams(ords)
    )
    account_rows = [dict(r) for r in accounts.mappings()]
    screated = ', s.created_at AS "createdAt"' if session_created else ""
    sessions = conn.execute(
        text(
            'SELECT s.uid AS "userId", s.token AS "sessionToken", s.expires'  # noqa: S608
            f"{screated} FROM sw_src_sessions s JOIN sw_src_users u ON u.id = s.uid"
            " WHERE u.ord = ANY(:ords) ORDER BY u.ord, s.expires, s.token"
        ).bindparams(ords)
    )
    return (
        [dict(r) for r in users.mappings()],
        account_rows,
        [dict(r) for r in sessions.mappings()],
    )
