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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sync_worker.changes import UserChange

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
    is True on the last page of a full listing. ``total``, on the first page of a pass, is
    the number of users the pass will list, where the source can tell cheaply (for the
    progress bar's percentage and ETA); None when it cannot.
    """

    changes: tuple[UserChange, ...]
    cursor: Cursor | None
    errors: tuple[RecordError, ...] = ()
    seen_ids: tuple[str, ...] = ()
    complete: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    total: int | None = None


class Provider(Protocol):
    """A source of user changes."""

    name: str

    def iter_changes(self, cursor: Cursor | None, *, full: bool = False) -> Iterator[Page]:
        """Yield pages of changes after ``cursor``.

        With ``full`` (or no cursor), list every user upstream; the last page has
        ``complete=True`` and its cursor is where the next incremental pull starts.
        Without it, yield only what changed since the cursor.
        """
        ...

    def to_change(self, raw: Mapping[str, Any]) -> UserChange:
        """Map one raw upstream user record to a normalized change (pure; no I/O)."""
        ...

    def read_ahead_pages(self, *, full: bool) -> int:
        """Pages to read in a thread while the engine applies the current one.

        Worth it where reading a page mostly waits (HTTP, rate-limit pacing): the wait
        overlaps the engine's. Where it is Python work (decoding, mapping) it competes
        with the engine for the GIL and slows both: 0 then (measured in bench/pull.py).
        """
        ...

    def fetch_user(self, external_id: str) -> UserChange | None:
        """Fetch one user now; None if the provider says it does not exist."""
        ...

    def close(self) -> None:
        """Release connections and sessions."""
        ...
