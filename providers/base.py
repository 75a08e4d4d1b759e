"""The small interface every identity-provider adapter implements.

An adapter reads; it never writes the worker's database. It yields pages of normalized
changes, each page carrying the cursor to resume *after* it, so the caller can commit the
page's batch and its cursor in one transaction: a killed run resumes where it stopped, and
no cursor ever moves past a page that was not applied.

Errors raised by adapters come from ``sync_worker.errors`` (ProviderAuthError,
RateLimitedError, UpstreamUnavailable, UpstreamDataError); HTTP and driver exceptions are
translated at the adapter boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from sync_worker.changes import UserChange
from sync_worker.digest_sum import DigestSum

Cursor = Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordError:
    """An upstream record the adapter could not map; isolated, reported, never fatal."""

    external_id: str | None
    reason: str
    raw: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    """One page of changes and the cursor to resume after it.

    ``cursor`` is None when the pull has no resumable position (e.g. the middle of a
    full export that must restart from the beginning); the caller then keeps the old one.
    ``seen_ids`` lists every upstream id this page observed, for reconcile. ``complete``
    is True on the last page of a listing of every user; ``partial_pass`` says that listing
    resumed halfway (or lost its place), so it did not see everyone and must not reconcile.
    ``total``, on the first page of a pass, is the number of users the pass will list, where
    the source can tell cheaply (for the progress bar's percentage and ETA); None otherwise.
    ``digests``, on a digest pass (``DigestSource``), maps each user whose changes the page
    carries to its source digest; the users in ``seen_ids`` missing from it were skipped as
    unchanged. None on any other page. ``skipped`` counts those users and their live
    sessions (on some page of the pass, not necessarily theirs).
    """

    changes: tuple[UserChange, ...]
    cursor: Cursor | None
    errors: tuple[RecordError, ...] = ()
    seen_ids: tuple[str, ...] = ()
    complete: bool = False
    partial_pass: bool = False
    total: int | None = None
    digests: Mapping[str, str] | None = None
    skipped: tuple[int, int] = (0, 0)


class Provider(Protocol):
    """A source of user changes, as the pull runner uses it."""

    name: str

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        """Yield pages of changes after ``cursor``.

        With ``full`` (or no cursor), list every user upstream; the last page has
        ``complete=True`` and its cursor is where the next incremental pull starts.
        Without it, yield only what changed since the cursor. Where reading a page mostly
        waits (HTTP, rate-limit pacing), the adapter reads the next one while the caller
        applies this one (``sync_worker.readahead``), and may map it there too (Stack: the
        engine mostly waits on the database meanwhile); where reading is Python work alone, it
        does not: a reader thread would compete with the engine for the GIL (bench/pull.py).
        """
        ...

    def cursor_since(self, since: datetime) -> Cursor | None:
        """The cursor that starts the next incremental pull at ``since``; None for a
        provider without a change log (every pull lists all users)."""
        ...

    def close(self) -> None:
        """Release connections and sessions."""
        ...


@runtime_checkable
class UserLookup(Protocol):
    """Re-reading one user now: how the webhook drainer resolves a thin event."""

    name: str

    def fetch_user(self, external_id: str) -> UserChange | None:
        """The user as the provider has it now; None if it says there is no such user."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Compared:
    """A pass's source digests compared with the stored ones where they are stored."""

    users: int  # digests compared (the users the pass lists)
    #: ``{external_id: digest}`` of the users whose digest differs or is missing; None if
    #: more than the caller's limit did (then nothing was recorded).
    changed: Mapping[str, str] | None
    skipped_sessions: int  # live sessions of the unchanged users


class StoredDigests(Protocol):
    """The digests the worker stored for a provider's users (``db.digests``), as a pass
    asks for them: whether there are any; all, streamed in an order (``numeric``: shorter
    ids first, then bytes; else bytes); or those of a chunk of ids; or compared where they
    are stored."""

    def held(self) -> bool: ...

    def in_order(self, *, numeric: bool) -> Iterator[tuple[str, str]]: ...

    def of(self, external_ids: Sequence[str]) -> Mapping[str, str]: ...

    def unchanged(self, summed: Callable[[], DigestSum]) -> Compared | None:
        """Whether a full pass's source holds exactly the rows the stored digests stand
        for: ``summed`` (called at once, in a thread, while the worker adds up its side)
        totals every source user's digest, and equals the stored digests' total, as many
        users, each live identity holding one. Then the ``Compared`` of a pass that changed
        nobody, reconcile's counts told (nobody is missing). Otherwise, or where the store
        does not total (SQLite, a dry run), None: compare user by user."""
        ...

    def compare(self, digests: Iterable[bytes], *, limit: int) -> Compared | None:
        """Compare the pass's digests, COPY text rows ``(external id, digest, live
        sessions)`` in any order, with the stored ones, in the worker's database, and
        record every id as seen by the pass (unless more than ``limit`` changed). None,
        without reading ``digests``, where the store does not compare (the caller merges
        ``in_order`` instead): the pass then lists its ids in ``Page.seen_ids``."""
        ...


@runtime_checkable
class DigestSource(Protocol):
    """A source that digests its users' rows itself, so a pass can skip the unchanged ones."""

    name: str

    def iter_digested(
        self, cursor: Cursor | None, *, full: bool, known: StoredDigests
    ) -> Iterator[Page] | None:
        """Like ``iter_changes`` for a pass over every user, or None where this source
        cannot digest (then the caller uses ``iter_changes``).

        ``known`` holds the digests stored by earlier passes; it is asked after the pass's
        snapshot is taken. Pages carry the changes of only the users whose digest differs or
        is missing, ``seen_ids`` of every user (none where ``known.compare`` recorded them),
        and ``digests`` of the users they carry.
        """
        ...
