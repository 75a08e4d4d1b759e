"""The Auth.js side of a set-based full pass: the source's rows as COPY streams.

A set-based pass (``sync_worker.setpass``) copies the Auth.js tables into temporary tables of
the worker's own PostgreSQL database and decides there, in SQL, what most users write. This
module owns what only the adapter knows: the source queries (the same ones ``iter_digested``
reads, so the rows, the live-session filter and the digests are the ones the per-row pass
sees), their column types, and the mapping of the users the worker hands back to Python.

Everything is read in one REPEATABLE READ snapshot of the source, as ``COPY (SELECT ...) TO
STDOUT`` in text form: the bytes go to the worker's ``COPY ... FROM STDIN`` undecoded. The
worker's temporary tables take each column's own source type, so the users it reads back
for the per-row path come out as the same Python values a direct read would give.

A pass is offered only where every column has a type the worker's SQL understands (integer
or text ids, text columns, timestamps, a boolean ``emailVerified``); otherwise ``None``,
and the per-row pass runs.

The pass is handed over in *parts*, users in id order (``parts``): a small first one, so
the worker's first batch need not wait for the whole source, then larger ones. With text
ids it is one part: their accounts and sessions are not read by id range (another
column's collation may order them otherwise), so every part would read them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import structlog
from sqlalchemy import BigInteger, Connection, Select, func, literal, select

from providers.base import Cursor, RecordError
from sync_worker.changes import UserChange
from sync_worker.errors import UpstreamDataError, UpstreamUnavailable

__all__ = ["AuthjsSetPass", "Part", "Relation", "acceptable", "position_after"]

log = structlog.get_logger(__name__)

_BLOCK = 1 << 20

#: Each copied column's logical name, and the source types the worker's SQL handles for it.
_INT = frozenset({"smallint", "integer", "bigint"})
_TEXT = frozenset({"text", "character varying"})
_TIME = frozenset({"timestamp with time zone", "timestamp without time zone"})
_ID = _INT | _TEXT
ALLOWED: Mapping[str, Mapping[str, frozenset[str]]] = {
    "users": {
        "ord": frozenset({"bigint"}),
        "id": _ID,
        "name": _TEXT,
        "email": _TEXT,
        "email_verified": _TIME | {"boolean"},
        "image": _TEXT,
        "created_at": _TIME,
    },
    "accounts": {"uid": _ID, "provider": _TEXT, "acct": _TEXT | _INT},
    "sessions": {"uid": _ID, "token": _TEXT, "expires": _TIME, "created_at": _TIME},
    "digests": {"uid": _ID, "digest": _TEXT, "n": _INT},
}


@dataclass(frozen=True, slots=True)
class Relation:
    """One copied table: its logical columns with their source types, and its query."""

    name: str
    columns: tuple[tuple[str, str], ...]
    sql: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Part:
    """The users at positions ``first..last`` of the pass, and their relations."""

    first: int
    last: int
    relations: tuple[Relation, ...]


#: The pass's queries for the users after one id up to another (None: open), whose
#: positions start after ``offset``: ``(name, column labels, query)`` each.
Queries = Callable[[Any, Any, int], Sequence[tuple[str, Sequence[str], Select[Any]]]]


def acceptable(name: str, columns: Sequence[tuple[str, str]]) -> bool:
    allowed = ALLOWED[name]
    return all(col in allowed and kind in allowed[col] for col, kind in columns)


class AuthjsSetPass:
    """An open source snapshot with the pass's four relations (users, accounts, live
    sessions, digests), and the per-row mapping of the users the worker hands back."""

    def __init__(
        self,
        *,
        reading: AbstractContextManager[Connection],
        queries: Queries,
        ids: Select[Any],
        after: Any,
        ranged: bool,
        observed: datetime,
        partial: bool,
        max_age_seconds: float,
        mapper: Callable[
            [Sequence[tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]], datetime],
            tuple[tuple[UserChange, ...], tuple[RecordError, ...]],
        ],
        cursor_after: Callable[[str], Cursor],
        batch_size: int,
        seen_per_page: int,
    ) -> None:
        self.provider = "authjs"
        self.batch_size = batch_size
        self.seen_per_page = seen_per_page
        self.observed = observed
        self.partial = partial
        self.max_age_seconds = max_age_seconds
        self._reading = reading
        self._queries = queries
        self._ids = ids
        self._after = after
        self._ranged = ranged
        self._types: dict[str, tuple[tuple[str, str], ...]] = {}
        self._mapper = mapper
        self._cursor_after = cursor_after
        self._conn: Connection | None = None

    def open(self) -> list[Relation] | None:
        """Begin the snapshot; the relations, or None (and closed) if a type is not handled
        or the source refuses a query (the per-row pass then says why, in its own words)."""
        try:
            return self._open()
        except psycopg.Error as exc:
            log.info("set_pass_refused_by_source", error=type(exc).__name__)
            self.close()
            return None
        except BaseException:
            self.close()
            raise

    def _open(self) -> list[Relation] | None:
        conn = self._conn = self._reading.__enter__()
        conn.execute(select(literal(1)))  # begin the snapshot before any COPY uses it
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            cur.execute("SET LOCAL datestyle = 'ISO, YMD'")  # what the worker parses
        relations: list[Relation] = []
        for name, labels, query in self._queries(self._after, None, 0):
            sql, params = _compiled(conn, query)
            types = _types(raw, sql, params)
            columns = tuple(zip(labels, types, strict=False))
            if len(types) != len(labels) or not acceptable(name, columns):
                # A query of another shape (the digest query changed, say): per row.
                self.close()
                return None
            relations.append(Relation(name, columns, sql, params))
            self._types[name] = columns
        return relations

    def parts(self, first: int, size: int) -> list[Part]:
        """The opened pass in parts of users in id order: ``first`` users, then parts
        doubling up to ``size`` each (one part where ids are text, or where the pass holds
        no more than ``first``). Every part has the relations ``open`` returned, for its
        users only."""
        conn = self._conn
        assert conn is not None
        with _source_errors():
            total = int(
                conn.execute(select(func.count()).select_from(self._ids.subquery())).scalar_one()
            )
            marks = _marks(total, first, size) if self._ranged else [total]
            bounds: dict[int, Any] = {}
            if len(marks) > 1:
                ids = self._ids.subquery()
                key = next(iter(ids.c))
                numbered = select(key, row_number_over(key).label("n")).subquery()
                found = conn.execute(
                    select(numbered.c.n, next(iter(numbered.c))).where(numbered.c.n.in_(marks[:-1]))
                )
                bounds = {int(n): value for n, value in found}
        parts: list[Part] = []
        after, start = self._after, 0
        for mark in marks:
            upto = bounds.get(mark)  # the last part's end stays open
            relations = []
            for name, _labels, query in self._queries(after, upto, start):
                sql, params = _compiled(conn, query)
                relations.append(Relation(name, self._types[name], sql, params))
            parts.append(Part(start + 1, mark, tuple(relations)))
            after, start = upto, mark
        return parts

    def copy_out(self, relation: Relation) -> Iterator[bytes]:
        """The relation's rows as COPY text bytes, in chunks."""
        assert self._conn is not None
        raw = self._conn.connection.driver_connection
        assert raw is not None
        # The driver hands over a row at a time: pass on blocks of about a megabyte.
        block = bytearray()
        statement = f"COPY ({relation.sql}) TO STDOUT"
        with _source_errors(), raw.cursor() as cur, cur.copy(statement, relation.params) as copy:
            for chunk in copy:
                block += chunk
                if len(block) >= _BLOCK:
                    yield bytes(block)
                    block.clear()
        if block:
            yield bytes(block)

    def map_users(
        self,
        users: Sequence[dict[str, Any]],
        accounts: Sequence[dict[str, Any]],
        sessions: Sequence[dict[str, Any]],
    ) -> tuple[tuple[UserChange, ...], tuple[RecordError, ...]]:
        """The per-row mapping of these users (AdapterUser field names, as the adapter reads
        them), with their accounts and live sessions (keyed by ``userId``)."""
        by_account: dict[Any, list[dict[str, Any]]] = {}
        for row in accounts:
            by_account.setdefault(row["userId"], []).append(row)
        by_session: dict[Any, list[dict[str, Any]]] = {}
        for row in sessions:
            by_session.setdefault(row["userId"], []).append(row)
        entries = [
            (row, by_account.get(row["id"], []), by_session.get(row["id"], [])) for row in users
        ]
        return self._mapper(entries, self.observed)

    def cursor_after(self, external_id: str) -> Cursor:
        return self._cursor_after(external_id)

    def final_cursor(self) -> Cursor:
        """The last page's cursor: the pass completed (the next one starts from the top)."""
        log.info("authjs_pass_complete", provider=self.provider, set_based=True)
        return {"completed_at": self.observed.isoformat()}

    def close(self) -> None:
        if self._conn is not None:
            self._conn = None
            self._reading.__exit__(None, None, None)


@contextmanager
def _source_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.OperationalError as exc:
        raise UpstreamUnavailable(f"authjs: database unavailable: {_line(exc)}") from exc
    except psycopg.Error as exc:
        raise UpstreamDataError(f"authjs: database error: {_line(exc)}") from exc


def _marks(total: int, first: int, size: int) -> list[int]:
    """The last position of each part: ``first``, then parts twice as large as the one
    before up to ``size`` each, then ``total``. Growing, not ``size`` at once: the writer
    takes a small part quickly, and the next must be staged by then (a second part of
    ``size`` kept the first batches waiting 0.3-0.4 s)."""
    marks, part, end = [], first, first
    while end < total:
        marks.append(end)
        part = min(2 * part, size)
        end += part
    return [*marks, total]


def _compiled(conn: Connection, query: Select[Any]) -> tuple[str, dict[str, Any]]:
    """The query's SQL for the driver, with its parameters as the driver takes them."""
    compiled = query.compile(dialect=conn.dialect)
    processors: Mapping[str, Callable[[Any], Any]] = getattr(compiled, "_bind_processors", {})
    params = {
        k: processors[k](v) if k in processors else v
        for k, v in compiled.construct_params().items()
    }
    return str(compiled), params


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _types(raw: Any, sql: str, params: Mapping[str, Any]) -> list[str]:
    """The PostgreSQL type of each column ``sql`` selects, from a run that returns no row."""
    with raw.cursor() as cur:
        cur.execute(f"SELECT * FROM ({sql}) AS q LIMIT 0", params)  # noqa: S608 (our own SQL)
        oids = [d.type_code for d in cur.description or ()]
        cur.execute("SELECT oid, format_type(oid, NULL) FROM pg_type WHERE oid = ANY(%s)", [oids])
        names = {int(oid): str(name) for oid, name in cur.fetchall()}
    return [names.get(int(oid), "?") for oid in oids]


def row_number_over(key: Any) -> Any:
    """The users' position in the pass (the source's own id order)."""
    return func.row_number().over(order_by=key)


def position_after(key: Any, offset: int) -> Any:
    """The users' position in the pass, for a part that starts after ``offset`` users."""
    return row_number_over(key) + literal(offset, BigInteger)
