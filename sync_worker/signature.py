"""The signature of a set of ``(external id, digest)`` pairs, computed alike on both sides.

A digest pass compares every user's source digest with the one the worker stored. When
nothing changed, the two sets of pairs are equal, and that can be told from three numbers
per side: how many pairs, and the sums of each pair's 64-bit hash in two halves (a
multiset hash: no order, no sort, and equal sets always agree). The source's database
computes them over the rows it sends (``providers.authjs_copy``), the worker's over the
digests it stored (``db.digests.stored_signature``), with this one definition, so a pass
that found no change is decided without copying or joining a row. A difference of any
kind (a changed digest, a user more or less, two users' digests swapped) changes the
signature but for a 2^-63 accident; then the rows are compared one by one.

Each pair is hashed as the text ``"<id> <digest>"``, byte for byte (a digest has no space,
so the text reads back one way); the halves are summed as 32-bit integers, whose sums
PostgreSQL keeps as bigints (a bigint's sum is a numeric, slower), leaving bit 31 out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, Text, cast, func, literal

__all__ = ["ZERO", "Signature", "pair_hash", "signature_columns"]

_LOW_31 = 0x7FFFFFFF


@dataclass(frozen=True, slots=True)
class Signature:
    """How many pairs, and the sums of the high and low halves of their hashes."""

    count: int
    high: int
    low: int

    def __add__(self, other: Signature) -> Signature:
        return Signature(self.count + other.count, self.high + other.high, self.low + other.low)


ZERO = Signature(0, 0, 0)


def pair_hash(external_id: ColumnElement[Any], digest: ColumnElement[Any]) -> ColumnElement[int]:
    """The 64-bit hash of one pair (PostgreSQL's ``hashtextextended``)."""
    text = (cast(external_id, Text) + literal(" ", Text) + cast(digest, Text)).collate("C")
    return func.hashtextextended(text, literal(0, BigInteger))


def signature_columns(hashed: ColumnElement[int]) -> list[ColumnElement[int]]:
    """The aggregates of a ``Signature`` over rows whose pair hash is ``hashed`` (a column
    of a subquery, so that each row's hash is computed once)."""
    zero = literal(0, BigInteger)
    return [
        func.count(),
        func.coalesce(func.sum(cast(hashed.op(">>")(32), Integer)), zero),
        func.coalesce(func.sum(cast(hashed.op("&")(_LOW_31), Integer)), zero),
    ]
