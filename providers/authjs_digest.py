"""The Auth.js source digest: one value per user over everything the mapping reads.

A digest pass (``AuthjsProvider.iter_digested``) and the set pass skip a user whose digest
equals the one stored when the worker last applied that user. The digest is computed by the
source database, so the rows never leave it (nor the session token: only a hash over it).

Definition (``DIGEST_VERSION`` "authjs-3"): each row the mapping reads is hashed by
PostgreSQL's ``hash_record_extended`` (64 bits, each column by its type's own extended hash
function, no text formatting), seeded by the table and a salt (the definition's version,
maxAge and whether expired sessions are read), the user's id among its columns: the user's
columns, each account's (provider, providerAccountId), each live session's token and
expiry, ``observed`` where the login time the mapping derives (``min(expires - maxAge,
observed)``) moves with it (a session that expires further off than maxAge), and
``createdAt`` where configured. A user's digest is the sum of its rows' hashes
modulo 2^62 (``sync_worker.digest_sum``): the rows need no order (one sort by user id, not
one per table and column), duplicate rows do not cancel out as they would in an XOR, and
the digests add up, so ``sum_query`` totals every user's digest without grouping by user.
Text is hashed under the "C" collation, so a nondeterministic collation cannot make two
spellings equal.

"authjs-1" was md5 over each user's rows printed as text, aggregated in sorted order:
2.5-3x the source's CPU. "authjs-2" hashed each user's sums again, which made digests that
do not add up. Stored digests of another version never match, so the first pass after an
upgrade re-reads every user once and, the engine finding each unchanged, writes nothing but
the new digests.

``hash_record_extended`` needs PostgreSQL 14 (``supported``); an older source gets the
per-row pass. A collision (two different row sets with one digest, 2^-62 for a change) would
skip one changed user until its next change: the hash guards against accident, not against
an adversary (nor did md5).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    SmallInteger,
    Subquery,
    Text,
    case,
    cast,
    func,
    literal,
    select,
    union_all,
)
from sqlalchemy.engine import Dialect

from providers.authjs_schema import AuthjsTables
from sync_worker.digest_sum import folded, halves

__all__ = ["DIGEST_VERSION", "MIN_SERVER", "digest_query", "id_range", "sum_query", "supported"]

#: Part of every source digest: bump it with any change to what ``to_change`` or
#: ``session_change`` read or produce, or to the definition, so stored digests stop matching.
DIGEST_VERSION = "authjs-3"
#: The first PostgreSQL with ``hash_record_extended``.
MIN_SERVER = (14,)

_USER, _ACCOUNT, _SESSION = 1, 2, 3  # each table's seed, and its rows' kind


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
    every = _rows(
        tables, observed=observed, max_age=max_age, expired_too=expired_too, after=after, upto=upto
    )
    key: ColumnElement[Any] = every.c.uid
    if bytewise and not tables.flavour.integer_ids:
        key = every.c.uid.collate("C")
    digest = cast(_summed(every), Text)
    live = func.count().filter(every.c.kind == _SESSION)
    query = (
        select(key.label("id"), digest.label("digest"), live.label("n"))
        .group_by(key)
        .having(func.min(every.c.kind) == _USER)  # accounts or sessions of no user here
    )
    return query.order_by(key) if ordered else query


def sum_query(
    tables: AuthjsTables, *, observed: datetime, max_age: timedelta, expired_too: bool
) -> Select[int, int, int]:
    """``(users, the sum of their digests, live sessions)`` over every user, without
    grouping rows by user: ``sync_worker.digest_sum.DigestSum``. Accounts or sessions of
    no user count here and in no digest: a source that keeps such rows never totals what
    the worker stored, and its passes compare user by user."""
    every = _rows(tables, observed=observed, max_age=max_age, expired_too=expired_too)
    return select(
        func.count().filter(every.c.kind == _USER),
        func.coalesce(_summed(every), 0),
        func.count().filter(every.c.kind == _SESSION),
    )


def _rows(
    tables: AuthjsTables,
    *,
    observed: datetime,
    max_age: timedelta,
    expired_too: bool,
    after: Any = None,
    upto: Any = None,
) -> Subquery:
    """Every row the digest covers as ``(uid, kind, h)``: its user, its table, its hash
    (a column of a subquery, so that each row is hashed once however often it is used)."""
    user, account, session = tables.user, tables.account, tables.session
    ranged = tables.flavour.integer_ids and (after is not None or upto is not None)

    salt = f"{DIGEST_VERSION}|{max_age.total_seconds()}|{int(expired_too)}"

    def rows(kind: int, uid: Any, values: list[ColumnElement[Any]]) -> Select[Any]:
        seed = literal(_seed(salt, kind), BigInteger)
        hashed = func.hash_record_extended(func.row(*values), seed)
        return select(
            uid.label("uid"), literal(kind, SmallInteger).label("kind"), hashed.label("h")
        )

    user_values = [
        _exact(user.c.id),
        _exact(user.c.name),
        _exact(user.c.email),
        user.c.email_verified,
        _exact(user.c.image),
    ]
    if tables.has("user", "created_at"):
        user_values.append(user.c.created_at)
    users = rows(_USER, user.c.id, user_values).where(*id_range(user.c.id, after, upto))

    # Each row names its user, so the rows' sum over all users tells them apart.
    account_values = [
        _exact(account.c.user_id),
        _exact(account.c.provider),
        _exact(account.c.provider_account_id),
    ]
    accounts = rows(_ACCOUNT, account.c.user_id, account_values)
    if ranged:
        accounts = accounts.where(*id_range(account.c.user_id, after, upto))

    # The mapping's login time, min(expires - maxAge, observed), is ``expires`` less the
    # salt's maxAge but where a session expires further off than maxAge: there it is
    # ``observed``, which moves. One comparison with a constant, no date arithmetic a row.
    at = literal(observed, type_=session.c.expires.type)
    later = literal(observed + max_age, type_=session.c.expires.type)
    moving = case((session.c.expires > later, at))
    session_values = [
        _exact(session.c.user_id),
        _exact(session.c.session_token),
        session.c.expires,
        moving,
    ]
    if tables.has("session", "created_at"):
        session_values.append(session.c.created_at)
    sessions = rows(_SESSION, session.c.user_id, session_values)
    if not expired_too:
        sessions = sessions.where(session.c.expires >= at)
    if ranged:
        sessions = sessions.where(*id_range(session.c.user_id, after, upto))

    return union_all(users, accounts, sessions).subquery("digest_rows")


def _seed(salt: str, kind: int) -> int:
    """The seed of a table's row hashes: the salt's (so a new definition, maxAge or
    expired-sessions setting changes every digest) and the table's."""
    digest = hashlib.blake2b(f"{salt}|{kind}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _summed(every: Subquery) -> ColumnElement[int]:
    """The digest of the rows aggregated: their hashes summed (``sync_worker.digest_sum``)."""
    high, low = halves(every.c.h)
    return folded(func.sum(high), func.sum(low))


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
