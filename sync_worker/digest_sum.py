"""Additive digests: a user's digest is the sum of its rows' hashes, so digests add up.

A source that digests its users (Auth.js on PostgreSQL, ``providers.authjs_digest``)
hashes each row the mapping reads, the user's id among its columns, and sums a user's row
hashes modulo 2^62 into that user's digest. A sum, not a hash of the rows in order: the
rows need no sort, a row repeated counts twice (an XOR would cancel it), and the digests of
any set of users add up to the sum of all their rows' hashes. So a pass can ask the source
for one total over every row, and the worker for the total of the digests it stored: equal
(with as many users, each live one holding a digest), the source holds exactly the rows the
worker last applied, and nothing is read per user. Any difference (a row changed, added or
gone, a user more or less) changes the total but for a 2^-62 accident; then users are
compared one by one. Each row's hash names its user, so the totals cannot agree by rows
moving between users, nor by stored digests standing under each other's ids.

PostgreSQL sums 32-bit integers as bigints (a bigint's sum is a numeric, slower), so each
64-bit row hash is summed in two halves, ``halves``, and the sums folded into 62 bits by
``folded``: ``(high * 2^31 + low) mod 2^62`` is additive, whatever rows were summed where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, cast, literal

__all__ = ["MODULUS", "DigestSum", "folded", "halves"]

#: Digests and their totals are integers modulo this.
MODULUS = 2**62
_HALF = 2**31


@dataclass(frozen=True, slots=True)
class DigestSum:
    """A total over users' digests: how many users, their digests' sum modulo ``MODULUS``,
    and (from a source) how many live sessions their rows held."""

    users: int
    total: int
    sessions: int = 0


def halves(hashed: ColumnElement[Any]) -> tuple[ColumnElement[int], ColumnElement[int]]:
    """A 64-bit row hash as two integers to sum: its high 32 bits (signed) and its low 31
    (bit 31 is left out; ``folded`` keeps 31 bits of each)."""
    return cast(hashed.op(">>")(32), Integer), cast(hashed.op("&")(_HALF - 1), Integer)


def folded(high: ColumnElement[Any], low: ColumnElement[Any]) -> ColumnElement[int]:
    """The digest (a bigint in ``[0, 2^62)``) of rows whose ``halves`` summed to ``high``
    and ``low`` (bigints; ``low`` is never negative). ``%`` keeps the dividend's sign in
    SQL, hence the shift of ``high`` into ``[0, 2^31)``."""
    half, modulus = literal(_HALF, BigInteger), literal(MODULUS, BigInteger)
    high_bits = (high % half + half) % half
    return (high_bits * half + low % modulus) % modulus
