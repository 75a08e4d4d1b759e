"""The Auth.js source digest: one value per user over everything the mapping reads.

A digest pass (``AuthjsProvider.iter_digested``) and the set pass skip a user whose digest
equals the one stored when the worker last applied that user. The digest is computed by the
source database, so the rows never leave it (nor the session token: only a hash over it).

Definition (``DIGEST_VERSION`` "authjs-2"): each row the mapping reads is hashed by
PostgreSQL's ``hash_record_extended`` (64 bits, each column by its type's own extended hash
function, no text formatting) with a seed per table: the user's columns with the salt, each
account's (provider, providerAccountId), each live session's token, expiry, the login time
the mapping derives from them (``least(expires - maxAge, observed)``: it moves with
``observed`` for a session that expires further off than maxAge) and ``createdAt`` where
configured. A user's digest is the hash of the *sums* of its rows' hashes (split in 32-bit
halves, so PostgreSQL sums them as integers, not numerics): a sum is a multiset hash, so
the rows need no order (one sort by user id, not one per table and column) and duplicate
rows do not cancel out as they would in an XOR. Text is hashed under the "C" collation, so
a nondeterministic collation cannot make two spellings equal.

"authjs-1" was md5 over each user's rows printed as text, aggregated in sorted order:
2.5-3x the source's CPU. Stored digests of another version never match, so the first pass
after an upgrade re-reads every user once and, the engine finding each unchanged, writes
nothing but the new digests.

``hash_record_extended`` needs PostgreSQL 14 (``supported``); an older source gets the
per-row pass. A collision (two different row sets with one digest, 2^-64 for a change) would
skip one changed user until its next change: the hash guards against accident, not against
an adversary (nor did md5).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Interval,
    Select,
    SmallInteger,
    Text,
    cast,
    func,
    literal,
    select,
    type_coerce,
    union_all,
)
from sqlalchemy.engine import Dialect

from providers.authjs_schema import AuthjsTables

__all__ = ["DIGEST_VERSION", "MIN_SERVER", "digest_query", "id_range", "supported"]

#: Part of every source digest: bump it with any change to what ``to_change`` or
#: ``session_change`` read or produce, or to the definition, so stored digests stop matching.
DIGEST_VERSION = "authjs-2"
#: The first PostgreSQL with ``hash_record_extended``.
MIN_SERVER = (14,)

_USER, _ACCOUNT, _SESSION = 1, 2, 3  # each table's seed, and its rows' kind
_LOW_31 = 0x7FFFFFFF


def supported(dialect: Dialect) -> bool:
    """Whether the source can compute this digest (PostgreSQL 14 or later)."""
    version = getattr(dialect, "server_version_info", None) or (0,)
    return dialect.name == "postgresql" and tuple(version) >= MIN_SERVER


def digest_query(
    tables: AuthjsTables,
    *,
    observed: datetime,
    max_age: timedelta,
    expired_too: bool,
    after: Any = None,
    upto: Any = None,
    bytewise: bool = False,
    ordered: bool = True,
) -> Select[Any]:
    """``(id, digest, live sessions)`` of every user after ``after`` up to ``upto`` (either
    open where None), in id order unless ``ordered`` is False; ``bytewise`` orders text ids
    by their bytes (to merge with the worker's order). With integer ids the accounts and
    sessions are read for the users' range only; text ids may compare otherwise under
    another column's collation, so theirs are all read and those of other users dropped."""
    user, account, session = tables.user, tables.account, tables.session
    ranged = tables.flavour.integer_ids and (after is not None or upto is not None)

    def rows(kind: int, uid: Any, values: list[ColumnElement[Any]]) -> Select[Any]:
        hashed = func.hash_record_extended(func.row(*values), literal(kind, BigInteger))
        return select(
            uid.label("uid"), literal(kind, SmallInteger).label("kind"), hashed.label("h")
        )

    salt = f"{DIGEST_VERSION}|{max_age.total_seconds()}|{int(expired_too)}"
    user_values = [
        literal(salt, Text),
        _exact(user.c.id),
        _exact(user.c.name),
        _exact(user.c.email),
        user.c.email_verified,
        _exact(user.c.image),
    ]
    if tables.has("user", "created_at"):
        user_values.append(user.c.created_at)
    users = rows(_USER, user.c.id, user_values).where(*id_range(user.c.id, after, upto))

    account_values = [_exact(account.c.provider), _exact(account.c.provider_account_id)]
    accounts = rows(_ACCOUNT, account.c.user_id, account_values)
    if ranged:
        accounts = accounts.where(*id_range(account.c.user_id, after, upto))

    at = literal(observed, type_=session.c.expires.type)
    expires = type_coerce(session.c.expires, session.c.expires.type)
    written = func.least(expires - literal(max_age, Interval), at)
    session_values = [_exact(session.c.session_token), session.c.expires, written]
    if tables.has("session", "created_at"):
        session_values.append(session.c.created_at)
    sessions = rows(_SESSION, session.c.user_id, session_values)
    if not expired_too:
        sessions = sessions.where(session.c.expires >= at)
    if ranged:
        sessions = sessions.where(*id_range(session.c.user_id, after, upto))

    every = union_all(users, accounts, sessions).subquery("digest_rows")
    key: ColumnElement[Any] = every.c.uid
    if bytewise and not tables.flavour.integer_ids:
        key = every.c.uid.collate("C")
    # Sums of 32-bit halves stay bigint (a bigint's sum is a numeric, slower); bit 31 of
    # each row's hash is left out, which leaves 63.
    high = func.sum(cast(every.c.h.op(">>")(32), Integer))
    low = func.sum(cast(every.c.h.op("&")(_LOW_31), Integer))
    digest = cast(func.hash_record_extended(func.row(high, low), literal(0, BigInteger)), Text)
    live = func.count().filter(every.c.kind == _SESSION)
    query = (
        select(key.label("id"), digest.label("digest"), live.label("n"))
        .group_by(key)
        .having(func.min(every.c.kind) == _USER)  # accounts or sessions of no user here
    )
    return query.order_by(key) if ordered else query


def _exact(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """A text column as text compared byte by byte; any other as it is."""
    if isinstance(column.type, Text):
        return cast(column, Text).collate("C")
    return column


def id_range(column: ColumnElement[Any], after: object, upto: object) -> list[ColumnElement[bool]]:
    """``after < column <= upto``, either end open where None."""
    bounds: list[ColumnElement[bool]] = []
    if after is not None:
        bounds.append(column > after)
    if upto is not None:
        bounds.append(column <= upto)
    return bounds
